"""What every export format shares: the optional extra, preparing a model, its metadata, example
inputs, the check against eager PyTorch, and writing an artefact with its sidecar JSON."""
from __future__ import annotations

import copy
import importlib.util
import json
import sys
from collections.abc import Sequence
from importlib import metadata as _pkg_metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shrink.blocks.attention_free import attention_free_indices, export, fold_residual_scale, is_folded
from shrink.blocks.dilution import DilutedBlock, get_blocks
from shrink.errors import ShrinkError
from shrink.introspect import input_size as _input_size
from shrink.io import atomic_write, jsonable
from shrink.unwrap import unwrap

__all__ = ["DEPLOY_PACKAGES", "INPUT_NAME", "METADATA_KEY", "MIN_OPSET", "OUTPUT_NAME", "PT2_EXTRA_FILE", "SCHEMA",
           "deploy_metadata", "example_input", "max_abs_diff", "model_input_size", "prepare_model",
           "require_deploy_extra", "reset_tome_state", "sidecar_path", "verify_outputs", "write_with_sidecar"]

SCHEMA = "shrink.deploy/1"
METADATA_KEY = "shrink.deploy"  # ONNX metadata_props key / .pt2 extra file stem
PT2_EXTRA_FILE = "shrink.deploy.json"
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
MIN_OPSET = 18  # the dynamo exporter's lowest supported opset
DEPLOY_PACKAGES = ("onnx", "onnxruntime", "onnxscript")  # the ``deploy`` extra


def require_deploy_extra(packages: Sequence[str] = DEPLOY_PACKAGES) -> None:
    """Raise a one-line ShrinkError when a package of the ``deploy`` extra is not installed."""
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if missing:
        raise ShrinkError(f"ONNX export/runtime needs {', '.join(missing)}: pip install -e \".[deploy]\" "
                          f"(or pip install {' '.join(missing)})")



def prepare_model(
    model: nn.Module,
    *,
    fold: bool = False,
    tome_r: int | None = None,
    tome_start_idx: int = 0,
    tome_policy: str = "none",
) -> nn.Module:
    """A deployable copy of ``model`` in eval mode; ``model`` itself is not changed.

    Diluted blocks at lambda = 0 become attention-free blocks (:func:`shrink.export`, outputs
    equal); a diluted block with lambda > 0 is refused (its lambda = 0 form computes something
    else). ``fold`` folds the factor 2 (:func:`shrink.fold_residual_scale`); ``tome_r`` applies ToMe
    with a fixed r per block (a model that already has ToMe keeps it).
    """
    from shrink.merging import patch as tome

    base = unwrap(model)
    out = copy.deepcopy(base).eval()
    try:
        blocks = get_blocks(out)
    except ShrinkError:
        blocks = None
    if blocks is not None:
        live = {i: b.lambda_value for i, b in enumerate(blocks) if isinstance(b, DilutedBlock) and b.lambda_value != 0.0}
        if live:
            raise ShrinkError(f"diluted blocks {sorted(live)} have lambda {sorted(set(live.values()))} != 0: only the "
                              "lambda = 0 (deployable) model can be exported; finish training or call shrink.export")
        if any(isinstance(b, DilutedBlock) for b in blocks):
            had_tome = tome.is_tome(out)
            info = tome.tome_info(out) if had_tome else None
            if had_tome:
                tome.remove_tome(out)
            out = export(out, inplace=True)
            if info is not None:
                tome.apply_tome(out, info["r"], start_idx=info["start_idx"], policy=info["policy"],
                                prop_attn=info.get("prop_attn", True))
    if fold:
        if blocks is not None and tome.is_tome(out):
            raise ShrinkError("fold before applying ToMe: pass fold=True with tome_r instead of a ToMe model")
        fold_residual_scale(out)
    if tome_r is not None:
        if blocks is None:
            raise ShrinkError(f"ToMe needs a ViT with a token sequence; {type(out).__name__} has no blocks")
        if tome.is_tome(out):
            raise ShrinkError("the model already has ToMe applied; do not pass tome_r as well")
        tome.apply_tome(out, tome_r, start_idx=tome_start_idx, policy=tome_policy)
    if blocks is not None and tome.is_tome(out) and tome.tome_state(out).trace_source:
        raise ShrinkError("ToMe with trace_source=True cannot be exported (the source map is a visualisation aid)")
    return out.eval()



def model_input_size(model: nn.Module, input_size: Sequence[int] | None = None) -> tuple[int, int, int]:
    """(C, H, W) of one image: ``input_size`` if given, else the size the model was built for
    (:func:`shrink.introspect.input_size`)."""
    if input_size is not None and (isinstance(input_size, (str, bytes)) or len(input_size) != 3):
        raise ShrinkError(f"input_size must be (C, H, W) with positive sizes, got {input_size!r}")
    try:
        return _input_size(unwrap(model), None if input_size is None else tuple(input_size))
    except ShrinkError:
        raise ShrinkError(f"input_size must be (C, H, W) with positive sizes, got {input_size!r}") from None


