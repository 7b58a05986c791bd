"""The cost model's measurement scripts (scripts/plan_check.py, scripts/cost_fit_check.py) at their
smallest settings on the digits model: they run, write what they say, and record the allocator and
the CPU. Structure only: their timings mean something on a quiet machine (docs/cost_model.md)."""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from shrink.errors import ShrinkError

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cost_fit_check_compares_one_factor_with_per_kind_coefficients(tmp_path):
    out = tmp_path / "fit"
    assert _script("cost_fit_check").main(["--model", "vit_digits", "--batch-size", "2", "--threads", "1", "--passes", "1",
                                           "--repeats", "1", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    rows = res["rows"]
    assert len(rows) == 16 and [r["fit"] for r in rows] == [True] * 4 + [False] * 12
    assert rows[0]["candidate"]["removed"] == [] and rows[0]["candidate"]["tome_r"] == 0  # the dense model first
    assert rows[0]["sum / common factor"] == rows[0]["per-kind (4 plans)"] == 0.0  # dense against itself
    assert all(math.isfinite(r[w]) for r in rows for w in ("sum / common factor", "per-kind (4 plans)"))
    assert res["allocator"].startswith(("steady", "default (no glibc")) and res["cpu"]
    assert set(res["coef"]) == {"plain", "attn", "mlp", "free", "merge", "edges"}
    assert "per kind" in (out / "table.md").read_text()
    with pytest.raises(ShrinkError, match="--passes"):
        _script("cost_fit_check").main(["--passes", "0", "--out", str(tmp_path / "x")])


def test_plan_check_writes_plans_that_benchmark_measures(tmp_path):
    out = tmp_path / "check"
    assert _script("plan_check").main(["--model", "vit_digits", "--batch-size", "2", "--threads", "1", "--quick",
                                       "--runtimes", "eager", "--targets", "1.05", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    (row,) = res["rows"]
    assert row["plan"] is not None and row["predicted_speedup"] >= 1.05 and row["measured_speedup"] > 0
    assert Path(row["plan_file"]).is_file() and Path(row["plan_file"]).with_suffix(".json").is_file()
    assert res["cpu"] and [v["fit"] for v in res["tables"]["eager"]["validation"]] == [True] * 4 + [False]
    bench = json.loads((out / "plan_eager_1.05.bench.json").read_text())
    assert bench["plan"]["predicted_speedup"] == pytest.approx(row["predicted_speedup"])
    assert bench["environment"]["allocator"].startswith(("steady", "default (no glibc"))
    assert "check plan (not fitted)" in (out / "table.md").read_text()


@pytest.mark.parametrize("name, args", [("cost_fit_check", ["--passes", "0"]), ("cost_fit_check", ["--out", "FILE/x"]),
                                        ("plan_check", ["--out", "FILE"])])
def test_the_scripts_bad_input_is_one_line(tmp_path, capsys, name, args):
    """Run as ``python scripts/NAME.py``: an output path under a file, or a count out of range, is one line, exit 2."""
    from shrink.cli.runner import cli_main

    (tmp_path / "FILE").write_text("not a folder")
    args = [a.replace("FILE", str(tmp_path / "FILE")) for a in args]
    assert cli_main(_script(name).main, args, prefix=f"{name}.py: error: ") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"{name}.py: error: ") and "\n" not in err and "Traceback" not in err
