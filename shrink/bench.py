"""Benchmarks of dense, attention-removed and token-merged models in one process.

Per configuration: parameters (total and per component), GMACs (fvcore, attention matmuls
included), inference images/s, batch-1 latency, peak memory and, optionally, training images/s.
The report is a plain dict (schema ``shrink.bench/1``, documented in docs/benchmarks.md) that
:func:`run` can also write as JSON, CSV and a PNG of images/s against GMACs.
"""
from __future__ import annotations

import contextlib
import copy
import csv
import ctypes
import datetime as _dt
import gc
import io
import json
import logging
import math
import os
import platform
import statistics
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import create_model, load_weights, read_state_dict
from .dilution import attention_block_indices, dilute, get_blocks, validate_layers
from .errors import ShrinkError
from .export import attention_free_indices, export
from .io import atomic_write, atomic_write_json, atomic_write_text

_logger = logging.getLogger(__name__)

SCHEMA = "shrink.bench/1"
VARIANTS = ("dense", "dense+tome", "pruned", "pruned+tome")
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_ITERS = {"cpu": (2, 5, 3), "cuda": (10, 40, 3)}  # (warm-up, timed iterations, repeats)
_OOM = (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError),)
_LIST_KEYS = {"checkpoint", "remove", "selection", "ratio", "tome_r", "tome_start", "tome_policy", "compare"}


@dataclass
class ModelSpec:
    """One model of a benchmark and the configurations to measure on it."""

    name: str
    checkpoint: str | None = None
    remove_layers: list[int] | None = None
    selection: str | None = None
    remove_ratio: float | None = None
    tome_r: int | None = None
    tome_start_idx: int = 0
    tome_policy: str = "none"  # attention-free blocks: "none" (reference, no merging) or "hidden"
    compare: list[str] | None = None  # None: dense, + pruned if a removal is given, + ToMe if r is given


@dataclass
class BenchConfig:
    """Measurement settings shared by every configuration, and where to write the report."""

    models: list[ModelSpec]
    device: str = "cpu"
    batch_size: int = 32
    precision: str = "fp32"
    compile: bool = False
    channels_last: bool = False
    img_size: int | None = None
    warmup: int | None = None  # None: DEFAULT_ITERS of the device type
    iters: int | None = None
    repeats: int | None = None
    latency: bool = True
    train: bool = False
    threads: int | None = None
    interleave: bool = False  # time the configurations round-robin (for machines with other load)
    json_path: str | None = None
    csv_path: str | None = None
    plot_path: str | None = None
    progress: bool = True
    command: str | None = None


# ------------------------------------------------------------------------------------------------
# Model lists, removal sets, variants
# ------------------------------------------------------------------------------------------------

def parse_layers(text: str, what: str = "layers") -> list[int]:
    """``"0,2,4"`` (or ``"[0, 2, 4]"``) -> ``[0, 2, 4]``."""
    try:
        return [int(t) for t in text.replace(" ", "").strip("[]").split(",") if t != ""]
    except ValueError:
        raise ShrinkError(f"{what}: expected comma-separated integers, got {text!r}") from None


def parse_compare(text: str) -> list[str]:
    """``"dense,pruned"`` -> validated configuration names (``tome`` means ``dense+tome``)."""
    out = []
    for v in (t.strip() for t in text.split(",") if t.strip()):
        v = "dense+tome" if v == "tome" else v
        if v not in VARIANTS:
            raise ShrinkError(f"unknown configuration {v!r} in --compare; choose from {', '.join(VARIANTS)}")
        if v not in out:
            out.append(v)
    if not out:
        raise ShrinkError("--compare is empty")
    return out


def parse_model_line(line: str, defaults: ModelSpec) -> ModelSpec:
    """``name [key=value ...]``; keys: checkpoint, remove, selection, ratio, tome_r, tome_start, tome_policy, compare."""
    name, *pairs = line.split()
    spec = replace(defaults, name=name)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in _LIST_KEYS:
            raise ShrinkError(f"model list: bad entry {pair!r} (keys: {', '.join(sorted(_LIST_KEYS))})")
        try:
            if key == "checkpoint":
                spec.checkpoint = value or None
            elif key == "remove":
                spec.remove_layers = parse_layers(value, "remove") if value not in ("", "none") else None
            elif key == "selection":
                spec.selection = value or None
            elif key == "ratio":
                spec.remove_ratio = float(value)
            elif key == "tome_r":
                spec.tome_r = int(value)
            elif key == "tome_start":
                spec.tome_start_idx = int(value)
            elif key == "tome_policy":
                spec.tome_policy = value
            else:
                spec.compare = parse_compare(value)
        except ValueError:
            raise ShrinkError(f"model list: bad value in {pair!r}") from None
    return spec


def parse_models(arg: str, defaults: ModelSpec) -> list[ModelSpec]:
    """``a,b,c`` or the path of a list file (one ``name [key=value ...]`` per line, ``#`` comments)."""
    path = Path(arg)
    if path.is_file():
        lines = [ln.split("#", 1)[0].strip() for ln in path.read_text().splitlines()]
        specs = [parse_model_line(ln, defaults) for ln in lines if ln]
    else:
        specs = [replace(defaults, name=n.strip()) for n in arg.split(",") if n.strip()]
    if not specs:
        raise ShrinkError(f"no model given in {arg!r}")
    return specs


