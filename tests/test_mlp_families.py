"""The standalone MLP families (models/): published sizes, timm registration, training, checkpoint loaders."""
from __future__ import annotations

import argparse
import math
import pickle
import sys
import time
import types
from pathlib import Path

import pytest
import timm
import torch
import yaml
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, resolve_data_config

import shrink
from shrink.convert import main as convert_main
from shrink.models import bottleneck_mlp, fnet, ms_mlp
from shrink.models._helpers import CIFAR100_MEAN, CIFAR100_STD

REPO = Path(__file__).resolve().parents[1]
FAMILY_MODULES = ("bottleneck_mlp", "fnet", "ms_mlp", "ff_vit", "mlp_presets")
NANO = ["bottleneck_mlp_nano", "fnet_nano", "msmlp_nano", "ffvit_nano",
        "mixer_nano_cifar", "resmlp_nano_cifar", "gmlp_nano_cifar"]
IMNET = (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
CIFAR = (CIFAR100_MEAN, CIFAR100_STD)
# name -> (input size, (mean, std), classes): written out here, not read back from the code under test.
EXPECTED_CFG = {
    "bottleneck_mlp_b6_wi512": ((3, 64, 64), IMNET, 11230),
    "bottleneck_mlp_b12_wi512": ((3, 64, 64), IMNET, 11230),
    "bottleneck_mlp_b6_wi1024": ((3, 64, 64), IMNET, 11230),
    "bottleneck_mlp_b12_wi1024": ((3, 64, 64), IMNET, 11230),
    "bottleneck_mlp_nano": ((3, 16, 16), IMNET, 10),
    "fnet_keras_cifar100": ((3, 64, 64), CIFAR, 100),
    "fnet_base_patch16_224": ((3, 224, 224), IMNET, 1000),
    "fnet_nano": ((3, 16, 16), CIFAR, 10),
    "msmlp_tiny_patch4_shift5_224": ((3, 224, 224), IMNET, 1000),
    "msmlp_small_patch4_shift5_224": ((3, 224, 224), IMNET, 1000),
    "msmlp_base_patch4_shift5_224": ((3, 224, 224), IMNET, 1000),
    "msmlp_nano": ((3, 32, 32), CIFAR, 10),
    "ffvit_tiny_patch16_224": ((3, 224, 224), IMNET, 1000),
    "ffvit_base_patch16_224": ((3, 224, 224), IMNET, 1000),
    "ffvit_nano": ((3, 16, 16), CIFAR, 10),
    "mixer_s4_cifar": ((3, 32, 32), CIFAR, 100),
    "resmlp_12_cifar": ((3, 32, 32), CIFAR, 100),
    "gmlp_s4_cifar": ((3, 32, 32), CIFAR, 100),
    "mixer_nano_cifar": ((3, 32, 32), CIFAR, 10),
    "resmlp_nano_cifar": ((3, 32, 32), CIFAR, 10),
    "gmlp_nano_cifar": ((3, 32, 32), CIFAR, 10),
}


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def on_meta(name: str, **kwargs) -> torch.nn.Module:
    """Build without allocating or initialising weights (parameter counts and cfgs only)."""
    with torch.device("meta"):
        return timm.create_model(name, **kwargs)


def linear(i: int, o: int) -> int:
    return i * o + o


def train_step(model: torch.nn.Module, batch: int = 2) -> float:
    c = model.pretrained_cfg
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *c["input_size"], generator=g)
    y = torch.randint(0, model.num_classes, (batch,), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


# ---------------------------------------------------------------------------------------------
# Registration and pretrained cfgs
# ---------------------------------------------------------------------------------------------

def test_every_family_model_is_registered_and_expected():
    registered = set()
    for module in FAMILY_MODULES:
        registered |= set(timm.list_models(module=module))
    assert registered == set(EXPECTED_CFG)


@pytest.mark.parametrize("name", sorted(EXPECTED_CFG))
def test_pretrained_cfg_input_size_mean_std(name):
    size, (mean, std), classes = EXPECTED_CFG[name]
    model = on_meta(name)
    cfg = model.pretrained_cfg
    assert tuple(cfg["input_size"]) == size
    assert tuple(cfg["mean"]) == pytest.approx(mean) and tuple(cfg["std"]) == pytest.approx(std)
    assert cfg["num_classes"] == classes == model.num_classes
    assert not cfg.get("url") and not cfg.get("hf_hub_id")  # nothing that would be downloaded
    data = resolve_data_config({}, model=model)
    assert data["input_size"] == size and tuple(data["mean"]) == pytest.approx(mean)


def test_img_size_override_updates_cfg_and_runs():
    model = timm.create_model("msmlp_nano", img_size=64)
    assert model.pretrained_cfg["input_size"] == (3, 64, 64)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)


