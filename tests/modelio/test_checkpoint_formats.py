"""Checkpoints of the model families in their public formats, built here: shrink.read_checkpoint,
shrink.load_checkpoint (with each model file's checkpoint_filter_fn), shrink.get_bottleneck_mlp with a
checkpoint, and the conversion CLI (python -m shrink.convert)."""
import argparse
import pickle
import sys
import types

import pytest
import timm
import torch

import shrink
from shrink.convert import main as convert_main

from ..conftest import bottleneck_count, n_params, rename_state, same_outputs


def perturbed(name: str) -> torch.nn.Module:
    """A model whose weights differ from any fresh init (so a load that did nothing cannot pass)."""
    model = timm.create_model(name)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def test_scaling_mlps_checkpoint_and_get_model(tmp_path):
    src = shrink.get_bottleneck_mlp("B_2-Wi_32", resolution=16, num_classes=10)
    original = rename_state(src.state_dict(), [
        (r"^stem\.", "linear_in."), (r"^head\.", "linear_out."), (r"^blocks\.(\d+)\.norm\.", r"layernorms.\1."),
        (r"^blocks\.(\d+)\.mlp\.fc1\.", r"blocks.\1.block.0."), (r"^blocks\.(\d+)\.mlp\.fc2\.", r"blocks.\1.block.2."),
    ])
    assert "linear_in.weight" in original and "blocks.1.block.2.bias" in original
    path = tmp_path / "B-2_Wi-32_res_16_cifar10_epochs_20_weights"  # the original's suffix-less file name
    torch.save({f"_orig_mod.{k}": v for k, v in original.items()}, path)  # as saved from a torch.compile'd model
    model = shrink.get_bottleneck_mlp("B_2-Wi_32", resolution=16, num_classes=10, checkpoint=path)
    assert same_outputs(src, model)
    flat = torch.randn(2, 3 * 16 * 16)  # the original feeds flattened (C, H, W) vectors
    with torch.no_grad():
        assert torch.equal(model(flat), model(flat.view(2, 3, 16, 16)))
    # a fine-tuning start: the 10-class head is replaced by a fresh 5-class one
    other = shrink.get_bottleneck_mlp("B_2-Wi_32", resolution=16, num_classes=5)
    report = shrink.load_checkpoint(other, path)
    assert report["reinitialised"] == ["head.weight", "head.bias"]


def test_get_bottleneck_mlp_call_shape_and_errors():
    model = shrink.get_bottleneck_mlp(architecture="B_12-Wi_1024", resolution=64, num_classes=10)
    assert model.pretrained_cfg["architecture"] == "bottleneck_mlp_b12_wi1024"
    assert n_params(model) == bottleneck_count(12, 1024, classes=10)
    with pytest.raises(shrink.ShrinkError, match="never downloads"):
        shrink.get_bottleneck_mlp("B_6-Wi_512", resolution=64, num_classes=11230, checkpoint="in21k")
    with pytest.raises(shrink.ShrinkError, match="B_<blocks>-Wi_<width>"):
        shrink.get_bottleneck_mlp("B12-Wi1024")


@pytest.fixture
def fake_yacs(monkeypatch):
    """A stand-in ``yacs.config.CfgNode`` to pickle configs as the MS-MLP (Swin) training code does."""
    mod = types.ModuleType("yacs.config")

    class CfgNode(dict):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.__dict__["__immutable__"] = False

    CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
    mod.CfgNode = CfgNode
    monkeypatch.setitem(sys.modules, "yacs", types.ModuleType("yacs"))
    monkeypatch.setitem(sys.modules, "yacs.config", mod)
    return CfgNode


def test_msmlp_checkpoint_with_yacs_config_loads_weights_only(tmp_path, fake_yacs, monkeypatch):
    src = perturbed("msmlp_nano")
    original = rename_state(src.state_dict(), [
        (r"^stem\.", "patch_embed."), (r"^stages\.(\d+)\.", r"layers.\1."), (r"\.mix\.conv_w\.", ".dwconv_lr."),
        (r"\.mix\.conv_h\.", ".dwconv_td."), (r"\.mlp\.fc1\.", ".pwconv1."), (r"\.mlp\.fc2\.", ".pwconv2."),
        (r"\.ls\.gamma$", ".gamma"),
    ])
    assert "layers.0.blocks.0.dwconv_lr.4.weight" in original and "layers.0.downsample.proj.weight" in original
    config = fake_yacs({"MODEL": fake_yacs({"TYPE": "ms_mlp", "NAME": "ms_mlp_nano"}), "TRAIN": fake_yacs()})
    path = tmp_path / "msmlp_nano.pth"
    torch.save({"model": original, "optimizer": {"state": {}, "param_groups": []}, "lr_scheduler": {},
                "max_accuracy": 12.5, "epoch": 3, "config": config}, path)
    monkeypatch.delitem(sys.modules, "yacs.config")  # loading must not need (or import) yacs
    monkeypatch.delitem(sys.modules, "yacs")
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)  # plain weights_only=True refuses the CfgNode
    assert set(shrink.read_checkpoint(path)) == set(original)  # the stand-in makes it inert
    model = timm.create_model("msmlp_nano")
    report = shrink.load_checkpoint(model, path)
    assert report == {"missing": [], "unexpected": [], "mismatched": [], "reinitialised": []}
    assert same_outputs(src, model)
    assert "yacs.config" not in sys.modules