def read_selection(path: str | os.PathLike, depth: int | None = None) -> list[int]:
    """The ``layers`` list (in selection order) of a selection JSON written by ``python -m shrink.select``."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except OSError as e:
        raise ShrinkError(f"cannot read selection file {p}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise ShrinkError(f"selection file {p} is not valid JSON: {e}") from None
    layers = data.get("layers") if isinstance(data, dict) else None
    if not isinstance(layers, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise ShrinkError(f"selection file {p} has no 'layers' list of integers")
    if depth is not None and isinstance(data.get("depth"), int) and data["depth"] != depth:
        raise ShrinkError(f"selection file {p} was made for {data['depth']} blocks; this model has {depth}")
    return layers


def resolve_removal(model: nn.Module, spec: ModelSpec) -> list[int] | None:
    """The attention layers to remove for ``spec`` on ``model`` (None: no removal asked for)."""
    if spec.remove_layers is not None and spec.selection is not None:
        raise ShrinkError("give either --remove-layers or --selection, not both")
    if spec.remove_ratio is not None and spec.selection is None:
        raise ShrinkError(
            "--remove-ratio needs a layer ranking computed from data: run the selection CLI and pass "
            "--selection sel.json (with --remove-ratio to take its first k), or give --remove-layers"
        )
    if spec.remove_layers is None and spec.selection is None:
        return None
    if not _attention_blocks(model):
        raise ShrinkError(f"{spec.name} has no attention layers to remove")
    depth = len(get_blocks(model))
    layers = list(spec.remove_layers) if spec.remove_layers is not None else read_selection(spec.selection, depth)
    if spec.remove_ratio is not None:
        from .selection import ratio_to_k

        k = ratio_to_k(spec.remove_ratio, depth)
        if k > len(layers):
            raise ShrinkError(f"--remove-ratio {spec.remove_ratio} needs {k} layers; {spec.selection} lists {len(layers)}")
        layers = layers[:k]
    if not layers:
        raise ShrinkError("the removal set is empty")
    return validate_layers(model, layers)


def _attention_blocks(model: nn.Module) -> list[int]:
    try:
        return attention_block_indices(model)
    except ShrinkError:
        return []


def _free_blocks(model: nn.Module) -> list[int]:
    if isinstance(getattr(model, "blocks", None), (nn.Sequential, nn.ModuleList)):
        return attention_free_indices(model)
    return []


def _tome_module():
    try:
        from . import tome
    except ModuleNotFoundError as e:
        if e.name in ("shrink.tome", f"{__package__}.tome"):
            raise ShrinkError("ToMe not available (shrink/tome.py is missing from this installation)") from None
        raise
    return tome


def build_variant(base: nn.Module, variant: str, layers: Sequence[int] | None = None,
                  tome_r: int | None = None, tome_start_idx: int = 0, tome_policy: str = "none") -> nn.Module:
    """A copy of ``base`` as configuration ``variant``: dense, pruned (dilute + export), +ToMe."""
    if variant not in VARIANTS:
        raise ShrinkError(f"unknown configuration {variant!r}; choose from {', '.join(VARIANTS)}")
    model = copy.deepcopy(base)
    if variant.startswith("pruned"):
        if not layers:
            raise ShrinkError("a pruned configuration needs --remove-layers or --selection")
        dilute(model, layers, lam=0.0)
        model = export(model, inplace=True)
    if variant.endswith("+tome"):
        if tome_r is None:
            raise ShrinkError(f"configuration {variant} needs --tome-r")
        try:
            get_blocks(model)
        except ShrinkError:
            raise ShrinkError(f"ToMe needs a model with a sequence of tokens; {_arch_name(model)} has none") from None
        tome = _tome_module()
        patched = tome.apply_tome(model, tome_r, start_idx=tome_start_idx, policy=tome_policy)
        if isinstance(patched, nn.Module):
            model = patched
    return model.eval()


def _arch_name(model: nn.Module) -> str:
    arch = getattr(model, "shrink_arch", None) or {}
    return arch.get("name") or (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__


def input_size(model: nn.Module, img_size: int | None = None) -> tuple[int, int, int]:
    """(C, H, W) the model expects: ``img_size`` if given, else its build size, else its pretrained_cfg."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    c, h, w = tuple(cfg.get("input_size", (3, 224, 224)))
    if img_size is not None:
        return c, img_size, img_size
    for owner in (getattr(model, "patch_embed", None), getattr(model, "stem", None)):
        size = getattr(owner, "img_size", None)
        if isinstance(size, (tuple, list)) and len(size) == 2:
            return c, int(size[0]), int(size[1])
    return c, h, w


# ------------------------------------------------------------------------------------------------
# Static counts
# ------------------------------------------------------------------------------------------------

