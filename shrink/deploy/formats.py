"""The export formats (ONNX, torch.export .pt2): building, checking and writing them, with metadata.

    python -m shrink.deploy --checkpoint out/run/best --format onnx --batch-size 32     (the CLI: __main__.py)
    python -m shrink.deploy --checkpoint out/run/best --format pt2 --tome-r 8 --tome-start-idx 1

Works for dense timm ViTs, diluted models at lambda = 0 (exported to attention-free blocks
first), attention-free models with or without the folded factor, and token-merged models (ToMe
with a fixed r per block, so every shape is static except the batch). The batch dimension is
dynamic unless ``dynamic_batch=False`` / ``--static-batch``.

Every artefact carries its metadata (schema ``shrink.deploy/1``: input size, mean/std,
interpolation, class count, removed layers, folding, ToMe settings and tokens per block, batch)
inside the file (ONNX ``metadata_props`` key ``shrink.deploy``; the .pt2 archive's extra file
``shrink.deploy.json``) and in a sidecar ``<file>.json``.

ONNX needs the optional ``deploy`` extra (``pip install -e ".[deploy]"``: onnx, onnxruntime,
onnxscript); ``import shrink`` and the .pt2 path never need it.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import json
import logging
import os
import re
import sys
import zipfile
from collections.abc import Sequence
from importlib import metadata as _pkg_metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shrink.blocks.attention_free import attention_free_indices, export, fold_residual_scale, is_folded
from shrink.blocks.contract import removed_names
from shrink.blocks.dilution import DilutedBlock, get_blocks
from shrink.errors import ShrinkError
from shrink.io import atomic_write
from shrink.modelio.create import input_size as factory_input_size
from shrink.unwrap import unwrap

_logger = logging.getLogger(__name__)

SCHEMA = "shrink.deploy/1"
FORMATS = ("onnx", "pt2")
METADATA_KEY = "shrink.deploy"  # ONNX metadata_props key / .pt2 extra file stem
PT2_EXTRA_FILE = "shrink.deploy.json"
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
MIN_OPSET = 18  # the dynamo exporter's lowest supported opset
ATTENTION_OPS = ("Softmax", "Attention", "MultiHeadAttention", "GroupQueryAttention")
_REMOVED_PARTS = removed_names()  # what the block contract removes, every family
_DEPLOY_PACKAGES = ("onnx", "onnxruntime", "onnxscript")


# --------------------------------------------------------------------------------------------------
# The optional extra
# --------------------------------------------------------------------------------------------------

def require_deploy_extra(packages: Sequence[str] = _DEPLOY_PACKAGES) -> None:
    """Raise a one-line ShrinkError when a package of the ``deploy`` extra is not installed."""
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if missing:
        raise ShrinkError(f"ONNX export/runtime needs {', '.join(missing)}: pip install -e \".[deploy]\" "
                          f"(or pip install {' '.join(missing)})")


# --------------------------------------------------------------------------------------------------
# Preparing a model for deployment, and its metadata
# --------------------------------------------------------------------------------------------------

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
    """(C, H, W) of one image: ``input_size`` if given, else what timm's data config resolves."""
    if input_size is not None:
        size = tuple(int(v) for v in input_size)
        if len(size) != 3 or min(size) < 1:
            raise ShrinkError(f"input_size must be (C, H, W) with positive sizes, got {input_size!r}")
        return size  # type: ignore[return-value]

    return tuple(int(v) for v in factory_input_size(unwrap(model)))  # type: ignore[return-value]


def _version(pkg: str) -> str | None:
    try:
        return _pkg_metadata.version(pkg)
    except _pkg_metadata.PackageNotFoundError:
        return None


def _jsonable(v: Any) -> Any:
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


def deploy_metadata(
    model: nn.Module,
    *,
    fmt: str,
    input_size: Sequence[int],
    batch_size: int,
    dynamic_batch: bool,
    opset: int | None = None,
) -> dict[str, Any]:
    """What a user of the artefact needs: preprocessing, classes, removed layers, ToMe, batch."""
    from timm.data import resolve_data_config

    from shrink.merging import patch as tome
    from shrink.modelio.create import describe_architecture

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
    return _jsonable({
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
                          "onnx": _version("onnx") if fmt == "onnx" else None,
                          "onnxscript": _version("onnxscript") if fmt == "onnx" else None},
    })


