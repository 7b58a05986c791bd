"""Checkpoints: DeiT .pth in, strict reports, refused pickles, save/load of shrunk models, atomic dirs."""
from __future__ import annotations

import json
import os

import pytest
import timm
import torch
from safetensors.torch import save_file

import shrink
from shrink.io import atomic_dir

from .conftest import IMG, make_vit


def _deit_pth(tmp_path, model, wrap=True, name="deit.pth"):
    path = tmp_path / name
    sd = model.state_dict()
    torch.save({"model": sd, "epoch": 299} if wrap else sd, path)
    return path


def test_deit_pth_loads_strictly(tmp_path):
    src = timm.create_model("deit_tiny_patch16_224", img_size=IMG)
    path = _deit_pth(tmp_path, src)
    dst = shrink.create_model("deit_tiny_patch16_224", img_size=IMG, checkpoint=path)
    for (k, a), (_, b) in zip(src.state_dict().items(), dst.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    # a bare state dict and a DDP 'module.' prefix work too
    bare = tmp_path / "bare.pth"
    torch.save({f"module.{k}": v for k, v in src.state_dict().items()}, bare)
    dst2 = shrink.create_model("deit_tiny_patch16_224", img_size=IMG, checkpoint=bare)
    assert torch.equal(dst2.pos_embed, src.pos_embed)


def test_safetensors_checkpoint(tmp_path):
    src = timm.create_model("deit_tiny_patch16_224", img_size=IMG)
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in src.state_dict().items()}, str(path))
    dst = shrink.create_model("deit_tiny_patch16_224", img_size=IMG, checkpoint=path)
    assert torch.equal(dst.head.weight, src.head.weight)


def test_wrong_architecture_names_keys(tmp_path):
    path = _deit_pth(tmp_path, timm.create_model("deit_small_patch16_224", img_size=IMG))
    with pytest.raises(shrink.ShrinkError) as e:
        shrink.create_model("deit_tiny_patch16_224", img_size=IMG, checkpoint=path)
    msg = str(e.value)
    assert "\n" not in msg and "shape mismatch" in msg and "blocks.0.attn.qkv.weight" in msg
    path2 = _deit_pth(tmp_path, timm.create_model("deit_tiny_patch16_224", img_size=IMG, depth=10), name="d10.pth")
    with pytest.raises(shrink.ShrinkError, match=r"missing \d+: blocks\.10\."):
        shrink.create_model("deit_tiny_patch16_224", img_size=IMG, checkpoint=path2)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch EVIL_MARKER",))


def test_malicious_pickle_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "payload": _Evil()}, path)
    with pytest.raises(shrink.ShrinkError, match="refused"):
        shrink.read_checkpoint(path)
    assert not (tmp_path / "EVIL_MARKER").exists()


def test_unreadable_and_missing_files(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(shrink.ShrinkError, match="cannot read"):
        shrink.read_checkpoint(junk)
    bad_st = tmp_path / "junk.safetensors"
    bad_st.write_bytes(b"\x00" * 20)
    with pytest.raises(shrink.ShrinkError, match="cannot read"):
        shrink.read_checkpoint(bad_st)
    with pytest.raises(shrink.ShrinkError, match="not found"):
        shrink.read_checkpoint(tmp_path / "nope.pth")


def test_pos_embed_resampled_and_head_reinitialised(tmp_path):
    src = timm.create_model("deit_tiny_patch16_224", img_size=IMG)  # 4x4 grid, 1000 classes
    path = _deit_pth(tmp_path, src)
    dst = shrink.create_model("deit_tiny_patch16_224", img_size=96, num_classes=10, checkpoint=path)
    assert dst.pos_embed.shape == (1, 1 + 36, 192)
    assert torch.equal(dst.pos_embed[:, 0], src.pos_embed[:, 0])  # class token position kept
    assert dst.head.weight.shape == (10, 192)
    assert torch.equal(dst.blocks[3].mlp.fc1.weight, src.blocks[3].mlp.fc1.weight)
    report = shrink.load_checkpoint(dst, path)
    assert set(report["reinitialised"]) == {"head.weight", "head.bias"}


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


def test_atomic_dir_keeps_old_on_failure(tmp_path):
    target = tmp_path / "d"
    atomic_dir(target, lambda p: (p / "a.txt").write_text("old"))

    def broken(p):
        (p / "a.txt").write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_dir(target, broken)
    assert (target / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["d"]  # no temp dirs left behind