def count_parameters(model: nn.Module) -> dict[str, Any]:
    """Total parameters, per top-level module, and inside blocks split into attention / mlp / other.

    ``attention`` is norm1 + attn + ls1 of blocks that have an ``attn``; ``mlp`` is norm2 + mlp + ls2.
    """
    by_module: dict[str, int] = {}
    total = 0
    for name, p in model.named_parameters():
        by_module[name.split(".")[0]] = by_module.get(name.split(".")[0], 0) + p.numel()
        total += p.numel()
    out: dict[str, Any] = {"total": total, "by_module": by_module, "in_blocks": None}
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, (nn.Sequential, nn.ModuleList)):
        split = {"attention": 0, "mlp": 0, "other": 0}
        for b in blocks:
            has_attn = hasattr(b, "attn")
            for name, p in b.named_parameters():
                top = name.split(".")[0]
                kind = ("attention" if has_attn and top in ("norm1", "attn", "ls1")
                        else "mlp" if top in ("norm2", "mlp", "ls2") else "other")
                split[kind] += p.numel()
        out["in_blocks"] = split
    return out


def _sdpa_macs(inputs: list[Any], outputs: list[Any]) -> int:
    """fvcore handle for aten::scaled_dot_product_attention: q @ k^T plus attn @ v, in MACs."""
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(t) for t in inputs[:3])
    lead = math.prod(q[:-1])  # batch * heads * query tokens
    return int(lead * k[-2] * q[-1] + lead * k[-2] * v[-1])


def count_macs(model: nn.Module, size: Sequence[int], fused_attn: bool = False) -> dict[str, Any]:
    """Multiply-adds of one image with fvcore, on a CPU fp32 copy of ``model``.

    Fused attention is turned off on the copy (``fused_attn = False`` on every module that has it)
    and a handle counts ``scaled_dot_product_attention`` anyway, so attention matmuls are always in.
    fvcore counts LayerNorm as 5 MACs per element and skips element-wise ops (softmax, GELU, adds).
    """
    m = copy.deepcopy(model).float().cpu().eval()
    for mod in m.modules():
        if hasattr(mod, "fused_attn"):
            mod.fused_attn = fused_attn
    x = torch.randn(1, *size)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer and deprecation warnings; unsupported ops are recorded
        from fvcore.nn import FlopCountAnalysis

        fca = FlopCountAnalysis(m, x)
        fca.set_op_handle("aten::scaled_dot_product_attention", _sdpa_macs)
        fca.unsupported_ops_warnings(False)
        fca.uncalled_modules_warnings(False)
        fca.tracer_warnings("none")
        total = int(fca.total())
        by_op = {k: int(v) for k, v in fca.by_operator().items()}
        unsupported = {k: int(v) for k, v in fca.unsupported_ops().items()}
    return {"total": total, "gmacs": total / 1e9, "by_operator": by_op, "unsupported_ops": unsupported,
            "method": "fvcore FlopCountAnalysis, batch 1, fused attention off + handle for "
                      "aten::scaled_dot_product_attention; 1 multiply-add = 1"}


# ------------------------------------------------------------------------------------------------
# Timing and memory
# ------------------------------------------------------------------------------------------------

