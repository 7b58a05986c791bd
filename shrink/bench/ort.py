"""The ONNX Runtime backend of the benchmark: export a configuration to ONNX, time it in a session.

A configuration (dense, pruned, +ToMe) is exported with :func:`shrink.deploy.to_onnx` (dynamic
batch, so one session serves the throughput batch and the batch-1 latency), checked once against
eager PyTorch, and timed through the same :class:`~shrink.bench.measure.TimedModel` as the torch
runtime, so ``--interleave`` mixes both. CPU uses the CPU execution provider; ``cuda`` the CUDA
execution provider (onnxruntime-gpu) with the input bound on the device (I/O binding).
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from shrink.bench.measure import PeakMemory, TimedModel, time_calls, with_oom_halving
from shrink.bench.spec import parse_choices
from shrink.errors import ShrinkError, first_line

_logger = logging.getLogger(__name__)

RUNTIMES = ("torch", "onnxruntime")


def parse_runtimes(text: str) -> list[str]:
    """``"torch,onnxruntime"`` -> validated runtime names (``ort`` is short for onnxruntime)."""
    return parse_choices(text, RUNTIMES, "--runtime", "runtime", {"ort": "onnxruntime", "onnx": "onnxruntime"})


def check_runtimes(runtimes: Sequence[str], device: torch.device, precision: str) -> None:
    """Refuse what the ONNX Runtime backend cannot measure, before anything is built."""
    if "onnxruntime" not in runtimes:
        return
    from shrink.deploy import require_deploy_extra

    require_deploy_extra()
    if precision != "fp32":
        raise ShrinkError(f"--runtime onnxruntime measures fp32 models only, not --precision {precision}")
    if device.type == "cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ShrinkError("--device cuda with --runtime onnxruntime needs onnxruntime-gpu (this onnxruntime "
                              f"has {', '.join(ort.get_available_providers())})")


def providers(device: torch.device) -> list[Any]:
    """The execution providers for ``device``: CUDA then CPU on a GPU, else the CPU."""
    if device.type == "cuda":
        return [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def build_session(model: nn.Module, size: Sequence[int], device: torch.device, threads: int | None = None,
                  example_batch: int = 2) -> tuple[Any, dict[str, Any]]:
    """An ONNX Runtime session of ``model`` (fp32, CPU copy exported) and what the export measured."""
    from shrink.deploy import load_onnx_session, max_abs_diff, prepare_model, to_onnx

    t0 = time.perf_counter()
    prepared = prepare_model(model).float().cpu()  # a copy: the caller's model is not moved or cast
    proto = to_onnx(prepared, input_size=size, batch_size=example_batch, dynamic_batch=True)
    export_s = time.perf_counter() - t0
    data = proto.SerializeToString()
    names = providers(device)
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(data, sess_options=session_options(threads), providers=names)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types
        raise ShrinkError(f"onnxruntime cannot load the exported model: {first_line(e)}") from None
    check = session if device.type == "cpu" else load_onnx_session(data, providers=["CPUExecutionProvider"],
                                                                   threads=threads)
    x = torch.randn(2, *size, generator=torch.Generator().manual_seed(0))
    name = check.get_inputs()[0].name
    diff = max_abs_diff(prepared, lambda t: torch.from_numpy(check.run(None, {name: t.numpy()})[0]), x)
    info = {"export_s": export_s, "onnx_mb": len(data) / 2**20, "max_abs_diff_vs_torch": diff,
            "providers": session.get_providers(), "intra_op_threads": threads, "onnxruntime": ort.__version__,
            "opset": next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)}
    if diff > 1e-3:
        _logger.warning("ONNX Runtime output differs from PyTorch by %.3g", diff)
    return session, info


def session_options(threads: int | None) -> Any:
    """ONNX Runtime session options for timing: every graph optimisation, quiet, no spinning threads."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    # idle intra-op threads sleep instead of spinning, so they take no CPU from the configuration
    # timed next (torch or another session) in an interleaved run
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads is not None:
        opts.intra_op_num_threads = int(threads)
    return opts


def prepare_session(session: Any, size: Sequence[int], batch_size: int, device: torch.device, warmup: int,
                    track_memory: bool = True) -> TimedModel:
    """A random fp32 batch bound to ``session``, warmed up; peak RSS growth on CPU; halve on OOM."""
    import numpy as np
    import onnxruntime as ort

    in_name = session.get_inputs()[0].name
    out_name = session.get_outputs()[0].name

    def setup(b: int) -> dict[str, Any]:
        x = np.random.default_rng(0).standard_normal((b, *size), dtype=np.float32)
        if device.type == "cuda":
            binding = session.io_binding()
            binding.bind_ortvalue_input(in_name, ort.OrtValue.ortvalue_from_numpy(x, "cuda", device.index or 0))
            binding.bind_output(out_name, "cuda", device.index or 0)

            def forward() -> Any:
                session.run_with_iobinding(binding)
                binding.synchronize_outputs()
        else:
            feed = {in_name: x}

            def forward() -> Any:
                return session.run([out_name], feed)

        track = track_memory and device.type == "cpu"  # ORT's CUDA arena is invisible to torch.cuda
        peak = PeakMemory(device) if track else None
        if peak is not None:
            with peak:
                first, _ = time_calls(forward, max(warmup, 1), 0, 0)
        else:
            first, _ = time_calls(forward, warmup, 0, 0)
        return {"forward": forward, "first_call_s": first, "memory": peak.result(b) if peak is not None else None}

    s = with_oom_halving(setup, batch_size, device, "onnxruntime inference")
    return TimedModel(s.pop("forward"), s)
