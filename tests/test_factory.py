"""shrink.factory: create_model, save / load round trips, pretrained weights without network."""
from __future__ import annotations

import json

import pytest
import timm
import torch

import shrink

from .conftest import IMG, make_vit


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
