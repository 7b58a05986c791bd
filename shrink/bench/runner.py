"""The whole benchmark run: settings, environment, per-configuration measurement and :func:`run`.

Long because :func:`run` reads as a sequence of steps (settings, one-after-the-other or interleaved
measurement, the report) whose private helpers share this module's settings and entries."""
from __future__ import annotations

import contextlib
import datetime as _dt
import os
import platform
import sys
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shrink.bench.measure import (
    DEFAULT_ITERS,
    PRECISIONS,
    TimedModel,
    _free,
    _summary,
    _sync_fn,
    count_macs,
    count_parameters,
    measure_training,
    prepare_inference,
    set_allocator,
)
from shrink.bench.ort import build_session, check_runtimes, prepare_session
from shrink.bench.report import SCHEMA, write_outputs
from shrink.bench.spec import (
    BenchConfig,
    ModelSpec,
    _build_base,
    _free_blocks,
    _Planned,
    _tome_module,
    build_variant,
    plan,
)
from shrink.errors import ShrinkError
from shrink.introspect import input_size
from shrink.values import parse_device


def _label(p: _Planned, model: nn.Module) -> str:
    free = _free_blocks(model)
    parts = []
    if p.variant.startswith("pruned"):
        parts.append("pruned [" + ",".join(map(str, p.layers)) + "]")
    elif free:
        parts.append("as loaded, attention-free [" + ",".join(map(str, free)) + "]")
    else:
        parts.append("dense")
    if p.variant.endswith("+tome") and not p.spec.tome_r:
        parts.append("no merging (r=0)")  # a plan that only removes layers (read_plan always asks for +tome)
    elif p.variant.endswith("+tome"):
        policy = "" if p.spec.tome_policy == "none" else f" policy={p.spec.tome_policy}"
        ramp = f" inflection={p.spec.tome_inflection:g}" if p.spec.tome_inflection else ""
        parts.append(f"ToMe r={p.spec.tome_r}{ramp} start={p.spec.tome_start_idx}{policy}")
    return " + ".join(parts)


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
         "train": cfg.train, "interleave": cfg.interleave, "baseline": cfg.baseline}
    runtimes = list(cfg.runtimes or ["torch"])
    if runtimes != ["torch"]:  # the key exists only in runs that include another runtime (schema unchanged)
        s["runtimes"] = runtimes
        check_runtimes(runtimes, device, cfg.precision)
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


def _prepare_ort_timers(model: nn.Module, size: Sequence[int], settings: dict[str, Any], device: torch.device,
                       threads: int | None) -> tuple[dict[str, TimedModel], dict[str, Any]]:
    """ONNX export of ``model`` (a copy), its session, and its throughput / latency timers."""
    session, info = build_session(model, size, device, threads)
    timers = {"inference": prepare_session(session, size, settings["batch_size"], device, settings["warmup"])}
    if settings["latency"]:
        timers["latency"] = prepare_session(session, size, 1, device, settings["warmup"], track_memory=False)
    return timers, info


def _timers(runtime: str, model: nn.Module, size: Sequence[int], settings: dict[str, Any], device: torch.device,
            threads: int | None) -> tuple[dict[str, TimedModel], dict[str, Any] | None]:
    if runtime == "onnxruntime":
        return _prepare_ort_timers(model, size, settings, device, threads)
    return _prepare_timers(_runnable(model, settings, device), size, settings, device), None


def _finish(model: nn.Module, size: Sequence[int], timers: dict[str, TimedModel], settings: dict[str, Any],
            device: torch.device, runtime: str = "torch") -> dict[str, Any]:
    out: dict[str, Any] = {"inference": timers["inference"].result(), "memory": timers["inference"].setup["memory"]}
    out["latency_ms"] = _summary([v * 1e3 for v in timers["latency"].per_call]) if "latency" in timers else None
    out["train"] = None
    if settings["train"] and runtime == "torch":
        n = (settings["warmup"], settings["iters"], settings["repeats"])
        out["train"] = measure_training(model, size, settings["batch_size"], device, settings["precision"], *n,
                                        compile=settings["compile"], channels_last=settings["channels_last"])
    out["notes"] = [f"{k}: out of memory at batch {out[k]['batch_size_requested']}, measured at batch "
                    f"{out[k]['batch_size']}" for k in ("inference", "train") if out[k] and out[k]["oom_halvings"]]
    return out


OnTiming = Callable[[TimedModel, int], None]


def _time(t: TimedModel, iters: int, repeats: int, sync: Callable[[], None], on_timing: OnTiming | None) -> None:
    t.time(iters, repeats, sync)
    if on_timing is not None:
        on_timing(t, repeats)