def sidecar_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


# --------------------------------------------------------------------------------------------------
# torch.export
# --------------------------------------------------------------------------------------------------

def _example_input(size: Sequence[int], batch: int, model: nn.Module, seed: int = 0) -> torch.Tensor:
    p = next(iter(model.parameters()), None)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *size, generator=gen)
    return x.to(device=p.device, dtype=p.dtype) if p is not None else x


def _reset_tome_state(model: nn.Module) -> None:
    """Tracing leaves fake tensors in the ToMe state; the next eager forward would reset it anyway."""
    from shrink.merging import patch as tome

    if tome.is_tome(model):
        st = tome.tome_state(model)
        st.size = None
        st.source = None
        st.tracked = {}  # per-token positions / members (shrink.merging.rope, shrink.merging.relpos)
        st.last_block = sys.maxsize


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
    x = _example_input(size, max(batch_size, 2) if dynamic_batch else batch_size, model)
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
    try:
        with torch.no_grad():
            ep = torch.export.export(model, (x,), dynamic_shapes=dynamic_shapes)
    except ShrinkError:
        raise
    except Exception as e:  # noqa: BLE001 - torch.export raises many types; say which model and why
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ShrinkError(f"torch.export failed for {type(model).__name__}: {type(e).__name__}: {first}") from e
    finally:
        _reset_tome_state(model)
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
            meta["verified"] = _verify(model, reloaded.module(), size, batch_size, dynamic_batch, atol)
            data = _replace_pt2_extra(data, meta)
        tmp.write_bytes(data)

    _write_with_sidecar(path, write, meta)
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
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ShrinkError(f"cannot load {where}: {first}") from None
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


# --------------------------------------------------------------------------------------------------
# ONNX
# --------------------------------------------------------------------------------------------------

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


def _translation_table() -> dict[Any, Any]:
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
                                     custom_translation_table=_translation_table())

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
    meta = deploy_metadata(model, fmt="onnx", input_size=size, batch_size=batch_size,
                           dynamic_batch=dynamic_batch, opset=opset_used)
    left = attention_nodes(proto, meta["removed_attention_layers"])
    if any(left.values()):
        raise ShrinkError(f"the ONNX graph still has attention nodes in removed layers: {_summarise(left)}")
    if proto.ByteSize() >= 2**31 - 2**20:
        raise ShrinkError("the model is too large for a single-file ONNX (2 GiB protobuf limit)")

    def write(tmp: Path) -> None:
        if verify:
            session = load_onnx_session(proto.SerializeToString(), providers=["CPUExecutionProvider"])
            meta["verified"] = _verify(model, lambda x: _run_session(session, x), size, batch_size,
                                       dynamic_batch, atol)
        _set_onnx_metadata(proto, meta)
        onnx.save_model(proto, str(tmp))

    _write_with_sidecar(path, write, meta)
    return meta