@pytest.mark.parametrize("name", ["msmlp_tiny_patch4_shift5_224", "bottleneck_mlp_nano", "mixer_s4_cifar", "fnet_nano"])
def test_pretrained_true_fails_clearly_without_network(name):
    with pytest.raises(RuntimeError, match="No pretrained weights exist"):  # timm's own error
        timm.create_model(name, pretrained=True)
    with pytest.raises(shrink.ShrinkError, match="no pretrained weights") as e:  # the toolkit's, one line
        shrink.create_model(name, pretrained=True)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# Parameter counts: the published figures, derived from the architecture by hand
# ---------------------------------------------------------------------------------------------

def bottleneck_count(blocks: int, width: int, res: int = 64, classes: int = 11230) -> int:
    block = 2 * width + linear(width, 4 * width) + linear(4 * width, width)  # LayerNorm + MLP
    return linear(3 * res * res, width) + blocks * block + linear(width, classes)


@pytest.mark.parametrize("name, blocks, width, published_m", [
    ("bottleneck_mlp_b6_wi512", 6, 512, 24), ("bottleneck_mlp_b12_wi512", 12, 512, 37),
    ("bottleneck_mlp_b6_wi1024", 6, 1024, 74), ("bottleneck_mlp_b12_wi1024", 12, 1024, 124),
])
def test_bottleneck_mlp_matches_published_counts(name, blocks, width, published_m):
    count = n_params(on_meta(name))
    assert count == bottleneck_count(blocks, width)
    assert math.floor(count / 1e6) == published_m  # the README truncates to whole millions
    if name == "bottleneck_mlp_b12_wi1024":
        assert round(count / 1e5) / 10 == 124.8  # REFERENCE.md
        assert count == 124_843_998


def msmlp_count(width: int, depths: tuple[int, ...], classes: int = 1000) -> int:
    mix = ((1, 1, 3, 5, 7), (1, 3, 3, 5, 7), (1, 5, 5, 5, 7), (1, 7, 7, 7, 7))
    total = 3 * 16 * width + width + 2 * width  # 4x4 conv stem + LayerNorm
    for i, depth in enumerate(depths):
        d = width * 2 ** i
        size = math.ceil(d / 5)
        chunks = [size] * 4 + [d - 4 * size]  # torch.chunk into 5 groups
        convs = 2 * sum(c * k * k + c for c, k in zip(chunks, mix[i], strict=True))  # two directions
        block = convs + 2 * d + linear(d, 4 * d) + linear(4 * d, d) + d  # + LayerNorm, MLP, LayerScale
        total += depth * block
        if i < len(depths) - 1:
            total += 4 * d * 2 * d + 2 * d + 2 * 2 * d  # 2x2 conv to 2d + LayerNorm
    f = width * 2 ** (len(depths) - 1)
    return total + 2 * f + linear(f, classes)


@pytest.mark.parametrize("name, width, depths, published_m", [
    ("msmlp_tiny_patch4_shift5_224", 96, (3, 3, 9, 3), 28),
    ("msmlp_small_patch4_shift5_224", 96, (3, 3, 27, 3), 50),
    ("msmlp_base_patch4_shift5_224", 128, (3, 3, 27, 3), 88),
])
def test_msmlp_matches_published_counts(name, width, depths, published_m):
    count = n_params(on_meta(name))
    assert count == msmlp_count(width, depths)
    assert math.floor(count / 1e6) == published_m  # the README truncates (Base is 88.7M)
    if name.startswith("msmlp_tiny"):
        assert round(count / 1e5) / 10 == 28.7  # REFERENCE.md