def _version(pkg: str) -> str | None:
    try:
        return _pkg_metadata.version(pkg)
    except _pkg_metadata.PackageNotFoundError:
        return None



def deploy_metadata(
    model: nn.Module,
    *,
    fmt: str,
    input_size: Sequence[int],
    batch_size: int,
    dynamic_batch: bool,
    opset: int | None = None,
    needs: Sequence[str] = (),
) -> dict[str, Any]:
    """What a user of the artefact needs: preprocessing, classes, removed layers, ToMe, batch.

    ``needs``: the packages the format needs, whose versions the artefact records."""
    from timm.data import resolve_data_config

    from shrink.merging import patch as tome
    from shrink.modelio.saved import describe_architecture

    m = unwrap(model)
    c, h, w = (int(v) for v in input_size)
    data = resolve_data_config({}, model=m)
    try:
        arch = describe_architecture(m)
    except ShrinkError:
        arch = {"architecture": type(m).__name__}
    try:
        free = attention_free_indices(m)
    except ShrinkError:
        free = []
    tome_meta = None
    if tome.is_tome(m):
        info = tome.tome_info(m) or {}
        tome_meta = {"r": info.get("r"), "start_idx": info.get("start_idx"), "policy": info.get("policy"),
                     "prop_attn": info.get("prop_attn"), "r_per_block": info.get("schedule"),
                     "tokens_per_block": tome.tome_token_counts(m, (c, h, w))}
    return jsonable({
        "schema": SCHEMA,
        "format": fmt,
        "architecture": arch.get("architecture"),
        "model_kwargs": arch.get("model_kwargs"),
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "input_size": [c, h, w],
        "input_layout": "NCHW float32, normalised with mean/std",
        "mean": list(data.get("mean", ())),
        "std": list(data.get("std", ())),
        "interpolation": data.get("interpolation"),
        "crop_pct": data.get("crop_pct"),
        "crop_mode": data.get("crop_mode"),
        "num_classes": int(getattr(m, "num_classes", 0) or 0),
        "removed_attention_layers": free,
        "folded": bool(free) and is_folded(m),
        "tome": tome_meta,
        "batch": {"dynamic": bool(dynamic_batch), "size": None if dynamic_batch else int(batch_size),
                  "example": int(batch_size)},
        "opset": opset,
        "exported_with": {"torch": torch.__version__, "timm": _version("timm"), "shrink": _version("shrink"),
                          **{p: _version(p) if p in needs else None for p in ("onnx", "onnxscript")}},
    })


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")



def example_input(size: Sequence[int], batch: int, model: nn.Module, seed: int = 0) -> torch.Tensor:
    p = next(iter(model.parameters()), None)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *size, generator=gen)
    return x.to(device=p.device, dtype=p.dtype) if p is not None else x


def reset_tome_state(model: nn.Module) -> None:
    """Tracing leaves fake tensors in the ToMe state; the next eager forward would reset it anyway."""
    from shrink.merging import patch as tome

    if tome.is_tome(model):
        st = tome.tome_state(model)
        st.size = None
        st.source = None
        st.tracked = {}  # per-token positions / members (shrink.merging.rope, shrink.merging.relpos)
        st.last_block = sys.maxsize



def verify_outputs(model: nn.Module, run, size: Sequence[int], batch_size: int, dynamic_batch: bool,
            atol: float) -> dict[str, Any]:
    batches = sorted({batch_size, 1, batch_size + 1}) if dynamic_batch else [batch_size]
    worst = 0.0
    for i, b in enumerate(batches):
        x = example_input(size, b, model, seed=1 + i)
        with torch.no_grad():
            ref = model(x).float().cpu()
            got = run(x).float().cpu()
        if got.shape != ref.shape:
            raise ShrinkError(f"exported output shape {tuple(got.shape)} != eager {tuple(ref.shape)} at batch {b}")
        worst = max(worst, float((got - ref).abs().max()))
    if not worst <= atol:
        raise ShrinkError(f"exported model differs from eager PyTorch: max abs diff {worst:.3g} > {atol:g}")
    return {"max_abs_diff": worst, "atol": atol, "batches": batches}


def max_abs_diff(model: nn.Module, run, x: torch.Tensor) -> float:
    """max |run(x) - model(x)| in fp32, for any callable ``run`` (exported program, ONNX session)."""
    with torch.no_grad():
        ref = unwrap(model).eval()(x).float().cpu()
        got = run(x)
    got = torch.as_tensor(got).float().cpu()
    return float((got - ref).abs().max())


def write_with_sidecar(path: Path, write, meta: dict[str, Any]) -> None:
    """Artefact and sidecar JSON: each atomic; the artefact goes in place first, and if anything
    fails before both are written, neither is changed."""
    sidecar = sidecar_path(path)

    def write_sidecar(tmp_side: Path) -> None:
        atomic_write(path, write)  # verification runs in here, before the rename
        tmp_side.write_text(json.dumps(meta, indent=2) + "\n")

    atomic_write(sidecar, write_sidecar)