def _sync_fn(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def time_calls(fn: Callable[[], Any], warmup: int, iters: int, repeats: int,
               sync: Callable[[], None] = lambda: None) -> tuple[float | None, list[float]]:
    """Seconds of the first warm-up call, and mean seconds per call of each timed repeat."""
    first = None
    for i in range(warmup):
        t = time.perf_counter()
        fn()
        sync()
        if i == 0:
            first = time.perf_counter() - t
    per_call = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        sync()
        per_call.append((time.perf_counter() - t0) / iters)
    return first, per_call


def _summary(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "repeats": values}


def _read_hwm_kib() -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


class _PeakMemory:
    """Peak memory over a code region: CUDA max allocated, or resident-set growth on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sampled = 0

    def __enter__(self) -> _PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
            self.method = ("torch.cuda.max_memory_allocated over one forward after the warm-up (weights + input + "
                           "activations); growth = peak minus what was allocated before")
            return self
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so growth is not hidden
        self.baseline = _rss_bytes()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM (peak RSS) to the current RSS
            self.method = "process peak RSS (VmHWM, reset via /proc/self/clear_refs) minus RSS before; psutil"
            self._hwm = True
        except OSError:
            self._hwm = False
            self.method = "process RSS sampled every 2 ms with psutil, max minus RSS before"
            self._sampled = self.baseline
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self._sampled = max(self._sampled, _rss_bytes())

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self._hwm:
            self.peak = max((_read_hwm_kib() or 0) * 1024, self.baseline)
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._sampled, _rss_bytes())

    def result(self, batch_size: int) -> dict[str, Any]:
        mib = 1024.0 * 1024.0
        return {"method": self.method, "batch_size": batch_size, "baseline_mb": self.baseline / mib,
                "peak_mb": self.peak / mib, "growth_mb": (self.peak - self.baseline) / mib}


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, _OOM):
        return True
    msg = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _with_oom_halving(measure: Callable[[int], dict[str, Any]], batch_size: int, device: torch.device,
                      what: str) -> dict[str, Any]:
    """Run ``measure(batch)``; on out-of-memory halve the batch and try again, and say so."""
    b = batch_size
    while True:
        try:
            out = measure(b)
        except Exception as e:  # noqa: BLE001 - only out-of-memory is handled, the rest re-raised
            if not _is_oom(e):
                raise
            out = None
        if out is None:  # outside the except block, so the failed attempt's tensors can be freed
            _free(device)
            if b == 1:
                raise ShrinkError(f"{what}: out of memory even at batch 1")
            _logger.warning("%s: out of memory at batch %d; halving to %d", what, b, b // 2)
            b //= 2
            continue
        out.update(batch_size=b, batch_size_requested=batch_size, oom_halvings=int(math.log2(batch_size // b)))
        return out


def _prepare_input(size: Sequence[int], batch: int, device: torch.device, dtype: torch.dtype,
                   channels_last: bool) -> torch.Tensor:
    x = torch.randn(batch, *size, device=device, dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@dataclass
class TimedModel:
    """A model set up for timing: its forward closure (input bound), and what the set-up measured."""

    forward: Callable[[], Any]
    setup: dict[str, Any]  # first_call_s, memory, batch_size, batch_size_requested, oom_halvings
    per_call: list[float] = field(default_factory=list)

    def time(self, iters: int, repeats: int, sync: Callable[[], None]) -> None:
        """Add ``repeats`` timed runs of ``iters`` calls each."""
        self.per_call += time_calls(self.forward, 0, iters, repeats, sync)[1]

    def result(self) -> dict[str, Any]:
        ips = [self.setup["batch_size"] / t for t in self.per_call]
        return {"images_per_s": statistics.median(ips), "images_per_s_min": min(ips),
                "images_per_s_max": max(ips), "images_per_s_repeats": ips,
                **{k: self.setup[k] for k in ("first_call_s", "batch_size", "batch_size_requested", "oom_halvings")}}


def prepare_inference(model: nn.Module, size: Sequence[int], batch_size: int, device: torch.device,
                      dtype: torch.dtype, warmup: int, channels_last: bool = False,
                      track_memory: bool = True) -> TimedModel:
    """Allocate a random batch, warm up and take the peak memory of a forward pass; halve on OOM."""
    sync = _sync_fn(device)

    def setup(b: int) -> dict[str, Any]:
        x = _prepare_input(size, b, device, dtype, channels_last)

        def forward() -> Any:
            with torch.inference_mode():
                return model(x)

        peak = _PeakMemory(device) if track_memory else contextlib.nullcontext()
        if device.type == "cuda":  # the peak of one forward after the warm-up (compile, autotune excluded)
            first, _ = time_calls(forward, warmup, 0, 0, sync)
            if track_memory:
                with peak:
                    forward()
        else:  # CPU: the resident baseline must be taken before any forward pass reserves heap
            with peak:
                first, _ = time_calls(forward, max(warmup, int(track_memory)), 0, 0, sync)
        return {"forward": forward, "first_call_s": first, "memory": peak.result(b) if track_memory else None}

    s = _with_oom_halving(setup, batch_size, device, "inference")
    return TimedModel(s.pop("forward"), s)


def measure_inference(model: nn.Module, size: Sequence[int], batch_size: int, device: torch.device,
                      dtype: torch.dtype, warmup: int, iters: int, repeats: int,
                      channels_last: bool = False, track_memory: bool = True) -> dict[str, Any]:
    """Images/s of ``model`` (already on ``device`` in ``dtype``) at ``batch_size``, with peak memory."""
    t = prepare_inference(model, size, batch_size, device, dtype, warmup, channels_last, track_memory)
    t.time(iters, repeats, _sync_fn(device))
    return {**t.result(), "memory": t.setup["memory"]}


def measure_latency(model: nn.Module, size: Sequence[int], device: torch.device, dtype: torch.dtype,
                    warmup: int, iters: int, repeats: int, channels_last: bool = False) -> dict[str, Any]:
    """Milliseconds per forward pass at batch 1 (median, min, max of the repeats)."""
    t = prepare_inference(model, size, 1, device, dtype, warmup, channels_last, track_memory=False)
    t.time(iters, repeats, _sync_fn(device))
    return _summary([v * 1e3 for v in t.per_call])


def measure_training(model: nn.Module, size: Sequence[int], batch_size: int, device: torch.device,
                     precision: str, warmup: int, iters: int, repeats: int, compile: bool = False,
                     channels_last: bool = False) -> dict[str, Any]:
    """Images/s of full training steps (forward, cross-entropy, backward, AdamW) on a copy of ``model``.

    Weights stay fp32; bf16 / fp16 run under autocast (fp16 with a gradient scaler on CUDA).
    """
    sync = _sync_fn(device)
    dtype = PRECISIONS[precision]

    def measure(b: int) -> dict[str, Any]:
        m = copy.deepcopy(model).float().to(device).train()
        if channels_last:
            m = m.to(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-6)
        step_model = torch.compile(m, dynamic=False) if compile else m
        x = _prepare_input(size, b, device, torch.float32, channels_last)
        with torch.no_grad():
            n_out = m(x[:1]).shape[-1]
        y = torch.randint(0, n_out, (b,), device=device)
        scaler = torch.amp.GradScaler(device.type, enabled=(precision == "fp16" and device.type == "cuda"))
        autocast = torch.autocast(device.type, dtype=dtype, enabled=precision != "fp32")

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            with autocast:
                loss = F.cross_entropy(step_model(x), y)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()

        first, per_call = time_calls(step, warmup, iters, repeats, sync)
        ips = [b / t for t in per_call]
        return {"images_per_s": statistics.median(ips), "images_per_s_min": min(ips),
                "images_per_s_max": max(ips), "images_per_s_repeats": ips, "first_call_s": first,
                "optimizer": "AdamW", "autocast": precision != "fp32"}

    return _with_oom_halving(measure, batch_size, device, "training")


# ------------------------------------------------------------------------------------------------
# The whole run
# ------------------------------------------------------------------------------------------------

@dataclass
class _Planned:
    spec: ModelSpec
    variant: str
    layers: list[int] | None


def _variants(spec: ModelSpec, layers: list[int] | None) -> list[str]:
    if spec.compare is not None:
        return list(spec.compare)
    out = ["dense"]
    if layers is not None:
        out.append("pruned")
    if spec.tome_r is not None:
        out.append("dense+tome" if layers is None else "pruned+tome")
    return out


def _check_variant(model: nn.Module, spec: ModelSpec, variant: str, layers: list[int] | None) -> None:
    if variant.startswith("pruned") and layers is None:
        raise ShrinkError(f"{spec.name}: --compare {variant} needs --remove-layers or --selection")
    if variant.endswith("+tome"):
        if spec.tome_r is None:
            raise ShrinkError(f"{spec.name}: --compare {variant} needs --tome-r")
        build_variant(model, variant, layers, spec.tome_r, spec.tome_start_idx, spec.tome_policy)  # raises if impossible


def _build_base(spec: ModelSpec, img_size: int | None) -> nn.Module:
    if spec.checkpoint is not None and Path(spec.checkpoint).is_dir():
        model = create_model(spec.name, checkpoint=spec.checkpoint)
        if _arch_name(model) != spec.name:
            raise ShrinkError(f"{spec.checkpoint} holds a {_arch_name(model)}, not a {spec.name}")
        if img_size is not None and input_size(model)[1:] != (img_size, img_size):
            raise ShrinkError(f"{spec.checkpoint} was saved at input size {input_size(model)[1:]}; "
                              f"drop --img-size or use a weights file")
        return model.eval()
    kwargs = {"img_size": img_size} if img_size is not None else {}
    model = create_model(spec.name, **kwargs)
    if spec.checkpoint is not None:
        try:
            sd = read_state_dict(spec.checkpoint)
        except ShrinkError:
            raise
        except Exception as e:  # noqa: BLE001 - a corrupt file can fail anywhere inside torch.load
            raise ShrinkError(f"cannot read {spec.checkpoint}: {type(e).__name__}: {e}") from None
        load_weights(model, sd)
    return model.eval()


def plan(cfg: BenchConfig) -> tuple[list[_Planned], list[dict[str, str]]]:
    """Validate every model and configuration before anything is timed; returns (planned, skipped).

    With one model any impossible configuration is an error. With several, a configuration that
    cannot apply to some model (removal on an MLP-only model) is skipped for it and reported; it is
    an error only if no model admits it.
    """
    planned: list[_Planned] = []
    skipped: list[dict[str, str]] = []
    asked: dict[str, int] = {}
    for spec in cfg.models:
        if spec.tome_r is not None and spec.tome_r < 0:
            raise ShrinkError(f"--tome-r must be >= 0, got {spec.tome_r}")
        base = _build_base(spec, cfg.img_size)
        if len(cfg.models) > 1 and not _attention_blocks(base):
            layers = None  # removal cannot apply to it; its pruned configurations are skipped below
        else:
            layers = resolve_removal(base, spec)
        variants = _variants(spec, layers)
        if spec.compare is not None and spec.tome_r is not None and not any(v.endswith("+tome") for v in variants):
            raise ShrinkError(f"{spec.name}: --tome-r is given but --compare has no +tome configuration")
        if spec.compare is not None and layers is not None and not any(v.startswith("pruned") for v in variants):
            raise ShrinkError(f"{spec.name}: a removal is given but --compare has no pruned configuration")
        for v in variants:
            asked[v] = asked.get(v, 0) + 1
            try:
                _check_variant(base, spec, v, layers)
            except ShrinkError as e:
                if len(cfg.models) == 1:
                    raise
                skipped.append({"model": spec.name, "variant": v, "reason": str(e)})
                _logger.warning("skipping %s %s: %s", spec.name, v, e)
                continue
            planned.append(_Planned(spec, v, layers))
        del base
    for v, n in asked.items():
        reasons = [s["reason"] for s in skipped if s["variant"] == v]
        if len(reasons) == n:
            raise ShrinkError(f"no model admits configuration {v}: {reasons[0]}")
    return planned, skipped


def _label(p: _Planned, model: nn.Module) -> str:
    free = _free_blocks(model)
    parts = []
    if p.variant.startswith("pruned"):
        parts.append("pruned [" + ",".join(map(str, p.layers)) + "]")
    elif free:
        parts.append("as loaded, attention-free [" + ",".join(map(str, free)) + "]")
    else:
        parts.append("dense")
    if p.variant.endswith("+tome"):
        policy = "" if p.spec.tome_policy == "none" else f" policy={p.spec.tome_policy}"
        parts.append(f"ToMe r={p.spec.tome_r} start={p.spec.tome_start_idx}{policy}")
    return " + ".join(parts)


def _device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ShrinkError(f"unknown device {name!r}; use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ShrinkError("--device cuda asked for, but CUDA is not available on this machine; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise ShrinkError(f"device {name!r} is not supported; use cpu or cuda")
    return device


def _environment(device: torch.device) -> dict[str, Any]:
    def version(pkg: str) -> str | None:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    cpu = platform.processor() or None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"python": platform.python_version(), "platform": platform.platform(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "timm": version("timm"), "fvcore": version("fvcore"),
            "shrink": version("shrink"),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def _settings(cfg: BenchConfig, device: torch.device) -> dict[str, Any]:
    if cfg.precision not in PRECISIONS:
        raise ShrinkError(f"unknown precision {cfg.precision!r}; choose from {', '.join(PRECISIONS)}")
    w, i, r = DEFAULT_ITERS[device.type]
    s = {"device": str(device), "precision": cfg.precision, "batch_size": cfg.batch_size,
         "warmup": w if cfg.warmup is None else cfg.warmup, "iters": i if cfg.iters is None else cfg.iters,
         "repeats": r if cfg.repeats is None else cfg.repeats, "compile": cfg.compile,
         "channels_last": cfg.channels_last, "img_size": cfg.img_size, "latency": cfg.latency,
         "train": cfg.train, "interleave": cfg.interleave}
    for key, low in (("batch_size", 1), ("warmup", 0), ("iters", 1), ("repeats", 1)):
        if s[key] < low:
            raise ShrinkError(f"--{key.replace('_', '-')} must be >= {low}, got {s[key]}")
    if cfg.compile and s["warmup"] < 1:
        raise ShrinkError("--compile needs at least one warm-up iteration (--warmup >= 1)")
    if cfg.compile and cfg.interleave:
        raise ShrinkError("--interleave cannot be combined with --compile (each compiled configuration "
                          "resets dynamo's caches); run them one after the other")
    return s


def _static(model: nn.Module, settings: dict[str, Any]) -> dict[str, Any]:
    size = input_size(model, settings["img_size"])
    macs = count_macs(model, size)
    return {"input_size": list(size), "params": count_parameters(model), "macs": macs, "gmacs": macs["gmacs"]}


def _runnable(model: nn.Module, settings: dict[str, Any], device: torch.device) -> nn.Module:
    run_model = model.to(device=device, dtype=PRECISIONS[settings["precision"]])
    if settings["channels_last"]:
        run_model = run_model.to(memory_format=torch.channels_last)
    if settings["compile"]:
        torch._dynamo.reset()  # fresh caches: the recompile limit is shared by all models of one class
        run_model = torch.compile(run_model, dynamic=False)
    return run_model


def _prepare_timers(run_model: nn.Module, size: Sequence[int], settings: dict[str, Any],
                    device: torch.device) -> dict[str, TimedModel]:
    args = (device, PRECISIONS[settings["precision"]], settings["warmup"], settings["channels_last"])
    timers = {"inference": prepare_inference(run_model, size, settings["batch_size"], *args)}
    if settings["latency"]:
        timers["latency"] = prepare_inference(run_model, size, 1, *args, track_memory=False)
    return timers


def _finish(model: nn.Module, size: Sequence[int], timers: dict[str, TimedModel], settings: dict[str, Any],
            device: torch.device) -> dict[str, Any]:
    out: dict[str, Any] = {"inference": timers["inference"].result(), "memory": timers["inference"].setup["memory"]}
    out["latency_ms"] = _summary([v * 1e3 for v in timers["latency"].per_call]) if "latency" in timers else None
    out["train"] = None
    if settings["train"]:
        n = (settings["warmup"], settings["iters"], settings["repeats"])
        out["train"] = measure_training(model, size, settings["batch_size"], device, settings["precision"], *n,
                                        compile=settings["compile"], channels_last=settings["channels_last"])
    out["notes"] = [f"{k}: out of memory at batch {out[k]['batch_size_requested']}, measured at batch "
                    f"{out[k]['batch_size']}" for k in ("inference", "train") if out[k] and out[k]["oom_halvings"]]
    return out


def benchmark_one(model: nn.Module, settings: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """All measurements of one configuration (``model`` on CPU in fp32; it is moved and cast)."""
    out = _static(model, settings)
    timers = _prepare_timers(_runnable(model, settings, device), out["input_size"], settings, device)
    for t in timers.values():
        t.time(settings["iters"], settings["repeats"], _sync_fn(device))
    out.update(_finish(model, out["input_size"], timers, settings, device))
    return out


def _entry(p: _Planned, model: nn.Module, img_size: int | None) -> dict[str, Any]:
    return {"model": p.spec.name, "variant": p.variant, "label": _label(p, model), "checkpoint": p.spec.checkpoint,
            "removed_layers": p.layers if p.variant.startswith("pruned") else None,
            "attention_free_blocks": _free_blocks(model),
            "tome": _tome_entry(model, p.spec, img_size) if p.variant.endswith("+tome") else None}


def _models(planned: list[_Planned], img_size: int | None, device: torch.device):
    """Yield (planned, configured model), building each base model once."""
    base, key = None, None
    for p in planned:
        if key != id(p.spec):
            base, key = None, id(p.spec)
            _free(device)
            base = _build_base(p.spec, img_size)
        yield p, build_variant(base, p.variant, p.layers, p.spec.tome_r, p.spec.tome_start_idx, p.spec.tome_policy)


def run(cfg: BenchConfig) -> dict[str, Any]:
    """Measure every configuration of ``cfg`` and return the report; write the files it names.

    Configurations are measured one after the other, or with ``interleave`` round-robin: every
    configuration is set up first, then each timed repeat visits all of them (in a rotating
    order), so that load from other processes spreads over all configurations alike.
    """
    from tqdm.auto import tqdm

    device = _device(cfg.device)
    settings = _settings(cfg, device)
    if cfg.threads is not None:
        if cfg.threads < 1:
            raise ShrinkError(f"--threads must be >= 1, got {cfg.threads}")
        torch.set_num_threads(cfg.threads)
    started = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    environment = _environment(device)  # load average before the run, other processes included
    planned, skipped = plan(cfg)
    sync = _sync_fn(device)
    results: list[dict[str, Any]] = []
    bar = tqdm(total=len(planned) * (2 if cfg.interleave else 1), desc="benchmark", unit="step",
               disable=not cfg.progress, file=sys.stderr)
    if not cfg.interleave:
        for p, model in _models(planned, cfg.img_size, device):
            entry = _entry(p, model, cfg.img_size)
            bar.set_postfix_str(f"{p.spec.name} {entry['label']}")
            entry.update(benchmark_one(model, settings, device))
            results.append(entry)
            del model
            _free(device)
            bar.update()
    else:
        staged = []
        for p, model in _models(planned, cfg.img_size, device):
            entry = _entry(p, model, cfg.img_size)
            bar.set_postfix_str(f"set up {p.spec.name} {entry['label']}")
            entry.update(_static(model, settings))
            timers = _prepare_timers(_runnable(model, settings, device), entry["input_size"], settings, device)
            staged.append((entry, model, timers))
            bar.update()
        for rep in range(settings["repeats"]):
            order = list(range(len(staged)))
            order = order[rep % len(order):] + order[:rep % len(order)]
            for i in order:
                for t in staged[i][2].values():
                    t.time(settings["iters"], 1, sync)
        for entry, model, timers in staged:
            bar.set_postfix_str(f"finish {entry['model']} {entry['label']}")
            entry.update(_finish(model, entry["input_size"], timers, settings, device))
            results.append(entry)
            bar.update()
        del staged
    bar.close()
    _free(device)
    _add_speedups(results)
    report = {"schema": SCHEMA, "date": started,
              "command": cfg.command, "environment": environment, "settings": settings,
              "results": results, "skipped": skipped}
    write_outputs(report, cfg.json_path, cfg.csv_path, cfg.plot_path)
    return report


def _tome_entry(model: nn.Module, spec: ModelSpec, img_size: int | None) -> dict[str, Any]:
    tome = _tome_module()
    return {"r": spec.tome_r, "start_idx": spec.tome_start_idx, "policy": spec.tome_policy,
            "r_per_block": tome.tome_info(model)["schedule"],
            "tokens_per_block": tome.tome_token_counts(model, input_size(model, img_size))}


def _add_speedups(results: list[dict[str, Any]]) -> None:
    """images/s over the first dense configuration of the same model and input size in this run."""
    dense: dict[tuple, float] = {}
    for r in results:
        if r["variant"] == "dense" and not r["attention_free_blocks"]:  # not a loaded shrunk model
            dense.setdefault((r["model"], tuple(r["input_size"])), r["inference"]["images_per_s"])
    for r in results:
        d = dense.get((r["model"], tuple(r["input_size"])))
        r["speedup_vs_dense"] = r["inference"]["images_per_s"] / d if d else None


# ------------------------------------------------------------------------------------------------
# Output: markdown, CSV, PNG
# ------------------------------------------------------------------------------------------------

CSV_COLUMNS = ("model", "variant", "label", "removed_layers", "tome_r", "tome_start_idx", "params",
               "gmacs", "batch_size", "images_per_s", "images_per_s_min", "images_per_s_max",
               "speedup_vs_dense", "latency_ms", "peak_memory_mb", "memory_growth_mb", "train_images_per_s",
               "device", "precision", "compile")


def _row(r: dict[str, Any], s: dict[str, Any]) -> dict[str, Any]:
    return {"model": r["model"], "variant": r["variant"], "label": r["label"],
            "removed_layers": " ".join(map(str, r["removed_layers"] or [])),
            "tome_r": (r["tome"] or {}).get("r"), "tome_start_idx": (r["tome"] or {}).get("start_idx"),
            "params": r["params"]["total"], "gmacs": r["gmacs"], "batch_size": r["inference"]["batch_size"],
            "images_per_s": r["inference"]["images_per_s"], "images_per_s_min": r["inference"]["images_per_s_min"],
            "images_per_s_max": r["inference"]["images_per_s_max"], "speedup_vs_dense": r["speedup_vs_dense"],
            "latency_ms": (r["latency_ms"] or {}).get("median"), "peak_memory_mb": r["memory"]["peak_mb"],
            "memory_growth_mb": r["memory"]["growth_mb"],
            "train_images_per_s": (r["train"] or {}).get("images_per_s"),
            "device": s["device"], "precision": s["precision"], "compile": s["compile"]}


def format_csv(report: dict[str, Any]) -> str:
    """One row per configuration, columns :data:`CSV_COLUMNS`."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in report["results"]:
        w.writerow(_row(r, report["settings"]))
    return buf.getvalue()


def format_markdown(report: dict[str, Any]) -> str:
    """The results as a markdown table, with the settings and notes underneath."""
    s = report["settings"]
    mem = "peak mem (MB)" if s["device"].startswith("cuda") else "mem growth (MB)"
    head = ["model", "configuration", "params (M)", "GMACs", f"img/s (batch {s['batch_size']})",
            "speedup", "latency b1 (ms)", mem] + (["train img/s"] if s["train"] else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    notes = []
    for r in report["results"]:
        inf = r["inference"]
        ips = f"{inf['images_per_s']:.1f} ({inf['images_per_s_min']:.1f}-{inf['images_per_s_max']:.1f})"
        if inf["oom_halvings"]:
            ips += f" @b{inf['batch_size']}"
        lat = r["latency_ms"]
        m = r["memory"]["peak_mb"] if s["device"].startswith("cuda") else r["memory"]["growth_mb"]
        cells = [r["model"], r["label"], f"{r['params']['total'] / 1e6:.2f}", f"{r['gmacs']:.4g}", ips,
                 "-" if r["speedup_vs_dense"] is None else f"{r['speedup_vs_dense']:.2f}x",
                 "-" if lat is None else f"{lat['median']:.2f}", f"{m:.0f}"]
        if s["train"]:
            cells.append(f"{r['train']['images_per_s']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
        notes += [f"{r['model']} {r['label']}: {n}" for n in r["notes"]]
    env = report["environment"]
    where = env["gpu"] or f"{env['cpu']}, {env['torch_threads']} threads"
    lines += ["", f"{s['device']} ({where}), {s['precision']}, compile={s['compile']}, "
              f"warm-up {s['warmup']}, {s['iters']} timed iterations x {s['repeats']} repeats: "
              f"img/s is the median (min-max) of the repeats."]
    lines += [f"note: {n}" for n in notes]
    lines += [f"skipped: {k['model']} {k['variant']}: {k['reason']}" for k in report["skipped"]]
    return "\n".join(lines) + "\n"


def plot_png(report: dict[str, Any], path: str | os.PathLike) -> Path:
    """A PNG of inference images/s against GMACs, one labelled point per configuration."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    models = list(dict.fromkeys(r["model"] for r in report["results"]))
    for i, name in enumerate(models):
        rs = [r for r in report["results"] if r["model"] == name]
        y = [r["inference"]["images_per_s"] for r in rs]
        err = [[v - r["inference"]["images_per_s_min"] for v, r in zip(y, rs, strict=True)],
               [r["inference"]["images_per_s_max"] - v for v, r in zip(y, rs, strict=True)]]
        ax.errorbar([r["gmacs"] for r in rs], y, yerr=err, fmt="o", capsize=3, label=name, color=f"C{i % 10}")
        for r in rs:
            ax.annotate(r["label"], (r["gmacs"], r["inference"]["images_per_s"]), fontsize=7,
                        textcoords="offset points", xytext=(4, 4))
    s = report["settings"]
    ax.set_xlabel("GMACs per image (fvcore)")
    ax.set_ylabel(f"images/s (batch {s['batch_size']}, {s['precision']}, {s['device']})")
    ax.margins(0.2)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return atomic_write(path, lambda p: fig.savefig(p, format="png"))


def write_outputs(report: dict[str, Any], json_path: str | None = None, csv_path: str | None = None,
                  plot_path: str | None = None) -> None:
    """Write the report as JSON, CSV and PNG (each atomically; None skips it)."""
    if json_path:
        atomic_write_json(json_path, report)
    if csv_path:
        atomic_write_text(csv_path, format_csv(report))
    if plot_path:
        plot_png(report, plot_path)