def ffvit_count(width: int, depth: int = 12, tokens: int = 197, classes: int = 1000) -> int:
    embed = linear(3 * 16 * 16, width) + width + tokens * width  # conv, class token, positions
    block = (2 * width + linear(width, 4 * width) + linear(4 * width, width)
             + 2 * tokens + linear(tokens, 4 * tokens) + linear(4 * tokens, tokens))
    return embed + depth * block + 2 * width + linear(width, classes)


@pytest.mark.parametrize("name, width, published", [
    ("ffvit_tiny_patch16_224", 192, 7.7), ("ffvit_base_patch16_224", 768, 62),
])
def test_ffvit_matches_published_counts(name, width, published):
    count = n_params(on_meta(name))
    assert count == ffvit_count(width)
    assert (round(count / 1e5) / 10 if published < 10 else round(count / 1e6)) == published


def test_fnet_keras_configuration_count():
    count = n_params(on_meta("fnet_keras_cifar100"))
    d, tokens = 256, (64 // 8) ** 2
    expected = linear(8 * 8 * 3, d) + tokens * d + 4 * (2 * linear(d, d) + 4 * d) + linear(d, 100)
    assert count == expected == 621_924
    assert round(count / 1e4) / 100 == 0.62


# ---------------------------------------------------------------------------------------------
# Forward passes and training steps
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NANO)
def test_nano_forward_and_training_step(name, record_property):
    torch.manual_seed(0)
    model = timm.create_model(name)
    size = model.pretrained_cfg["input_size"]
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(3, *size))
    assert out.shape == (3, model.num_classes) and torch.isfinite(out).all()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_step(model, batch=8)  # warm-up
    t0 = time.perf_counter()
    loss = train_step(model, batch=8)
    seconds = time.perf_counter() - t0
    record_property("train_step_seconds", seconds)
    assert math.isfinite(loss)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert seconds < 5.0  # the target is < 1 s; the bound is loose so a busy machine does not flake


@pytest.mark.parametrize("name", ["fnet_keras_cifar100", "bottleneck_mlp_b6_wi512"])
def test_small_default_models_forward_and_train(name):
    model = timm.create_model(name)
    assert math.isfinite(train_step(model))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(EXPECTED_CFG) - set(NANO)))
def test_default_models_forward_and_train(name):
    model = timm.create_model(name)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(1, *model.pretrained_cfg["input_size"]))
    assert out.shape == (1, model.num_classes) and torch.isfinite(out).all()
    assert math.isfinite(train_step(model))


@pytest.mark.parametrize("name", NANO)
def test_removal_on_mlp_models_is_a_one_line_error(name):
    model = timm.create_model(name)
    with pytest.raises(shrink.ShrinkError) as e:
        shrink.dilute(model, [0])
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", NANO)
def test_save_load_round_trip(name, tmp_path):
    model = shrink.create_model(name).eval()
    shrink.save(model, tmp_path / "m")
    back = shrink.load(tmp_path / "m")
    x = torch.randn(2, *model.pretrained_cfg["input_size"])
    with torch.no_grad():
        assert torch.equal(model(x), back(x))


# ---------------------------------------------------------------------------------------------
# Pieces checked against independent computations
# ---------------------------------------------------------------------------------------------

def test_fourier_mix_is_real_part_of_dft_over_tokens_and_channels():
    x = torch.randn(2, 6, 5, dtype=torch.float64)
    n, d = torch.arange(6.0, dtype=torch.float64), torch.arange(5.0, dtype=torch.float64)
    fn = torch.exp(-2j * math.pi * torch.outer(n, n) / 6)
    fd = torch.exp(-2j * math.pi * torch.outer(d, d) / 5)
    expected = (fn @ x.to(torch.complex128) @ fd).real
    assert (fnet.FourierMix()(x) - expected).abs().max() <= 1e-9


