"""shrink.bench.report: the JSON report schema and its CSV/PNG companions."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_thread")


ROOT = Path(__file__).resolve().parents[2]


TOP_KEYS = {"schema": str, "date": str, "command": (str, type(None)), "environment": dict, "settings": dict,
            "results": list, "skipped": list}


SETTINGS_KEYS = {"device", "precision", "batch_size", "warmup", "iters", "repeats", "compile",
                 "channels_last", "img_size", "latency", "train", "interleave", "baseline"}


ENV_KEYS = {"python", "platform", "cpu", "cpu_count", "torch_threads", "torch", "timm", "fvcore", "shrink",
            "gpu", "load_average", "allocator"}


RESULT_KEYS = {"model": str, "variant": str, "label": str, "checkpoint": (str, type(None)),
               "removed_layers": (list, type(None)), "attention_free_blocks": list, "tome": (dict, type(None)),
               "input_size": list, "params": dict, "macs": dict, "gmacs": float, "inference": dict,
               "memory": dict, "latency_ms": (dict, type(None)), "train": (dict, type(None)), "notes": list,
               "speedup_vs_dense": (float, type(None)), "speedup_vs_baseline": (float, type(None))}


INFERENCE_KEYS = {"images_per_s", "images_per_s_min", "images_per_s_max", "images_per_s_repeats",
                  "first_call_s", "batch_size", "batch_size_requested", "oom_halvings"}


TRAIN_KEYS = INFERENCE_KEYS | {"optimizer", "autocast"}


MEMORY_KEYS = {"method", "batch_size", "baseline_mb", "peak_mb", "growth_mb"}


LATENCY_KEYS = {"median", "min", "max", "repeats"}


PARAMS_KEYS = {"total", "by_module", "in_blocks"}


MACS_KEYS = {"total", "gmacs", "by_operator", "unsupported_ops", "method"}


TOME_KEYS = {"r", "start_idx", "policy", "r_per_block", "tokens_per_block"}


def test_report_schema_is_the_documented_one(mixed_run):
    report, out = mixed_run
    on_disk = json.loads((out / "r.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert set(on_disk) == set(TOP_KEYS) and on_disk["schema"] == "shrink.bench/1"
    for k, t in TOP_KEYS.items():
        assert isinstance(on_disk[k], t), k
    assert set(on_disk["settings"]) == SETTINGS_KEYS
    assert set(on_disk["environment"]) == ENV_KEYS
    assert len(on_disk["results"]) == 4
    for r in on_disk["results"]:
        assert set(r) == set(RESULT_KEYS)
        for k, t in RESULT_KEYS.items():
            assert isinstance(r[k], t), (k, r[k])
        assert set(r["inference"]) == INFERENCE_KEYS and set(r["memory"]) == MEMORY_KEYS
        assert set(r["latency_ms"]) == LATENCY_KEYS and set(r["train"]) == TRAIN_KEYS
        assert set(r["params"]) == PARAMS_KEYS and set(r["macs"]) == MACS_KEYS
        if r["tome"] is not None:
            assert set(r["tome"]) == TOME_KEYS
        assert r["inference"]["images_per_s"] > 0 and r["train"]["images_per_s"] > 0
        assert r["inference"]["images_per_s_min"] <= r["inference"]["images_per_s"] <= r["inference"]["images_per_s_max"]
    # every key is documented in docs/benchmarks.md
    doc = (ROOT / "docs" / "benchmarks.md").read_text()
    keys = (set(TOP_KEYS) | SETTINGS_KEYS | ENV_KEYS | set(RESULT_KEYS) | TRAIN_KEYS | MEMORY_KEYS
            | LATENCY_KEYS | PARAMS_KEYS | MACS_KEYS | TOME_KEYS)
    missing = sorted(k for k in keys if f"`{k}`" not in doc)
    assert not missing, f"undocumented JSON keys: {missing}"
