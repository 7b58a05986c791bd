"""shrink.modelio.create: create_model, save / load round trips, pretrained weights without network."""
from __future__ import annotations

import json

import pytest
import timm
import torch

import shrink

from ..conftest import IMG, make_vit


@pytest.mark.parametrize("variant", ["deit_tiny", "deit3_small", "deit_tiny_distilled"])
def test_save_load_roundtrip(tmp_path, images, variant):
    m = make_vit(variant)
    m.shrink_arch = {"name": {"deit_tiny": "deit_tiny_patch16_224", "deit3_small": "deit3_small_patch16_224",
                              "deit_tiny_distilled": "deit_tiny_distilled_patch16_224"}[variant],
                     "kwargs": {"img_size": IMG}}
    shrink.dilute(m, [0, 2, 4], lam=0.0)
    small = shrink.export(m)
    with torch.no_grad():
        want = small(images)
    shrink.save(small, tmp_path / "best")
    assert sorted(p.name for p in (tmp_path / "best").iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((tmp_path / "best" / "config.json").read_text())
    assert cfg["attention_free_blocks"] == [0, 2, 4] and cfg["folded"] is False
    back = shrink.load(tmp_path / "best")
    with torch.no_grad():
        assert torch.equal(back(images), want)
    assert sum(p.numel() for p in back.parameters()) == sum(p.numel() for p in small.parameters())


def test_save_load_folded_and_diluted(tmp_path, images):
    m = shrink.create_model("deit_tiny_patch16_224", img_size=IMG)
    shrink.dilute(m, [1, 3], lam=0.4)
    shrink.save(m, tmp_path / "diluted")
    back = shrink.load(tmp_path / "diluted")
    assert shrink.get_lambda(back) == pytest.approx(0.4)
    folded = shrink.export(m, fold=True)
    shrink.save(folded, tmp_path / "folded")
    back_f = shrink.load(tmp_path / "folded")
    with torch.no_grad():
        assert torch.equal(back(images), m(images))
        assert torch.equal(back_f(images), folded(images))
    assert json.loads((tmp_path / "folded" / "config.json").read_text())["folded"] is True


def test_save_infers_architecture_of_plain_timm_model(tmp_path, images):
    m = timm.create_model("deit_tiny_patch16_224", img_size=IMG, num_classes=7).eval()
    shrink.save(m, tmp_path / "m")
    back = shrink.load(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(back(images), m(images))


def test_load_errors(tmp_path):
    with pytest.raises(shrink.ShrinkError, match="not found"):
        shrink.load(tmp_path / "missing")
    (tmp_path / "x").mkdir()
    with pytest.raises(shrink.ShrinkError, match="config.json is missing"):
        shrink.load(tmp_path / "x")
    with pytest.raises(shrink.ShrinkError, match="unknown model"):
        shrink.create_model("no_such_model_anywhere")


def test_pretrained_without_network_fails_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(shrink.ShrinkError, match="pretrained weights"):
        shrink.create_model("deit_tiny_patch16_224", pretrained=True)


def test_embedded_model_pretrained_is_local():
    m = shrink.create_model("vit_digits", pretrained=True)
    assert len(m.blocks) == 12
    sd = shrink.read_checkpoint(m.pretrained_cfg["file"])
    assert torch.equal(m.head.weight, sd["head.weight"])


# --- issue 19.3: every argument a model was built with goes into config.json and comes back ---------------

SMALL = dict(depth=2, embed_dim=64, num_heads=2)
KWARG_MODELS = {
    "vit_options": ("vit_small_patch16_224", dict(qk_norm=True, init_values=1e-5, reg_tokens=2, class_token=False,
                                                  global_pool="avg", img_size=32, patch_size=8, num_classes=5,
                                                  **SMALL)),
    "vit_mlp_ratio_no_qkv_bias": ("vit_base_patch16_224", dict(img_size=48, patch_size=16, mlp_ratio=2.0,
                                                               qkv_bias=False, no_embed_class=True, **SMALL)),
    "eva02": ("eva02_tiny_patch14_224", dict(img_size=28, **SMALL)),
    "beit": ("beit_base_patch16_224", dict(img_size=32, use_shared_rel_pos_bias=True, use_rel_pos_bias=False,
                                           **SMALL)),
    "cait": ("cait_xxs24_224", dict(img_size=32, depth_token_only=1, **SMALL)),
}


@pytest.mark.parametrize("case", sorted(KWARG_MODELS))
def test_a_model_built_with_keyword_arguments_saves_and_loads_exactly(tmp_path, case):
    name, kwargs = KWARG_MODELS[case]
    torch.manual_seed(0)
    m = timm.create_model(name, **kwargs).eval()  # timm's own factory, not shrink's: timm records the kwargs
    x = torch.randn(2, 3, *m.pretrained_cfg["input_size"][1:]) if "img_size" not in kwargs else \
        torch.randn(2, 3, kwargs["img_size"], kwargs["img_size"])
    shrink.save(m, tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    for k, v in kwargs.items():
        assert saved["model_kwargs"][k] in (v, [v, v]), k
    assert saved["data_config"]["input_size"][1:] == list(x.shape[2:])
    back = shrink.load(tmp_path / "m")
    assert type(back) is type(m)
    with torch.no_grad():
        assert (back(x) - m(x)).abs().max().item() == 0.0


def test_shrink_create_model_and_a_new_head_are_recorded(tmp_path):
    m = shrink.create_model("vit_small_patch16_224", qk_norm=True, img_size=32, **SMALL).eval()
    m.reset_classifier(3)  # after construction: timm's recorded arguments follow it
    shrink.save(m, tmp_path / "m")
    back = shrink.load(tmp_path / "m")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert back.num_classes == 3 and (back(x) - m(x)).abs().max().item() == 0.0


def test_a_model_whose_arguments_are_unknown_is_refused_at_save(tmp_path):
    from timm.models.vision_transformer import VisionTransformer

    direct = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)
    with pytest.raises(shrink.ShrinkError, match="cannot tell how this VisionTransformer was built") as info:
        shrink.save(direct, tmp_path / "a")
    assert "\n" not in str(info.value)
    changed = timm.create_model("vit_small_patch16_224", img_size=32, **SMALL)
    changed.blocks = changed.blocks[:1]  # changed after it was built, in a way no argument records
    with pytest.raises(shrink.ShrinkError, match="do not rebuild it"):
        shrink.save(changed, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_the_saved_data_config_is_the_model_as_built(tmp_path):
    """A ViT built at 64 px keeps timm's 224 px pretrained_cfg; config.json and the loaded model say 64."""
    from timm.data import resolve_data_config

    m = shrink.create_model("deit_tiny_patch16_224", img_size=64)
    assert m.pretrained_cfg["input_size"] == (3, 224, 224)  # timm's own record
    shrink.save(m, tmp_path / "m")
    data = json.loads((tmp_path / "m" / "config.json").read_text())["data_config"]
    assert data["input_size"] == [3, 64, 64] and data["crop_pct"] == m.pretrained_cfg["crop_pct"]
    assert data["mean"] == list(m.pretrained_cfg["mean"]) and data["interpolation"] == "bicubic"
    back = shrink.load(tmp_path / "m")
    assert resolve_data_config({}, model=back)["input_size"] == (3, 64, 64)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    for bad in ({"input_size": [3, 0, 64]}, {"std": [0.0, 1.0, 1.0]}, {"crop_pct": 0}, {"mean": "x"}):
        cfg["data_config"] = {**data, **bad}
        (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(shrink.ShrinkError, match="data_config"):
            shrink.load(tmp_path / "m")


def test_on_a_timm_without_its_argument_record_a_timm_model_still_saves(tmp_path, monkeypatch):
    """pyproject allows timm >= 1.0.3, which has no get_model_args: what the model shows is recorded,
    and save's rebuild check refuses what that cannot describe."""
    m = timm.create_model("deit_tiny_patch16_224", img_size=32, num_classes=4, global_pool="avg", depth=2).eval()
    del m._model_args
    monkeypatch.delattr(timm.models, "get_model_args")
    with pytest.raises(shrink.ShrinkError, match="do not rebuild it"):  # depth=2 is not visible
        shrink.save(m, tmp_path / "deep")
    m = timm.create_model("deit_tiny_patch16_224", img_size=32, num_classes=4, global_pool="avg").eval()
    del m._model_args
    shrink.save(m, tmp_path / "m")
    back, x = shrink.load(tmp_path / "m"), torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert (back(x) - m(x)).abs().max().item() == 0.0


def test_the_modelio_split_keeps_one_function_per_name():
    """create / saved / schema: the public names answer from shrink.modelio.create as before, as the same
    objects; input_size is shrink.introspect's (old keyword img_size= included); a model argument
    config.json cannot hold is refused in one line."""
    import shrink.introspect
    import shrink.modelio as modelio
    from shrink.modelio import create, saved, schema

    for name in ("save", "load", "build_from_config", "describe_architecture", "check_input_size"):
        assert getattr(create, name) is getattr(saved, name) is getattr(modelio, name)
    for name in ("FORMAT", "MODEL_FILE", "CONFIG_FILE", "MAX_PARAMS", "read_config", "validate_config"):
        assert getattr(create, name) is getattr(schema, name) is getattr(modelio, name)
    assert create.input_size is shrink.introspect.input_size is modelio.input_size
    model = timm.create_model("vit_tiny_patch16_224", img_size=64)
    assert create.input_size(model) == (3, 64, 64) and create.input_size(model, img_size=32) == (3, 32, 32)
    with pytest.raises(shrink.ShrinkError, match="model argument norm_layer=.* cannot be stored as JSON"):
        create.model_skeleton("vit_tiny_patch16_224", norm_layer=torch.nn.LayerNorm)
