"""Files for tests/cli/test_bad_input.py: saved models damaged in every way, hostile pickles, odd folders.

Every builder takes the case's folder ``t`` (a Path) and creates what the case needs inside it; the
test snapshots ``t`` before and after the run. A hostile pickle touches ``t / MARKER`` when executed.
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

MARKER = "HOSTILE_CODE_RAN"
_TEMPLATE: dict[str, Path] = {}


class Evil:
    """Unpickling this runs ``touch <marker>``: any loader that executes pickled code leaves the marker."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def template_dir(root: Path) -> Path:
    """A vit_digits model saved with shrink.save (random weights), built once per test session."""
    if "saved" not in _TEMPLATE:
        import shrink

        torch.manual_seed(0)
        shrink.save(shrink.create_model("vit_digits"), root / "saved_template")
        _TEMPLATE["saved"] = root / "saved_template"
    return _TEMPLATE["saved"]


def saved_model(t: Path, root: Path, name: str = "saved") -> Path:
    dst = t / name
    shutil.copytree(template_dir(root), dst)
    return dst


def edit_config(d: Path, **changes) -> Path:
    cfg = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is _DELETE:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))
    return d


_DELETE = object()


def delete() -> object:
    return _DELETE


def edit_weights(d: Path, fn) -> Path:
    sd = load_file(str(d / "model.safetensors"))
    sd = fn(sd)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "model.safetensors"))
    return d


def first_float_key(sd: dict[str, torch.Tensor]) -> str:
    return next(k for k, v in sd.items() if v.is_floating_point() and v.dim() == 2)


def nan_weights(sd):
    k = first_float_key(sd)
    sd[k] = sd[k].clone()
    sd[k][0, 0] = float("nan")
    return sd


def int_weights(sd):
    k = first_float_key(sd)
    sd[k] = sd[k].to(torch.int32)
    return sd


def bool_weights(sd):
    k = first_float_key(sd)
    sd[k] = sd[k] > 0
    return sd


def huge_header(path: Path) -> None:
    """A safetensors file whose header claims a 10^12-element tensor backed by 16 bytes."""
    header = json.dumps({"pos_embed": {"dtype": "F32", "shape": [1000000, 1000000], "data_offsets": [0, 16]}})
    header += " " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + b"\0" * 16)


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def evil_pickle(path: Path, marker: Path) -> Path:
    torch.save({"model": {"w": torch.zeros(1)}, "payload": Evil(marker)}, str(path))
    return path


def nan_pth(t: Path, root: Path) -> Path:
    sd = load_file(str(template_dir(root) / "model.safetensors"))
    sd = nan_weights(sd)
    torch.save({"model": sd}, str(t / "nan.pth"))
    return t / "nan.pth"


def image_folder(t: Path, train_classes=("a", "b"), val_classes=("a", "b"), name: str = "data") -> Path:
    from PIL import Image

    root = t / name
    for split, classes in (("train", train_classes), ("val", val_classes)):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            Image.new("RGB", (16, 16), (10, 20, 30)).save(root / split / c / "0.png")
    return root


def fake_run(t: Path, **settings) -> Path:
    """An output folder that looks like a run: config.yaml, state/trainer_state.json, summary.json."""
    import yaml

    from shrink.training.config import RunConfig

    out = t / "run"
    (out / "state").mkdir(parents=True)
    cfg = RunConfig(output_dir=str(out), **settings).to_dict()
    (out / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (out / "state" / "trainer_state.json").write_text(json.dumps({"epoch": 0, "layers": [0, 1]}))
    return out