def _set_onnx_metadata(proto: Any, meta: dict[str, Any]) -> None:
    del proto.metadata_props[:]
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta)
    proto.producer_name = "shrink"
    proto.producer_version = _version("shrink") or ""


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The ``shrink.deploy`` metadata stored inside an ONNX or .pt2 artefact."""
    path = Path(path)
    if not path.is_file():
        raise ShrinkError(f"file not found: {path}")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            name = next((n for n in z.namelist() if n.endswith("/extra/" + PT2_EXTRA_FILE)), None)
            if name is None:
                raise ShrinkError(f"{path}: no {PT2_EXTRA_FILE} in the archive (not written by shrink.deploy)")
            return json.loads(z.read(name))
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
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ShrinkError(f"onnxruntime cannot load the model: {first}") from None


def _run_session(session: Any, x: torch.Tensor) -> torch.Tensor:
    name = session.get_inputs()[0].name
    return torch.from_numpy(session.run(None, {name: x.detach().cpu().numpy()})[0])


# --------------------------------------------------------------------------------------------------
# Checks: equal outputs, no attention in removed layers
# --------------------------------------------------------------------------------------------------

def _verify(model: nn.Module, run, size: Sequence[int], batch_size: int, dynamic_batch: bool,
            atol: float) -> dict[str, Any]:
    batches = sorted({batch_size, 1, batch_size + 1}) if dynamic_batch else [batch_size]
    worst = 0.0
    for i, b in enumerate(batches):
        x = _example_input(size, b, model, seed=1 + i)
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


def _scopes(node: Any) -> list[str]:
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            try:
                return [str(s) for s in json.loads(p.value.replace("'", '"'))]
            except json.JSONDecodeError:
                return re.findall(r"'([^']*)'", p.value)
    return []


_BLOCK_RE = re.compile(r"(?:^|\.)blocks\.(\d+)(?:\.(\w+))?")


def attention_nodes(model_proto: Any, layers: Sequence[int] | None = None) -> dict[int, list[str]]:
    """Attention nodes per block of an exported ONNX graph: ``{block: ["OpType name", ...]}``.

    A node counts as attention of block i when its module scope is inside ``blocks.i.attn`` /
    ``.norm1`` / ``.ls1`` (the removed sublayer), or when it is an attention operator (Softmax,
    Attention, MultiHeadAttention) anywhere in ``blocks.i``. ``layers`` limits the blocks reported.
    A graph whose nodes carry no module scopes raises (the check would pass vacuously).
    """
    nodes = list(model_proto.graph.node)
    if nodes and not any(_scopes(n) for n in nodes):
        raise ShrinkError("the ONNX graph carries no module scopes (pkg.torch.onnx.name_scopes): cannot "
                          "attribute nodes to blocks")
    wanted = None if layers is None else {int(i) for i in layers}
    out: dict[int, list[str]] = {i: [] for i in sorted(wanted)} if wanted is not None else {}
    for n in nodes:
        block, part = None, None
        for s in _scopes(n):
            m = _BLOCK_RE.search(s)
            if m:
                block = int(m.group(1))
                part = m.group(2) or part
        if block is None or (wanted is not None and block not in wanted):
            continue
        if part in _REMOVED_PARTS or n.op_type in ATTENTION_OPS:
            out.setdefault(block, []).append(f"{n.op_type} {n.name}")
    return out


def _summarise(found: dict[int, list[str]]) -> str:
    return "; ".join(f"blocks.{i}: {len(v)} ({', '.join(sorted(set(s.split()[0] for s in v)))})"
                     for i, v in found.items() if v)


def check_attention_free(model_proto: Any, layers: Sequence[int]) -> None:
    """Raise a ShrinkError if any of ``layers`` still has attention nodes in the ONNX graph."""
    if isinstance(model_proto, (str, os.PathLike)):
        require_deploy_extra(("onnx",))
        import onnx

        model_proto = onnx.load(str(model_proto))
    found = attention_nodes(model_proto, layers)
    if any(found.values()):
        raise ShrinkError(f"attention nodes remain in layers meant to be attention-free: {_summarise(found)}")


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------

def _write_with_sidecar(path: Path, write, meta: dict[str, Any]) -> None:
    """Artefact and sidecar JSON: each atomic; the artefact goes in place first, and if anything
    fails before both are written, neither is changed."""
    sidecar = sidecar_path(path)

    def write_sidecar(tmp_side: Path) -> None:
        atomic_write(path, write)  # verification runs in here, before the rename
        tmp_side.write_text(json.dumps(meta, indent=2) + "\n")

    atomic_write(sidecar, write_sidecar)


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
    """:func:`prepare_model` then :func:`export_onnx` or :func:`save_program`; returns the metadata."""
    if fmt not in FORMATS:
        raise ShrinkError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    if fmt == "onnx":
        require_deploy_extra()
    prepared = prepare_model(model, fold=fold, tome_r=tome_r, tome_start_idx=tome_start_idx, tome_policy=tome_policy)
    kwargs = {"input_size": input_size, "batch_size": batch_size, "dynamic_batch": dynamic_batch, "verify": verify}
    if fmt == "onnx":
        return export_onnx(prepared, path, opset=opset, **kwargs)
    return save_program(prepared, path, **kwargs)
