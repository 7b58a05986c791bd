"""shrink.bench.ort: the ONNX Runtime backend of the benchmark beside torch, and its errors."""
from __future__ import annotations

from pathlib import Path

import pytest

from shrink.errors import ShrinkError

ROOT = Path(__file__).resolve().parents[2]


REMOVE = [0, 2, 4]


ATOL = 1e-4


pytest.importorskip("onnxscript", reason="the deploy extra is not installed")


def test_benchmark_onnxruntime_beside_torch(tmp_path):
    from shrink import bench
    from shrink.bench import BenchConfig, ModelSpec

    spec = ModelSpec(name="test_vit", remove_layers=REMOVE, tome_r=2, tome_start_idx=1,
                     compare=["dense", "pruned+tome"])  # timm's 6-block test ViT: quick to export
    fast = {"warmup": 0, "iters": 1, "repeats": 2, "batch_size": 2, "progress": False, "img_size": 32, "threads": 1}
    report = bench.run(BenchConfig(models=[spec], runtimes=["torch", "onnxruntime"], interleave=True,
                                   csv_path=str(tmp_path / "b.csv"), **fast))
    got = [(r["runtime"], r["variant"]) for r in report["results"]]
    assert got == [(rt, v) for rt in ("torch", "onnxruntime") for v in ("dense", "pruned+tome")]
    assert report["settings"]["runtimes"] == ["torch", "onnxruntime"]
    by = {(r["runtime"], r["variant"]): r for r in report["results"]}
    for rt in ("torch", "onnxruntime"):
        assert by[(rt, "dense")]["speedup_vs_dense"] == 1.0  # each runtime against its own dense
        assert len(by[(rt, "pruned+tome")]["inference"]["images_per_s_repeats"]) == 2
        assert by[(rt, "pruned+tome")]["gmacs"] == by[("torch", "pruned+tome")]["gmacs"]
    for v in ("dense", "pruned+tome"):
        onnx_info = by[("onnxruntime", v)]["onnx"]
        assert onnx_info["max_abs_diff_vs_torch"] <= ATOL and onnx_info["providers"] == ["CPUExecutionProvider"]
        assert by[("onnxruntime", v)]["inference"]["images_per_s"] > 0
        assert "onnx" not in by[("torch", v)]
    assert by[("onnxruntime", "pruned+tome")]["onnx"]["onnx_mb"] < by[("onnxruntime", "dense")]["onnx"]["onnx_mb"]
    md = bench.format_markdown(report)
    assert "| runtime |" in md and md.count("| onnxruntime |") == 2
    assert (tmp_path / "b.csv").read_text().splitlines()[0].endswith(",runtime")
    # a torch-only run keeps the schema of docs/benchmarks.md: no runtime keys
    plain = bench.run(BenchConfig(models=[ModelSpec(name="test_vit")], **fast))
    assert "runtimes" not in plain["settings"] and "runtime" not in plain["results"][0]


def test_benchmark_runtime_errors(capsys):
    import importlib.util

    from shrink import bench
    from shrink.bench import BenchConfig, ModelSpec

    with pytest.raises(ShrinkError, match="unknown runtime"):
        bench.parse_runtimes("torch,tensorrt")
    assert bench.parse_runtimes("ort, torch,onnxruntime") == ["onnxruntime", "torch"]
    cfg = BenchConfig(models=[ModelSpec(name="deit_tiny_patch16_224")], runtimes=["onnxruntime"], precision="bf16")
    with pytest.raises(ShrinkError, match="fp32"):
        bench.run(cfg)
    spec = importlib.util.spec_from_file_location("benchmark_cli", ROOT / "benchmark.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    assert cli.main(["--model", "test_vit", "--runtime", "trt"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown runtime" in err