def benchmark_one(model: nn.Module, settings: dict[str, Any], device: torch.device, *,
                  on_timing: OnTiming | None = None) -> dict[str, Any]:
    """All measurements of one configuration (``model`` on CPU in fp32; it is moved and cast).
    ``on_timing`` as in :func:`run`."""
    out = _static(model, settings)
    timers = _prepare_timers(_runnable(model, settings, device), out["input_size"], settings, device)
    for t in timers.values():
        _time(t, settings["iters"], settings["repeats"], _sync_fn(device), on_timing)
    out.update(_finish(model, out["input_size"], timers, settings, device))
    return out


def _entry(p: _Planned, model: nn.Module, img_size: int | None, runtime: str | None = None) -> dict[str, Any]:
    out = {"model": p.spec.name, "variant": p.variant, "label": _label(p, model), "checkpoint": p.spec.checkpoint,
           "removed_layers": p.layers if p.variant.startswith("pruned") else None,
           "attention_free_blocks": _free_blocks(model),
           "tome": _tome_entry(model, p.spec, img_size) if p.variant.endswith("+tome") else None}
    if runtime is not None:  # only in runs with several runtimes / onnxruntime
        out["runtime"] = runtime
    return out


def _runtime_plan(settings: dict[str, Any]) -> list[str | None]:
    """The runtimes to measure; None stands for the plain torch run (no runtime key in the report)."""
    return list(settings["runtimes"]) if "runtimes" in settings else [None]


def _models(planned: list[_Planned], img_size: int | None, device: torch.device):
    """Yield (planned, configured model), building each base model once."""
    base, key = None, None
    for p in planned:
        if key != id(p.spec):
            base, key = None, id(p.spec)
            _free(device)
            base = _build_base(p.spec, img_size)
        yield p, build_variant(base, p.variant, p.layers, p.spec.tome_r, p.spec.tome_start_idx, p.spec.tome_policy,
                               p.spec.tome_inflection)


def run(cfg: BenchConfig, *, on_timing: OnTiming | None = None) -> dict[str, Any]:
    """Measure every configuration of ``cfg`` and return the report; write the files it names.

    Configurations are measured one after the other, or with ``interleave`` round-robin: every
    configuration is set up first, then each timed repeat visits all of them (in a rotating
    order), so that load from other processes spreads over all configurations alike.

    ``on_timing(timer, repeats)``, when given, is called after every timing visit: ``timer`` is the
    :class:`~shrink.bench.measure.TimedModel` just timed (its ``setup`` holds the batch size) and
    ``repeats`` how many timed repeats the visit added (1 per round when interleaved).
    """
    from tqdm.auto import tqdm

    device = parse_device(cfg.device)
    settings = _settings(cfg, device)
    _apply_threads(cfg.threads)
    started = _dt.datetime.now().astimezone().isoformat(timespec="seconds")
    environment = _environment(device)  # load average before the run, other processes included
    environment["allocator"] = set_allocator(cfg.allocator)
    planned, skipped = plan(cfg)
    sync = _sync_fn(device)
    bar = tqdm(total=len(planned) * (2 if cfg.interleave else 1), desc="benchmark", unit="step",
               disable=not cfg.progress, file=sys.stderr)
    measure = _measure_interleaved if cfg.interleave else _measure_in_turn
    results = measure(cfg, planned, settings, device, sync, bar, on_timing)
    bar.close()
    _free(device)
    report = _report(cfg, started, environment, settings, results, skipped)
    write_outputs(report, cfg.json_path, cfg.csv_path, cfg.plot_path)
    return report


def _apply_threads(threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            raise ShrinkError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)


def _measure_in_turn(cfg: BenchConfig, planned: list[_Planned], settings: dict[str, Any], device: torch.device,
                     sync: Callable[[], None], bar: Any, on_timing: OnTiming | None) -> list[dict[str, Any]]:
    """Each configuration set up, timed and finished before the next one (the rows of :func:`run`)."""
    results: list[dict[str, Any]] = []
    runtimes = _runtime_plan(settings)
    for p, model in _models(planned, cfg.img_size, device):
        if runtimes == [None]:
            entry = _entry(p, model, cfg.img_size)
            bar.set_postfix_str(f"{p.spec.name} {entry['label']}")
            entry.update(benchmark_one(model, settings, device, on_timing=on_timing))
            results.append(entry)
        else:
            results += _measure_runtimes(cfg, p, model, settings, device, runtimes, sync, bar, on_timing)
        del model
        _free(device)
        bar.update()
    return _runtime_order(results, runtimes)