def test_ffvit_deit_style_checkpoint_with_args_and_ema(tmp_path):
    src = perturbed("ffvit_nano")
    sd = rename_state(src.state_dict(), [(r"\.mlp_channels\.", ".mlp1."), (r"\.mlp_tokens\.", ".mlp2.")])
    pos = sd.pop("pos_embed")
    grid = src.patch_embed.grid_size
    sd["pos_encoding.cls_pos_embed"] = pos[:, :1].clone()
    sd["pos_encoding.pos_embed"] = pos[:, 1:].transpose(1, 2).reshape(1, -1, *grid).clone()
    ema = {k: torch.zeros_like(v) for k, v in sd.items()}
    path = tmp_path / "linear-nano-checkpoint.pth"
    torch.save({"model": sd, "model_ema": ema, "optimizer": {}, "epoch": 299,
                "args": argparse.Namespace(model="linear_tiny", lr=5e-4, input_size=224)}, path)
    model = timm.create_model("ffvit_nano")
    shrink.load_checkpoint(model, path)
    assert same_outputs(src, model)
    shrink.load_checkpoint(model, path, entry="model_ema")  # the EMA weights, picked explicitly
    assert all(torch.count_nonzero(p) == 0 for p in model.parameters())
    with pytest.raises(shrink.ShrinkError, match="no entry 'ema'"):
        shrink.read_checkpoint(path, entry="ema")


class Opaque:  # an arbitrary pickled object: the unpickler would have to import and build it
    pass


def test_unknown_pickled_objects_need_explicit_trust(tmp_path):
    src = timm.create_model("fnet_nano")
    path = tmp_path / "opaque.pth"
    torch.save({"state_dict": src.state_dict(), "extra": Opaque()}, path)
    model = timm.create_model("fnet_nano")
    with pytest.raises(shrink.ShrinkError, match="trusted=True") as e:
        shrink.load_checkpoint(model, path)
    assert "\n" not in str(e.value)
    shrink.load_checkpoint(model, path, trusted=True)
    assert same_outputs(src, model)


def test_timm_mixer_and_safetensors_checkpoints(tmp_path):
    from safetensors.torch import save_file

    src = timm.create_model("gmlp_nano_cifar")
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(tmp_path / "g.safetensors"))
    model = timm.create_model("gmlp_nano_cifar")
    shrink.load_checkpoint(model, tmp_path / "g.safetensors")
    assert same_outputs(src, model)
    torch.save({"model": {f"module.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "g.pth")
    model = timm.create_model("gmlp_nano_cifar")
    shrink.load_checkpoint(model, tmp_path / "g.pth")
    assert same_outputs(src, model)
    bad = {k: v for k, v in src.state_dict().items() if not k.startswith("blocks.1.")}
    with pytest.raises(shrink.ShrinkError, match="missing"):
        shrink.load_checkpoint(timm.create_model("gmlp_nano_cifar"), bad)


@pytest.mark.parametrize("name", ["bottleneck_mlp_nano", "ffvit_nano", "msmlp_nano"])
def test_checkpoints_in_this_projects_key_names_pass_through_unchanged(name, tmp_path):
    """A checkpoint already in the model's own (timm-style) names loads as it is, head included or not."""
    src = perturbed(name)
    torch.save(src.state_dict(), tmp_path / "ck.pth")
    model = timm.create_model(name)
    assert shrink.load_checkpoint(model, tmp_path / "ck.pth")["missing"] == []
    assert same_outputs(src, model, atol=0.0)
    torch.save({k: v for k, v in src.state_dict().items() if not k.startswith("head.")}, tmp_path / "headless.pth")
    model = timm.create_model(name, num_classes=0)
    report = shrink.load_checkpoint(model, tmp_path / "headless.pth")
    assert report == {"missing": [], "unexpected": [], "mismatched": [], "reinitialised": []}
    with torch.no_grad():
        x = torch.randn(1, *src.pretrained_cfg["input_size"])
        src.reset_classifier(0)
        assert torch.equal(model.eval()(x), src.eval()(x))


def test_convert_cli(tmp_path, capsys):
    src = timm.create_model("ffvit_nano", num_classes=7)
    torch.save({"model": src.state_dict(), "args": argparse.Namespace(lr=1.0)}, tmp_path / "ck.pth")
    out = tmp_path / "converted"
    assert convert_main(["ffvit_nano", str(tmp_path / "ck.pth"), str(out), "--num-classes", "7"]) == 0
    back = shrink.load(out)
    assert same_outputs(src, back)
    # a missing file: one line on stderr, exit code 2, nothing written
    capsys.readouterr()
    assert convert_main(["ffvit_nano", str(tmp_path / "nope.pth"), str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and not (tmp_path / "o2").exists()
