"""Benchmarks of dense, attention-removed and token-merged models in one process.

Per configuration: parameters (total and per component), GMACs (fvcore, attention matmuls
included), inference images/s, batch-1 latency, peak memory and, optionally, training images/s.
The report is a plain dict (schema ``shrink.bench/1``, documented in docs/benchmarks.md) that
:func:`run` can also write as JSON, CSV and a PNG of images/s against GMACs.

Modules: :mod:`.spec` (model lists, removal sets, configurations, the run plan), :mod:`.plan_file`
(``benchmark.py --plan`` files),
:mod:`.measure` (counts, timing, memory, OOM halving), :mod:`.report` (markdown, CSV, PNG)
and :mod:`.runner` (:func:`run`). Every public name is re-exported here.
"""
from __future__ import annotations

from shrink.bench.measure import (
    ALLOCATORS,
    DEFAULT_ITERS,
    PRECISIONS,
    PeakMemory,
    TimedModel,
    count_macs,
    count_parameters,
    measure_inference,
    measure_training,
    prepare_inference,
    set_allocator,
    time_calls,
)
from shrink.bench.ort import RUNTIMES, build_session, parse_runtimes, prepare_session
from shrink.bench.plan_file import read_plan
from shrink.bench.report import CSV_COLUMNS, SCHEMA, format_csv, format_markdown, plot_png, write_outputs
from shrink.bench.runner import benchmark_one, run
from shrink.bench.spec import (
    VARIANTS,
    BenchConfig,
    ModelSpec,
    build_variant,
    input_size,
    parse_compare,
    parse_model_line,
    parse_models,
    plan,
    read_selection,
    resolve_removal,
    with_baseline,
)

__all__ = [
    "ALLOCATORS",
    "CSV_COLUMNS",
    "DEFAULT_ITERS",
    "PRECISIONS",
    "RUNTIMES",
    "SCHEMA",
    "VARIANTS",
    "BenchConfig",
    "ModelSpec",
    "PeakMemory",
    "TimedModel",
    "benchmark_one",
    "build_session",
    "build_variant",
    "count_macs",
    "count_parameters",
    "format_csv",
    "format_markdown",
    "input_size",
    "measure_inference",
    "measure_training",
    "parse_compare",
    "parse_model_line",
    "parse_models",
    "parse_runtimes",
    "plan",
    "plot_png",
    "prepare_inference",
    "prepare_session",
    "read_plan",
    "read_selection",
    "resolve_removal",
    "run",
    "set_allocator",
    "time_calls",
    "with_baseline",
    "write_outputs",
]