def test_shift_mix_rolls_each_group_by_its_distance():
    mix = ms_mlp.ShiftMix(10, shift_dist=(-2, -1, 0, 1, 2), mix_size=(1, 1, 3, 5, 7))
    with torch.no_grad():  # every depthwise conv becomes the identity
        for conv in [*mix.conv_w, *mix.conv_h]:
            conv.weight.zero_()
            conv.weight[:, :, conv.kernel_size[0] // 2, conv.kernel_size[1] // 2] = 1.0
            conv.bias.zero_()
    x = torch.randn(1, 10, 6, 6)
    out = mix(x)
    for g, s in enumerate((-2, -1, 0, 1, 2)):
        xg = x[:, 2 * g: 2 * g + 2]
        expected = torch.roll(xg, s, dims=3) + torch.roll(xg, s, dims=2)
        assert (out[:, 2 * g: 2 * g + 2] - expected).abs().max() <= 1e-6


def test_msmlp_rejects_widths_torch_chunk_cannot_split():
    with pytest.raises(ValueError, match="do not split"):
        timm.create_model("msmlp_nano", embed_dim=8)  # 8 channels chunk into 4 groups of 2, not 5


# ---------------------------------------------------------------------------------------------
# Loaders: checkpoints in the public formats, built here
# ---------------------------------------------------------------------------------------------

def rename(sd: dict, rules: list[tuple[str, str]]) -> dict:
    import re

    out = {}
    for k, v in sd.items():
        for pattern, repl in rules:
            k = re.sub(pattern, repl, k)
        out[k] = v.clone()
    return out


def same_outputs(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    x = torch.randn(2, *a.pretrained_cfg["input_size"])
    a.eval()
    b.eval()
    with torch.no_grad():
        return (a(x) - b(x)).abs().max().item() <= 1e-5


def test_scaling_mlps_checkpoint_and_get_model(tmp_path):
    src = shrink.get_bottleneck_mlp("B_2-Wi_32", resolution=16, num_classes=10)
    original = rename(src.state_dict(), [
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


def test_get_model_call_shape_and_errors():
    model = shrink.get_bottleneck_mlp(architecture="B_12-Wi_1024", resolution=64, num_classes=10)
    assert model.pretrained_cfg["architecture"] == "bottleneck_mlp_b12_wi1024"
    assert n_params(model) == bottleneck_count(12, 1024, classes=10)
    assert bottleneck_mlp.parse_architecture("B_6-Wi_512-Ex_2") == (6, 512, 2)
    with pytest.raises(shrink.ShrinkError, match="never downloads"):
        shrink.get_bottleneck_mlp("B_6-Wi_512", resolution=64, num_classes=11230, checkpoint="in21k")
    with pytest.raises(shrink.ShrinkError, match="B_<blocks>-Wi_<width>"):
        shrink.get_bottleneck_mlp("B12-Wi1024")
    with pytest.raises(ValueError, match="expects 3x16x16 images"):
        timm.create_model("bottleneck_mlp_nano")(torch.randn(1, 3, 32, 32))


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
    src = timm.create_model("msmlp_nano")
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    original = rename(src.state_dict(), [
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
    src = timm.create_model("ffvit_nano")
    with torch.no_grad():
        for p in src.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    sd = rename(src.state_dict(), [(r"\.mlp_channels\.", ".mlp1."), (r"\.mlp_tokens\.", ".mlp2.")])
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


# ---------------------------------------------------------------------------------------------
# Training configs
# ---------------------------------------------------------------------------------------------

def test_mlp_configs_name_registered_models_and_plain_training():
    from shrink.config import load_yaml

    files = sorted((REPO / "configs" / "mlp").glob("*.yaml"))
    assert len(files) >= 7
    for f in files:
        raw = yaml.safe_load(f.read_text())
        cfg = load_yaml(f)  # the integrator's loader accepts every key
        assert timm.is_model(cfg["model"]), f
        assert raw["remove_ratio"] == 0 and raw["pretrained"] is False, f
        assert cfg["input_size"] == on_meta(cfg["model"]).pretrained_cfg["input_size"][-1], f
        assert {"batch_size", "epochs", "lr"} <= set(raw), f
