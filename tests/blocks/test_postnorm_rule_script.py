"""scripts/postnorm_rule.py (the s = 2 vs s = 1 dilution rules on a post-norm ViT) at its smallest setting."""
from __future__ import annotations

import importlib.util
import json
import sys

from ..conftest import ROOT, run

SCRIPT = ROOT / "scripts" / "postnorm_rule.py"


def _main():
    spec = importlib.util.spec_from_file_location("_script_postnorm_rule", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_smallest_run_writes_results_and_export_equals_lambda_zero(tmp_path):
    out = tmp_path / "out"
    r = run([sys.executable, str(SCRIPT), "--threads", "1", "--out", str(out), "--models", "postnorm",
             "--dense-epochs", "1", "--epochs", "1", "--seeds", "1", "--layers", "0,1"], timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads((out / "results.json").read_text())
    assert {"command", "date", "machine", "args", "data", "rules", "schedule", "models", "seconds"} <= set(res)
    assert res["data"]["train"] == 1437 and res["data"]["val"] == 360
    m = res["models"]["postnorm"]
    assert m["block_types"] == ["ResPostBlock"] and m["layers"] == [0, 1] and m["selection"] == "manual"
    assert m["default_residual_scale"] == 1.0  # the project's post-norm default
    assert set(m["rules"]) == {"s2_reference", "s1_identity"}
    for rule, scale in (("s2_reference", 2.0), ("s1_identity", 1.0)):
        v = m["rules"][rule]
        assert v["residual_scale"] == scale
        assert v["lam1_max_abs_diff_vs_dense"] < 1e-5  # lambda = 1 is the timm block
        assert {"acc_lam0_no_finetune", "final_deploy_acc_mean", "final_deploy_acc_std"} <= set(v)
        assert len(v["runs"]) == 1
        run0 = v["runs"][0]
        assert run0["export_equal"] and run0["export_max_abs_diff"] == 0.0
        assert run0["export_acc"] == run0["final_deploy_acc"]
        assert [c["lambda"] for c in run0["curve"]] == [0.0]
    table = (out / "table.md").read_text()
    assert "s2_reference" in table and "s1_identity (default)" in table


def test_threads_zero_is_refused_in_one_line(capsys):
    try:
        code = _main()(["--threads", "0"])
    except SystemExit as e:  # argparse's refusal
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--threads" in err[0], err