def _measure_runtimes(cfg: BenchConfig, p: _Planned, model: nn.Module, settings: dict[str, Any],
                      device: torch.device, runtimes: list[str | None], sync: Callable[[], None], bar: Any,
                      on_timing: OnTiming | None) -> list[dict[str, Any]]:
    """One configuration in every runtime asked for, one after the other: a row each."""
    rows = []
    static = _static(model, settings)
    for rt in sorted(runtimes, key=lambda r: r == "torch"):  # onnxruntime first: torch moves the model
        entry = {**_entry(p, model, cfg.img_size, rt), **static}
        bar.set_postfix_str(f"{p.spec.name} {entry['label']} {rt}")
        timers, info = _timers(rt, model, entry["input_size"], settings, device, cfg.threads)
        for t in timers.values():
            _time(t, settings["iters"], settings["repeats"], sync, on_timing)
        entry.update(_finish(model, entry["input_size"], timers, settings, device, rt))
        if info is not None:
            entry["onnx"] = info
        rows.append(entry)
        del timers
    return rows


def _measure_interleaved(cfg: BenchConfig, planned: list[_Planned], settings: dict[str, Any],
                         device: torch.device, sync: Callable[[], None], bar: Any,
                         on_timing: OnTiming | None) -> list[dict[str, Any]]:
    """Every configuration set up first, then timed round-robin, then finished (the rows of :func:`run`)."""
    runtimes = _runtime_plan(settings)
    staged = _stage(cfg, planned, settings, device, runtimes, bar)
    _time_round_robin([timers for _, _, timers in staged], settings, sync, on_timing)
    results = _finish_staged(staged, settings, device, bar)
    bar.update(len(planned))
    del staged
    return _runtime_order(results, runtimes)


def _stage(cfg: BenchConfig, planned: list[_Planned], settings: dict[str, Any], device: torch.device,
           runtimes: list[str | None], bar: Any) -> list[tuple[dict[str, Any], nn.Module, dict[str, TimedModel]]]:
    """(entry, model, timers) of every configuration in every runtime, all set up before any is timed."""
    staged = []
    for p, model in _models(planned, cfg.img_size, device):
        static = _static(model, settings)
        for rt in sorted(runtimes, key=lambda r: r == "torch"):
            entry = {**_entry(p, model, cfg.img_size, rt), **static}
            bar.set_postfix_str(f"set up {p.spec.name} {entry['label']}{'' if rt is None else ' ' + rt}")
            timers, info = _timers(rt or "torch", model, entry["input_size"], settings, device, cfg.threads)
            if info is not None:
                entry["onnx"] = info
            staged.append((entry, model, timers))
        bar.update()
    return staged


def _time_round_robin(timer_sets: list[dict[str, TimedModel]], settings: dict[str, Any],
                      sync: Callable[[], None], on_timing: OnTiming | None) -> None:
    """Each timed repeat visits every configuration, starting one further along each round."""
    for rep in range(settings["repeats"]):
        order = list(range(len(timer_sets)))
        order = order[rep % len(order):] + order[:rep % len(order)]
        for i in order:
            for t in timer_sets[i].values():
                _time(t, settings["iters"], 1, sync, on_timing)


def _finish_staged(staged: list[tuple[dict[str, Any], nn.Module, dict[str, TimedModel]]], settings: dict[str, Any],
                   device: torch.device, bar: Any) -> list[dict[str, Any]]:
    results = []
    for entry, model, timers in staged:
        bar.set_postfix_str(f"finish {entry['model']} {entry['label']}")
        onnx_info = entry.pop("onnx", None)
        entry.update(_finish(model, entry["input_size"], timers, settings, device, entry.get("runtime", "torch")))
        if onnx_info is not None:
            entry["onnx"] = onnx_info
        results.append(entry)
    return results


def _report(cfg: BenchConfig, started: str, environment: dict[str, Any], settings: dict[str, Any],
            results: list[dict[str, Any]], skipped: list[dict[str, str]]) -> dict[str, Any]:
    """The report of :func:`run`: speed-ups, skip notes and (benchmark.py --plan) the plan added to the rows."""
    _add_speedups(results, cfg.baseline)
    _add_skip_notes(results, skipped)
    plan_entry = _add_plan(results, cfg.plan, settings) if cfg.plan is not None else None
    report = {"schema": SCHEMA, "date": started,
              "command": cfg.command, "environment": environment, "settings": settings,
              "results": results, "skipped": skipped}
    if plan_entry is not None:  # only in benchmark.py --plan runs (schema unchanged otherwise)
        report["plan"] = plan_entry
    return report


