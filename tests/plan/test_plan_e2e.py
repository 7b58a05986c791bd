"""From plan to trained model on the embedded digits model: ``python -m shrink.plan`` with a tiny cost
table writes plan.yaml, ``benchmark.py --plan`` measures it against the dense model with the planner's
prediction beside, ``main_lambda.py --config plan.yaml`` trains exactly that plan, and an impossible
target is one line naming the best reachable speed-up (a cached cost table of other versions is
rebuilt with a warning, not used)."""
from __future__ import annotations

import json
import logging
import re
import sys

import pytest
import yaml

from shrink.bench.measure import count_macs

from ..conftest import ROOT, run

pytestmark = pytest.mark.usefixtures("one_thread")

TARGET_GMACS = 0.0036  # the dense digits model is 0.0042 GMACs: some removal or merging is needed


def _plan_args(tmp_path, *extra: str) -> list[str]:
    return ["--cache-dir", str(tmp_path / "cache"), "--token-step", "16", "--repeats", "1", "--threads", "1",
            "--calib-images", "32", "--max-remove", "2", "--r-values", "0,1", "--start-idxs", "0,1", "--quiet", *extra]


def test_plan_then_train_the_plan(tmp_path, capsys, caplog):
    from shrink.plan.__main__ import main

    plan_dir = tmp_path / "plan"
    assert main(["--target-gmacs", str(TARGET_GMACS), "--max-candidates", "4", "--output-dir", str(plan_dir),
                 *_plan_args(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "chosen:" in out and "main_lambda.py --config" in out
    assert sorted(p.name for p in plan_dir.iterdir()) == ["pareto.json", "pareto.md", "pareto.png", "plan.json",
                                                         "plan.yaml"]
    plan = json.loads((plan_dir / "plan.json").read_text())
    cfg = yaml.safe_load((plan_dir / "plan.yaml").read_text())
    cand = plan["candidate"]
    assert plan["gmacs"] <= TARGET_GMACS and plan["target"] == {"kind": "gmacs", "value": TARGET_GMACS}
    assert plan["cost_key"]["model"] == "vit_digits" and plan["cost_key"]["device"] == "cpu"
    assert len(plan["removal_order"]) == 2 and set(cand["removed"]) <= set(plan["removal_order"])
    secs = plan["seconds"]
    assert set(secs) == {"cost_table", "selection", "proxy", "search_without_proxy", "total"}
    assert all(v >= 0 for v in secs.values()) and secs["total"] >= secs["cost_table"] + secs["proxy"]
    assert cfg["model"] == "vit_digits" and cfg["data_set"] == "digits"
    assert cfg.get("remove_layers", []) == cand["removed"] and cfg.get("tome_r", 0) == cand["tome_r"]

    # the plan's GMACs are fvcore's count of the model it describes
    import shrink

    m = shrink.create_model("vit_digits", pretrained=True)
    if cand["removed"]:
        m = shrink.export(shrink.dilute(m, cand["removed"], lam=0.0))
    if cand["tome_r"]:
        shrink.apply_tome(m, cand["tome_r"], cand["tome_start_idx"], cand["tome_policy"])
    assert count_macs(m, (1, 8, 8))["total"] / 1e9 == pytest.approx(plan["gmacs"], rel=1e-12)

    # a cached table made with other library versions is not used silently: a warning names the difference
    cache_file = next((tmp_path / "cache").glob("*.json"))
    cached = json.loads(cache_file.read_text())
    cached["key"]["versions"]["torch"] = "0.0"
    cache_file.write_text(json.dumps(cached))
    # an impossible target: one line with the best reachable, nothing written
    bad_dir = tmp_path / "bad"
    with caplog.at_level(logging.WARNING):
        assert main(["--target-speedup", "1000", "--order", "2,4", "--output-dir", str(bad_dir),
                     *_plan_args(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert re.fullmatch(r"error: --target-speedup 1000 is out of reach on cpu: the best reachable is \d+\.\d{3}x "
                        r"predicted \(.*\)", err[-1]), err
    assert "Traceback" not in "\n".join(err)
    assert any("another setting" in r.getMessage() and "torch" in r.getMessage() and "0.0" in r.getMessage()
               for r in caplog.records)
    assert json.loads(cache_file.read_text())["key"]["versions"]["torch"] != "0.0"  # rebuilt for this one
    assert not bad_dir.exists()

    # benchmark.py measures the plan against the dense model, the planner's prediction beside it
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmark_cli", ROOT / "benchmark.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)  # in this process: no second start-up of torch
    assert benchmark.main(["--plan", str(plan_dir / "plan.yaml"), "--batch-size", "4", "--threads", "1", "--warmup",
                           "0", "--iters", "1", "--repeats", "1", "--no-latency", "--no-progress",
                           "--json", str(tmp_path / "bench.json")]) == 0
    bench = json.loads((tmp_path / "bench.json").read_text())
    assert bench["plan"]["predicted_speedup"] == pytest.approx(plan["predicted_speedup"])
    assert bench["plan"]["candidate"] == cand and bench["plan"]["speedup"] > 0

    # main_lambda.py trains exactly that plan
    res = run([sys.executable, "main_lambda.py", "--config", str(plan_dir / "plan.yaml"), "--epochs", "1",
               "--dilution-epochs", "0", "--warmup-epochs", "0", "--output-dir", str(tmp_path / "run"),
               "--no-progress", "--num-workers", "0", "--threads", "1"], timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["removed_layers"] == cand["removed"] or (not cand["removed"] and not summary["removed_layers"])
    if cand["tome_r"]:
        t = summary["tome"]
        assert (t["r"], t["start_idx"], t["policy"], t["train"]) == (cand["tome_r"], cand["tome_start_idx"],
                                                                     cand["tome_policy"], True)
        assert t["r_per_block"] == plan["schedule"]
    assert (tmp_path / "run" / "best" / "model.safetensors").is_file()
