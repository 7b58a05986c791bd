"""Benchmark measurements: parameter and MAC counts, timing, latency, training steps, peak memory, OOM halving."""
from __future__ import annotations

import contextlib
import copy
import ctypes
import gc
import logging
import math
import statistics
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shrink.blocks.contract import block_family, classify_block
from shrink.errors import ShrinkError
from shrink.introspect import num_params
from shrink.precision import DTYPES

_logger = logging.getLogger(__name__)

PRECISIONS = DTYPES  # the benchmark's --precision names
DEFAULT_ITERS = {"cpu": (2, 5, 3), "cuda": (10, 40, 3)}  # (warm-up, timed iterations, repeats)
_OOM = (getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError),)


# ------------------------------------------------------------------------------------------------
# Static counts
# ------------------------------------------------------------------------------------------------

def count_parameters(model: nn.Module) -> dict[str, Any]:
    """Total parameters, per top-level module, and inside blocks split into attention / mlp / other.

    ``attention`` is what removing each block's token-mixing branch would take away (the block
    contract's answer, :mod:`shrink.blocks.contract`); ``mlp`` is the rest of those blocks; ``other`` holds the
    blocks the contract does not know (MLP families).
    """
    by_module: dict[str, int] = {}
    for name, p in model.named_parameters():
        by_module[name.split(".")[0]] = by_module.get(name.split(".")[0], 0) + p.numel()
    out: dict[str, Any] = {"total": num_params(model), "by_module": by_module, "in_blocks": None}
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, (nn.Sequential, nn.ModuleList)):
        split = {"attention": 0, "mlp": 0, "other": 0}
        for b in blocks:
            n = num_params(b)
            fam = block_family(b)
            if fam is None:
                split["other"] += n
                continue
            attn = 0 if classify_block(b) == "attention-free" else fam.removed_parameters(b)
            split["attention"] += attn
            split["mlp"] += n - attn
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

ALLOCATORS = ("steady", "default")
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)
_STEADY_BYTES = 1 << 30
_allocator_state: str | None = None


def set_allocator(mode: str = "steady", *, keep: bool = False) -> str:
    """Make CPU timings of this process independent of the allocator's history; returns what is in force.

    glibc's malloc serves large blocks (a ViT's activations: ~19 MB for deit_small at batch 16) by
    ``mmap`` and hands freed heap back to the OS (thresholds it moves as the process runs), so the
    same forward pays for fresh, page-faulted memory in some repeats and not in others. Measured here
    (scripts/cost_fit_check.py: deit_small, batch 16, 2 threads, eager): two interleaved passes over
    16 models differed by up to 12 % in ms and 14 % in a speed-up; with both thresholds at 1 GiB,
    freed memory stays in the process, pages are reused and the passes agree within 3.1 % and 1.3 %
    (docs/benchmarks.md).
    ``"steady"`` sets those thresholds (glibc only; elsewhere, e.g. macOS or musl, nothing changes and
    ``"default (no glibc mallopt)"`` is returned); ``"default"`` leaves the allocator alone. Once set,
    the steady state holds for the rest of the process (what a long-running server sees once warm).
    ``keep=True``: a choice already made in this process stands (the cost model asks for steady this
    way, so a script that chose ``"default"`` keeps it). Memory measurements are unaffected
    (``PeakMemory`` trims the heap before its baseline).
    """
    global _allocator_state
    if mode not in ALLOCATORS:
        raise ShrinkError(f"unknown allocator mode {mode!r}; choose from {', '.join(ALLOCATORS)}")
    if _allocator_state is not None and (keep or _allocator_state.startswith(("steady", "default (no glibc"))):
        return _allocator_state  # a steady allocator cannot be put back as it was
    if mode == "default":
        _allocator_state = "default (malloc left as it is)"
        return _allocator_state
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, _STEADY_BYTES) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _STEADY_BYTES) == 1
    except (OSError, AttributeError):
        ok = False
    _allocator_state = "steady (glibc mmap and trim thresholds 1 GiB)" if ok else "default (no glibc mallopt)"
    return _allocator_state


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


class PeakMemory:
    """Peak memory over a code region: CUDA max allocated, or resident-set growth on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sampled = 0

    def __enter__(self) -> PeakMemory:
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


def with_oom_halving(measure: Callable[[int], dict[str, Any]], batch_size: int, device: torch.device,
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

        peak = PeakMemory(device) if track_memory else contextlib.nullcontext()
        if device.type == "cuda":  # the peak of one forward after the warm-up (compile, autotune excluded)
            first, _ = time_calls(forward, warmup, 0, 0, sync)
            if track_memory:
                with peak:
                    forward()
        else:  # CPU: the resident baseline must be taken before any forward pass reserves heap
            with peak:
                first, _ = time_calls(forward, max(warmup, int(track_memory)), 0, 0, sync)
        return {"forward": forward, "first_call_s": first, "memory": peak.result(b) if track_memory else None}

    s = with_oom_halving(setup, batch_size, device, "inference")
    return TimedModel(s.pop("forward"), s)


def measure_inference(model: nn.Module, size: Sequence[int], batch_size: int, device: torch.device,
                      dtype: torch.dtype, warmup: int, iters: int, repeats: int,
                      channels_last: bool = False, track_memory: bool = True) -> dict[str, Any]:
    """Images/s of ``model`` (already on ``device`` in ``dtype``) at ``batch_size``, with peak memory."""
    t = prepare_inference(model, size, batch_size, device, dtype, warmup, channels_last, track_memory)
    t.time(iters, repeats, _sync_fn(device))
    return {**t.result(), "memory": t.setup["memory"]}


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

    return with_oom_halving(measure, batch_size, device, "training")