def _tome_entry(model: nn.Module, spec: ModelSpec, img_size: int | None) -> dict[str, Any]:
    tome = _tome_module()
    return {"r": spec.tome_r, "start_idx": spec.tome_start_idx, "policy": spec.tome_policy,
            **({"inflection": spec.tome_inflection} if spec.tome_inflection else {}),
            "r_per_block": tome.tome_info(model)["schedule"],
            "tokens_per_block": tome.tome_token_counts(model, input_size(model, img_size))}


def _runtime_order(results: list[dict[str, Any]], runtimes: list[str | None]) -> list[dict[str, Any]]:
    """Entries grouped by runtime in the order asked for (torch rows, then onnxruntime rows, ...)."""
    if runtimes == [None]:
        return results
    return sorted(results, key=lambda r: runtimes.index(r.get("runtime")))  # stable within a runtime


def _add_speedups(results: list[dict[str, Any]], baseline: str | None = None) -> None:
    """images/s over the first dense configuration of the same model, input size and runtime in this run
    (``speedup_vs_dense``), and over the first dense configuration of ``baseline`` in the same runtime
    (``speedup_vs_baseline``; null without a baseline)."""
    dense: dict[tuple, float] = {}
    base: dict[str | None, float] = {}
    for r in results:
        if r["variant"] == "dense" and not r["attention_free_blocks"]:  # not a loaded shrunk model
            dense.setdefault((r["model"], tuple(r["input_size"]), r.get("runtime")), r["inference"]["images_per_s"])
        if r["variant"] == "dense" and r["model"] == baseline:
            base.setdefault(r.get("runtime"), r["inference"]["images_per_s"])
    for r in results:
        d = dense.get((r["model"], tuple(r["input_size"]), r.get("runtime")))
        r["speedup_vs_dense"] = r["inference"]["images_per_s"] / d if d else None
        b = base.get(r.get("runtime"))
        r["speedup_vs_baseline"] = r["inference"]["images_per_s"] / b if b else None


def _add_skip_notes(results: list[dict[str, Any]], skipped: list[dict[str, str]]) -> None:
    """Each measured row of a model says which of its configurations were skipped, and why."""
    for r in results:
        r["notes"] += [f"{k['variant']} skipped: {k['reason']}" for k in skipped if k["model"] == r["model"]]


_COST_RUNTIME = {"eager": "torch", "compile": "torch", "onnxruntime": "onnxruntime"}


def _add_plan(results: list[dict[str, Any]], plan: dict[str, Any], settings: dict[str, Any]) -> dict[str, Any]:
    """benchmark.py --plan: every row gets ``speedup`` (measured, = speedup_vs_dense) and
    ``predicted_speedup`` (the planner's, on the plan's rows in the runtime its cost table was
    measured in; null elsewhere or without PLAN.json); returns the report's ``plan`` entry."""
    rec = plan.get("record")
    key = (rec or {}).get("cost_key") or {}
    rt = _COST_RUNTIME.get(key.get("runtime"), None)
    predicted = rec["predicted_speedup"] if rec else None
    measured: dict[str, float | None] = {}
    for r in results:
        is_plan = r["variant"] == plan["variant"]
        runtime = r.get("runtime", "torch")
        r["speedup"] = r["speedup_vs_dense"]
        r["predicted_speedup"] = (predicted if is_plan and runtime == rt else 1.0 if r["variant"] == "dense"
                                  and predicted is not None and runtime == rt else None)
        if is_plan:
            measured[runtime] = r["speedup_vs_dense"]
    notes = []
    if rec:
        for name, mine in (("batch_size", settings["batch_size"]), ("device", settings["device"]),
                           ("dtype", settings["precision"])):
            if key.get(name) is not None and key.get(name) != mine:
                notes.append(f"the prediction is for {name} {key.get(name)}, measured with {mine}")
        if rt is not None and rt not in measured:
            notes.append(f"the prediction is for runtime {key.get('runtime')}, which was not measured")
    for r in results:
        r["notes"] += notes
    speedup = measured.get(rt) if rt in measured else next(iter(measured.values()), None)
    return {"path": plan["path"], "record_path": plan["record_path"], "config": plan["config"],
            "predicted_speedup": predicted, "speedup": speedup, "speedup_per_runtime": measured,
            "predicted_ms": rec["predicted_ms"] if rec else None,
            "dense_predicted_ms": rec["dense_predicted_ms"] if rec else None,
            "cost_key": key or None, "candidate": rec["candidate"] if rec else None}
