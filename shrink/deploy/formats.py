"""The export formats, one registered writer each (``@register_format``), and :func:`deploy`.

    python -m shrink.deploy --checkpoint out/run/best --format onnx --batch-size 32     (the CLI: __main__.py)
    python -m shrink.deploy --checkpoint out/run/best --format pt2 --tome-r 8 --tome-start-idx 1

A writer ``write(prepared_model, path, *, input_size, batch_size, dynamic_batch, verify, **options)
-> metadata`` puts one artefact (and its sidecar JSON) at ``path``; the built-in ones are in
:mod:`shrink.deploy.onnx_export` and :mod:`shrink.deploy.pt2`. A new format is one decorated
function here or in the user's own module (docs/extending.md).
"""
from __future__ import annotations

import os
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from shrink.deploy.metadata import DEPLOY_PACKAGES, prepare_model, require_deploy_extra
from shrink.deploy.onnx_export import export_onnx, read_onnx_metadata
from shrink.deploy.pt2 import read_pt2_metadata, save_program
from shrink.errors import ShrinkError
from shrink.registry import Registry

__all__ = ["FORMATS", "FORMAT_REGISTRY", "ExportFormat", "deploy", "get_format", "read_metadata",
           "register_format", "unregister_format"]


@dataclass(frozen=True)
class ExportFormat:
    """A registered export format."""

    name: str
    write: Callable[..., dict[str, Any]]
    needs: tuple[str, ...] = ()  # packages it needs (checked before the model is prepared)
    options: tuple[str, ...] = ()  # keyword options of :func:`deploy` it takes besides the common ones
    read: Callable[[Path], dict[str, Any]] | None = None  # the metadata inside one of its files
    sniff: Callable[[Path], bool] | None = None  # whether a file is one of its (None: the fallback reader)


FORMAT_REGISTRY: Registry[ExportFormat] = Registry("format")
FORMATS = FORMAT_REGISTRY.names  # argparse choices: every registered name, in order


def register_format(name: str, *, needs: Sequence[str] = (), options: Sequence[str] = (),
                    read: Callable[[Path], dict[str, Any]] | None = None,
                    sniff: Callable[[Path], bool] | None = None):
    """Decorator: ``write(model, path, *, input_size, batch_size, dynamic_batch, verify, **options)`` becomes
    format ``name`` (the file suffix is ``.<name>``); see :class:`ExportFormat` for the rest."""
    def deco(fn):
        FORMAT_REGISTRY.add(name, ExportFormat(name, fn, tuple(needs), tuple(options), read, sniff))
        return fn
    return deco


def get_format(name: str) -> ExportFormat:
    """The format ``name`` (a one-line ShrinkError naming the known ones otherwise)."""
    return FORMAT_REGISTRY.lookup(name)


def unregister_format(name: str) -> None:
    FORMAT_REGISTRY.remove(name)


@register_format("onnx", needs=DEPLOY_PACKAGES, options=("opset",), read=read_onnx_metadata)
def _write_onnx(model: nn.Module, path: Path, *, opset: int | None = None, **common: Any) -> dict[str, Any]:
    return export_onnx(model, path, opset=opset, **common)


@register_format("pt2", read=read_pt2_metadata, sniff=zipfile.is_zipfile)
def _write_pt2(model: nn.Module, path: Path, **common: Any) -> dict[str, Any]:
    return save_program(model, path, **common)


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``shrink.deploy`` metadata stored inside an artefact of any registered format."""
    path = Path(path)
    if not path.is_file():
        raise ShrinkError(f"file not found: {path}")
    readers = [f for f in FORMAT_REGISTRY.values() if f.read is not None and f.sniff is not None and f.sniff(path)]
    readers += [f for f in FORMAT_REGISTRY.values() if f.read is not None and f.sniff is None]
    if not readers:
        raise ShrinkError(f"{path}: no registered format reads it ({', '.join(FORMATS)})")
    return readers[0].read(path)


def deploy(
    model: nn.Module,
    path: str | os.PathLike,
    fmt: str = "onnx",
    *,
    fold: bool = False,
    tome_r: int | None = None,
    tome_start_idx: int = 0,
    tome_policy: str = "none",
    batch_size: int = 1,
    dynamic_batch: bool = True,
    input_size: Sequence[int] | None = None,
    opset: int | None = None,
    verify: bool = True,
) -> dict[str, Any]:
    """:func:`prepare_model`, then the writer of format ``fmt``; returns the metadata.

    ``opset`` goes to formats that take it (onnx) and is ignored by the others."""
    spec = get_format(fmt)
    require_deploy_extra(spec.needs)
    prepared = prepare_model(model, fold=fold, tome_r=tome_r, tome_start_idx=tome_start_idx, tome_policy=tome_policy)
    options = {k: v for k, v in {"opset": opset}.items() if k in spec.options}
    return spec.write(prepared, Path(path), input_size=input_size, batch_size=batch_size,
                      dynamic_batch=dynamic_batch, verify=verify, **options)
