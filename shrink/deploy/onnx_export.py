"""The ONNX format: the dynamo exporter (via torch.export), the graph check, metadata_props, and
ONNX Runtime sessions. Needs the ``deploy`` extra (onnx, onnxruntime, onnxscript), imported on use."""
from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shrink.deploy.check import attention_nodes, summarise
from shrink.deploy.metadata import (
    DEPLOY_PACKAGES,
    INPUT_NAME,
    METADATA_KEY,
    MIN_OPSET,
    OUTPUT_NAME,
    _version,
    deploy_metadata,
    model_input_size,
    require_deploy_extra,
    verify_outputs,
    write_with_sidecar,
)
from shrink.deploy.pt2 import export_program
from shrink.errors import ShrinkError, first_line
from shrink.unwrap import unwrap

__all__ = ["export_onnx", "load_onnx_session", "read_onnx_metadata", "to_onnx"]

_logger = logging.getLogger(__name__)


def _rename_dim(model_proto: Any, old: str, new: str) -> None:
    g = model_proto.graph
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_param") and d.dim_param == old:
                d.dim_param = new


def _sort_stable(self: Any, *, stable: bool | None = None, dim: int = -1, descending: bool = False) -> Any:
    """ONNX for ``aten.sort.stable`` (ToMe's tie-breaking argsort), which torch.onnx does not cover.

    ONNX ``TopK`` with k = the full axis is a stable sort: its spec breaks ties by the lower index
    first, in both directions.
    """
    from onnxscript import opset18 as op

    k = op.Shape(self, start=dim) if dim == -1 else op.Shape(self, start=dim, end=dim + 1)
    values, indices = op.TopK(self, k, axis=dim, largest=1 if descending else 0, sorted=1)
    return values, indices


def translation_table() -> dict[Any, Any]:
    """The ONNX translations shrink adds to the dynamo exporter (a stable sort as TopK, for ToMe)."""
    return {torch.ops.aten.sort.stable: _sort_stable}


def to_onnx(
    model: nn.Module,
    *,
    input_size: Sequence[int] | None = None,
    batch_size: int = 1,
    dynamic_batch: bool = True,
    opset: int | None = None,
) -> Any:
    """The ``onnx.ModelProto`` of a prepared model (dynamo exporter via ``torch.export``, optimised).

    Node metadata keeps the module scopes (``pkg.torch.onnx.name_scopes``, used by
    :func:`attention_nodes`); stack traces (local file paths) are dropped.
    """
    require_deploy_extra()
    if opset is not None and opset < MIN_OPSET:
        raise ShrinkError(f"opset must be >= {MIN_OPSET} for the dynamo exporter, got {opset}")
    model = unwrap(model).eval()
    size = model_input_size(model, input_size)

    def convert(m: nn.Module) -> Any:
        ep = export_program(m, input_size=size, batch_size=batch_size, dynamic_batch=dynamic_batch)
        with contextlib.redirect_stdout(io.StringIO()):  # the exporter reports its steps on stdout
            return torch.onnx.export(ep, (), dynamo=True, optimize=True, verbose=False, opset_version=opset,
                                     input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                     custom_translation_table=translation_table())

    try:
        try:
            program = convert(model)
        except Exception:  # noqa: BLE001
            # torch.onnx cannot lower some timm attentions' fused SDPA (BEiT's and the relative-position
            # ViTs' bias, SAM's windows); their unfused path (the same math) exports
            fused = [m for m in model.modules() if getattr(m, "fused_attn", False) is True]
            if not fused:
                raise
            _logger.info("ONNX: fused attention did not export; exporting the unfused attention path")
            unfused = copy.deepcopy(model)
            for m in unfused.modules():
                if getattr(m, "fused_attn", False) is True:
                    m.fused_attn = False
            program = convert(unfused)
    except Exception as e:  # noqa: BLE001 - the exporter raises many types
        root = e
        while root.__cause__ is not None:
            root = root.__cause__
        first = re.sub(r"\x1b\[[0-9;]*m", "", str(root)).strip().splitlines()
        raise ShrinkError(f"ONNX export failed for {type(model).__name__}: {type(root).__name__}: "
                          f"{first[0] if first else ''}") from e
    proto = program.model_proto
    if dynamic_batch:
        dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
        if dim.HasField("dim_param"):
            _rename_dim(proto, dim.dim_param, "batch")
    for node in proto.graph.node:
        keep = [p for p in node.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
        del node.metadata_props[:]
        node.metadata_props.extend(keep)
    return proto


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    input_size: Sequence[int] | None = None,
    batch_size: int = 1,
    dynamic_batch: bool = True,
    opset: int | None = None,
    verify: bool = True,
    atol: float = 1e-4,
) -> dict[str, Any]:
    """Write a prepared model as one ONNX file (+ sidecar JSON), atomically; returns the metadata.

    ``verify`` runs the file in ONNX Runtime (CPU) against eager PyTorch before it is put in place
    (max abs difference <= ``atol``, recorded under ``verified``). Removed attention layers are
    checked on the graph: none of their nodes may remain (:func:`attention_nodes`).
    """
    import onnx

    path = Path(path)
    model = unwrap(model).eval()
    size = model_input_size(model, input_size)
    proto = to_onnx(model, input_size=size, batch_size=batch_size, dynamic_batch=dynamic_batch, opset=opset)
    opset_used = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    meta = deploy_metadata(model, fmt="onnx", needs=DEPLOY_PACKAGES, input_size=size, batch_size=batch_size,
                           dynamic_batch=dynamic_batch, opset=opset_used)
    left = attention_nodes(proto, meta["removed_attention_layers"])
    if any(left.values()):
        raise ShrinkError(f"the ONNX graph still has attention nodes in removed layers: {summarise(left)}")
    if proto.ByteSize() >= 2**31 - 2**20:
        raise ShrinkError("the model is too large for a single-file ONNX (2 GiB protobuf limit)")

    def write(tmp: Path) -> None:
        if verify:
            session = load_onnx_session(proto.SerializeToString(), providers=["CPUExecutionProvider"])
            meta["verified"] = verify_outputs(model, lambda x: _run_session(session, x), size, batch_size,
                                       dynamic_batch, atol)
        _set_onnx_metadata(proto, meta)
        onnx.save_model(proto, str(tmp))

    write_with_sidecar(path, write, meta)
    return meta


