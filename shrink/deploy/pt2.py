"""The torch.export format: ``.pt2`` archives with the metadata as an extra file, and safe loading."""
from __future__ import annotations

import io
import json
import os
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shrink.deploy.metadata import (
    PT2_EXTRA_FILE,
    deploy_metadata,
    example_input,
    model_input_size,
    reset_tome_state,
    verify_outputs,
    write_with_sidecar,
)
from shrink.errors import ShrinkError, first_line
from shrink.unwrap import unwrap

__all__ = ["export_program", "load_program", "read_pt2_metadata", "save_program"]


def export_program(
    model: nn.Module,
    *,
    input_size: Sequence[int] | None = None,
    batch_size: int = 1,
    dynamic_batch: bool = True,
) -> torch.export.ExportedProgram:
    """``torch.export`` of a model prepared with :func:`prepare_model` (input ``(B, C, H, W)``).

    With ``dynamic_batch`` the batch is a symbolic dimension (traced at batch ``max(batch_size, 2)``,
    since torch.export specialises size 1); otherwise it is fixed at ``batch_size``.
    """
    if batch_size < 1:
        raise ShrinkError(f"batch_size must be >= 1, got {batch_size}")
    model = unwrap(model).eval()
    size = model_input_size(model, input_size)
    x = example_input(size, max(batch_size, 2) if dynamic_batch else batch_size, model)
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
    try:
        with torch.no_grad():
            ep = torch.export.export(model, (x,), dynamic_shapes=dynamic_shapes)
    except ShrinkError:
        raise
    except Exception as e:  # noqa: BLE001 - torch.export raises many types; say which model and why
        raise ShrinkError(f"torch.export failed for {type(model).__name__}: {type(e).__name__}: {first_line(e)}") from e
    finally:
        reset_tome_state(model)
    return ep


def save_program(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    input_size: Sequence[int] | None = None,
    batch_size: int = 1,
    dynamic_batch: bool = True,
    verify: bool = True,
    atol: float = 1e-4,
) -> dict[str, Any]:
    """Export ``model`` (prepared) to a ``.pt2`` archive with its metadata, atomically; returns the metadata.

    ``verify`` compares the reloaded program with eager PyTorch before the file is put in place
    (max abs difference <= ``atol``; the value goes into the metadata under ``verified``).
    """
    path = Path(path)
    model = unwrap(model).eval()
    size = model_input_size(model, input_size)
    meta = deploy_metadata(model, fmt="pt2", input_size=size, batch_size=batch_size, dynamic_batch=dynamic_batch)
    ep = export_program(model, input_size=size, batch_size=batch_size, dynamic_batch=dynamic_batch)

    def write(tmp: Path) -> None:
        data = _save_pt2_bytes(ep, meta)
        if verify:  # on the program as it will be loaded, then the result goes into its metadata too
            reloaded, _ = _load_pt2(data)
            meta["verified"] = verify_outputs(model, reloaded.module(), size, batch_size, dynamic_batch, atol)
            data = _replace_pt2_extra(data, meta)
        tmp.write_bytes(data)

    write_with_sidecar(path, write, meta)
    return meta


def _save_pt2_bytes(ep: torch.export.ExportedProgram, meta: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    torch.export.save(ep, buf, extra_files={PT2_EXTRA_FILE: json.dumps(meta)})
    return buf.getvalue()


def _replace_pt2_extra(data: bytes, meta: dict[str, Any]) -> bytes:
    """The same archive with the metadata extra file rewritten (entries copied, not re-serialised)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as src, zipfile.ZipFile(out, "w") as dst:
        for item in src.infolist():
            body = json.dumps(meta).encode() if item.filename.endswith("/extra/" + PT2_EXTRA_FILE) else src.read(item)
            dst.writestr(item, body)
    return out.getvalue()


def _check_pt2_archive(data: bytes, where: str) -> None:
    """Refuse a .pt2 archive that would make torch.export.load unpickle anything but plain tensors."""
    try:
        z = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise ShrinkError(f"{where}: not a .pt2 archive (not a zip file)") from None
    with z:
        names = z.namelist()
        for name in names:
            base = name.rsplit("/", 1)[-1]
            if base.endswith(("_weights_config.json", "_constants_config.json")):
                try:
                    config = json.loads(z.read(name)).get("config", {})
                except (json.JSONDecodeError, AttributeError):
                    raise ShrinkError(f"{where}: damaged payload config {name}") from None
                for fqn, entry in config.items():
                    if not isinstance(entry, dict) or entry.get("use_pickle") or \
                            not str(entry.get("path_name", "")).startswith(("weight_", "tensor_")):
                        raise ShrinkError(f"refused to load {where}: {fqn} is stored as a pickled object "
                                          "(loading it could run code)")
            elif base.endswith(".pt") or "/sample_inputs/" in name:
                try:  # torch.export.load tries weights_only=True first; make sure that attempt succeeds
                    torch.load(io.BytesIO(z.read(name)), map_location="cpu", weights_only=True)
                except Exception:  # noqa: BLE001 - any failure here means torch would fall back to full pickle
                    raise ShrinkError(f"refused to load {where}: {name} holds objects other than tensors") from None


def _load_pt2(data: bytes, where: str = "<pt2>") -> tuple[torch.export.ExportedProgram, dict[str, Any]]:
    _check_pt2_archive(data, where)
    extra = {PT2_EXTRA_FILE: ""}
    try:
        ep = torch.export.load(io.BytesIO(data), extra_files=extra)
    except Exception as e:  # noqa: BLE001 - damaged archives fail in many ways
        raise ShrinkError(f"cannot load {where}: {first_line(e)}") from None
    try:
        meta = json.loads(extra[PT2_EXTRA_FILE]) if extra[PT2_EXTRA_FILE] else {}
    except json.JSONDecodeError:
        meta = {}
    return ep, meta


def load_program(path: str | os.PathLike) -> tuple[torch.export.ExportedProgram, dict[str, Any]]:
    """Load a ``.pt2`` written by :func:`save_program`: (program, metadata).

    torch.export.load can unpickle; archives with pickled payloads or non-tensor objects are
    refused before it runs.
    """
    path = Path(path)
    if not path.is_file():
        raise ShrinkError(f"exported program not found: {path}")
    return _load_pt2(path.read_bytes(), str(path))


def read_pt2_metadata(path: Path) -> dict[str, Any]:
    """The metadata extra file of a ``.pt2`` archive."""
    with zipfile.ZipFile(path) as z:
        name = next((n for n in z.namelist() if n.endswith("/extra/" + PT2_EXTRA_FILE)), None)
        if name is None:
            raise ShrinkError(f"{path}: no {PT2_EXTRA_FILE} in the archive (not written by shrink.deploy)")
        return json.loads(z.read(name))
