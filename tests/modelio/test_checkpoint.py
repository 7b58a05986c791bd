"""shrink.modelio.checkpoint: reading weights files (.pth, safetensors, hostile pickles) and load_checkpoint."""
from __future__ import annotations

import os

import pytest
import timm
import torch
from safetensors.torch import save_file

import shrink

from ..conftest import IMG


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