def _set_onnx_metadata(proto: Any, meta: dict[str, Any]) -> None:
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta)
    proto.producer_name = "shrink"
    proto.producer_version = _version("shrink") or ""



def read_onnx_metadata(path: Path) -> dict[str, Any]:
    """The ``shrink.deploy`` metadata_props entry of an ONNX file."""
    require_deploy_extra(("onnx",))
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf decode errors
        raise ShrinkError(f"cannot read {path}: not an ONNX file ({type(e).__name__})") from None
    for p in proto.metadata_props:
        if p.key == METADATA_KEY:
            return json.loads(p.value)
    raise ShrinkError(f"{path}: no {METADATA_KEY} metadata (not written by shrink.deploy)")


def load_onnx_session(
    path: str | os.PathLike | bytes,
    *,
    providers: Sequence[str] | None = None,
    threads: int | None = None,
) -> Any:
    """An ``onnxruntime.InferenceSession`` (all graph optimisations on).

    ``providers`` default: CUDA when onnxruntime has it and a GPU is visible, then CPU.
    ``threads`` sets the intra-op threads (default: onnxruntime's choice, one per physical core).
    """
    require_deploy_extra(("onnxruntime",))
    import onnxruntime as ort

    if isinstance(path, (str, os.PathLike)):
        if not Path(path).is_file():
            raise ShrinkError(f"ONNX file not found: {path}")
        source: Any = str(path)
    else:
        source = path
    available = ort.get_available_providers()
    if providers is None:
        providers = [p for p in ("CUDAExecutionProvider",) if p in available and torch.cuda.is_available()]
        providers.append("CPUExecutionProvider")
    missing = [p for p in providers if p not in available]
    if missing:
        raise ShrinkError(f"onnxruntime has no {', '.join(missing)} (available: {', '.join(available)}); "
                          "for CUDA install onnxruntime-gpu instead of onnxruntime")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if threads is not None:
        if threads < 1:
            raise ShrinkError(f"threads must be >= 1, got {threads}")
        opts.intra_op_num_threads = int(threads)
    try:
        return ort.InferenceSession(source, sess_options=opts, providers=list(providers))
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise ShrinkError(f"onnxruntime cannot load the model: {first_line(e)}") from None


def _run_session(session: Any, x: torch.Tensor) -> torch.Tensor:
    name = session.get_inputs()[0].name
    return torch.from_numpy(session.run(None, {name: x.detach().cpu().numpy()})[0])
