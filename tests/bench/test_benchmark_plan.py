"""benchmark.py --plan PLAN.yaml: dense and the plan side by side, the planner's predicted speed-up
(PLAN.json beside the YAML) next to the measured one; hostile plan files are one-line errors."""
from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import yaml

from shrink.bench import read_plan

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--img-size", "32", "--batch-size", "2", "--warmup", "0", "--iters", "1", "--repeats", "1", "--no-latency",
        "--no-progress", "--threads", "1"]
PLAN = {"model": "deit_tiny_patch16_224", "remove_layers": [0, 1], "tome_r": 2, "tome_inflection": 0.0,
        "tome_start_idx": 0, "tome_policy": "none", "epochs": 3}  # epochs: other main_lambda keys are ignored
RECORD = {"predicted_speedup": 1.4, "predicted_ms": 10.0, "dense_predicted_ms": 14.0,
          "cost_key": {"runtime": "eager", "batch_size": 2, "device": "cpu", "dtype": "fp32"},
          "candidate": {"removed": [0, 1], "tome_r": 2, "tome_inflection": 0.0, "tome_start_idx": 0,
                        "tome_policy": "none"}}


def _cli():
    spec = importlib.util.spec_from_file_location("benchmark_cli", ROOT / "benchmark.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _write(tmp_path, plan=PLAN, record=RECORD) -> Path:
    path = tmp_path / "PLAN.yaml"
    path.write_text(yaml.safe_dump(plan) if isinstance(plan, dict) else plan)
    if record is not None:
        (tmp_path / "PLAN.json").write_text(json.dumps(record) if isinstance(record, dict) else record)
    return path


def test_plan_is_measured_beside_dense_with_predicted_and_measured_speedup(tmp_path, capsys):
    plan = _write(tmp_path)
    out = tmp_path / "out.json"
    assert _cli().main(["--plan", str(plan), *FAST, "--json", str(out)]) == 0
    md = capsys.readouterr().out
    report = json.loads(out.read_text())
    dense, planned = report["results"]
    assert dense["variant"] == "dense" and planned["variant"] == "pruned+tome"
    assert planned["removed_layers"] == [0, 1] and planned["tome"]["r"] == 2
    assert planned["predicted_speedup"] == 1.4 and dense["predicted_speedup"] == 1.0
    assert planned["speedup"] == planned["speedup_vs_dense"] > 0 and dense["speedup"] == 1.0
    assert report["plan"]["predicted_speedup"] == 1.4 and report["plan"]["speedup"] == planned["speedup"]
    assert report["plan"]["candidate"] == RECORD["candidate"] and report["settings"]["interleave"] is True
    head = md.splitlines()[0]
    assert "| speedup | predicted |" in head
    assert re.search(r"pruned \[0,1\] \+ ToMe r=2 start=0 \| [\d.]+ \| [\d.]+ \| [\d.() -]+ \| [\d.]+x \| 1\.40x \|", md)
    assert "predicted 1.40x" in md


def test_without_a_record_predicted_is_null_and_a_ramp_is_measured(tmp_path):
    plan = _write(tmp_path, {**PLAN, "remove_layers": [], "tome_r": 3, "tome_inflection": -0.5}, record=None)
    out = tmp_path / "out.json"
    assert _cli().main(["--plan", str(plan), *FAST, "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    planned = report["results"][1]
    assert planned["variant"] == "dense+tome" and planned["tome"]["inflection"] == -0.5
    assert planned["tome"]["r_per_block"] != [3] * 12  # the ramp, not a constant r
    assert planned["predicted_speedup"] is None and report["plan"]["predicted_speedup"] is None
    assert planned["speedup"] > 0


def test_a_plan_without_merging_is_labelled_so(tmp_path, capsys):
    plan = _write(tmp_path, {**PLAN, "tome_r": 0}, record=None)
    assert _cli().main(["--plan", str(plan), *FAST]) == 0
    md = capsys.readouterr().out
    assert "pruned [0,1] + no merging (r=0) |" in md and "ToMe r=0" not in md
    assert "allocator " in md  # the allocator in force is part of the table's footer


@pytest.mark.parametrize("plan, variant, layers, r", [
    ({"model": "m"}, "dense+tome", None, 0),  # an empty plan: ToMe with r = 0 is the plain model
    ({"model": "m", "remove_layers": "0,3"}, "pruned+tome", [0, 3], 0),
    ({"model": "m", "remove_layers": 2, "tome_r": 5, "tome_policy": "hidden"}, "pruned+tome", [2], 5),
])
def test_read_plan_makes_the_configurations(tmp_path, plan, variant, layers, r):
    spec, info = read_plan(_write(tmp_path, plan, record=None))
    assert spec.compare == ["dense", variant] and spec.remove_layers == layers and spec.tome_r == r
    assert spec.tome_policy == plan.get("tome_policy", "none") and info["record"] is None


@pytest.mark.parametrize("plan, record, extra, message", [
    (None, None, [], "plan file .* not found"),
    ("model: [unclosed", None, [], "not valid YAML"),
    ("- a\n- b\n", None, [], "must be a mapping"),
    ({**PLAN, "model": 3}, None, [], "'model' must be a model name"),
    ({**PLAN, "remove_layers": [0, "x"]}, None, [], "remove_layers entry must be an integer"),
    ({**PLAN, "remove_layers": [1, 1]}, None, [], "repeated index"),
    ({**PLAN, "remove_layers": [0, 40]}, None, [], "40"),
    ({**PLAN, "tome_r": -1}, None, [], "tome_r must be an integer >= 0"),
    ({**PLAN, "tome_inflection": 3}, None, [], r"tome_inflection must be in \[-1, 1\]"),
    ({**PLAN, "tome_policy": "all"}, None, [], "tome_policy must be none or hidden"),
    (PLAN, "{broken", [], "plan record .* not valid JSON"),
    (PLAN, {"predicted_speedup": 1.2}, [], "needs the keys"),
    (PLAN, {**RECORD, "predicted_speedup": "fast"}, [], "predicted_speedup must be a finite number"),
    (PLAN, {**RECORD, "candidate": {**RECORD["candidate"], "tome_r": 8}}, [], "another plan .* tome_r"),
    (PLAN, RECORD, ["--model", "deit_tiny_patch16_224"], "drop --model"),
    (PLAN, RECORD, ["--tome-r", "4"], "drop --tome-r"),
])
def test_bad_plans_are_one_line_errors(tmp_path, capsys, plan, record, extra, message):
    path = tmp_path / "PLAN.yaml" if plan is None else _write(tmp_path, plan, record)
    out = tmp_path / "out.json"
    rc = _cli().main(["--plan", str(path), *extra, *FAST, "--json", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("benchmark.py: error: "), err
    assert re.search(message, err[0]), err[0]
    assert not out.exists()


def test_no_model_and_no_plan(capsys):
    assert _cli().main(FAST) == 2
    assert "give --model (or --plan PLAN.yaml)" in capsys.readouterr().err
