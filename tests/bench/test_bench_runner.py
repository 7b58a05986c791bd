"""shrink.bench.runner: a mixed run, saved checkpoints, the interleaved rounds."""
from __future__ import annotations

import csv

import pytest
import torch

import shrink
from shrink import bench
from shrink.bench import BenchConfig, ModelSpec

pytestmark = pytest.mark.usefixtures("one_thread")


FAST = {"warmup": 0, "iters": 1, "repeats": 1, "batch_size": 2, "progress": False}


def test_mixed_run_skips_removal_on_the_mlp_model_and_measures_the_rest(mixed_run):
    report, out = mixed_run
    got = [(r["model"], r["variant"]) for r in report["results"]]
    assert got == [("deit_tiny_patch16_224", "dense"), ("deit_tiny_patch16_224", "pruned"),
                   ("deit_tiny_patch16_224", "pruned+tome"),
                   ("mixer_s16_224", "dense")]
    assert report["skipped"] == [{"model": "mixer_s16_224", "variant": "pruned",
                                  "reason": "mixer_s16_224 has no attention layers to remove"}]
    dense, pruned, mixer = report["results"][0], report["results"][1], report["results"][-1]
    merged = report["results"][2]
    # 4 patches + cls; r=1 from block 3 (2nd attention block), capped at half the unprotected tokens
    assert merged["tome"]["tokens_per_block"] == [5, 5, 5, 4, 4, 3, 2, 2, 2, 2, 2, 2]
    assert merged["gmacs"] < pruned["gmacs"] and merged["label"] == "pruned [0,2,4] + ToMe r=1 start=1"
    assert pruned["removed_layers"] == [0, 2, 4] == pruned["attention_free_blocks"]
    assert pruned["params"]["total"] < dense["params"]["total"] and pruned["gmacs"] < dense["gmacs"]
    assert dense["speedup_vs_dense"] == 1.0 and mixer["speedup_vs_dense"] == 1.0
    assert mixer["params"]["in_blocks"]["attention"] == 0 and mixer["input_size"] == [3, 32, 32]
    rows = list(csv.DictReader((out / "r.csv").open()))
    assert [r["variant"] for r in rows] == [v for _, v in got]
    assert int(rows[1]["params"]) == pruned["params"]["total"]
    assert (out / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = bench.format_markdown(report)
    assert md.count("\n| ") == len(got) + 1 and md.startswith("| model |") and "pruned [0,2,4]" in md
    assert "skipped: mixer_s16_224 pruned" in md
    # the skipped configuration has its own row, and the MLP model's measured row says why it has no pruned one
    table = [ln.split(" | ") for ln in md.splitlines() if ln.startswith("| ")]
    assert table[0][-1] == "note |" and all(len(row) == len(table[0]) for row in table)
    assert table[-2][:2] == ["| mixer_s16_224", "dense"] and table[-2][-1] == "pruned skipped: mixer_s16_224 has no attention layers to remove |"
    assert table[-1][:2] == ["| mixer_s16_224", "pruned: not measured"]
    assert table[-1][-1] == "skipped: mixer_s16_224 has no attention layers to remove |"
    assert mixer["notes"] == ["pruned skipped: mixer_s16_224 has no attention layers to remove"]
    assert rows[-1]["notes"] == mixer["notes"][0] and rows[0]["notes"] == ""
    assert all(r["speedup_vs_baseline"] is None for r in report["results"]) and not any(c.startswith("vs ") for c in table[0])


def test_several_models_against_one_baseline():
    """--baseline: every row's images/s over one model's dense row, beside the per-model speedup."""
    specs = [ModelSpec(name="deit_tiny_patch16_224", remove_layers=[0, 2, 4]), ModelSpec(name="mixer_s16_224")]
    report = bench.run(BenchConfig(models=specs, img_size=32, latency=False, baseline="resmlp_12_224", **FAST))
    got = [(r["model"], r["variant"]) for r in report["results"]]
    assert got == [("resmlp_12_224", "dense"), ("deit_tiny_patch16_224", "dense"), ("deit_tiny_patch16_224", "pruned"),
                   ("mixer_s16_224", "dense")]
    assert report["settings"]["baseline"] == "resmlp_12_224"
    base = report["results"][0]["inference"]["images_per_s"]
    for r in report["results"]:
        assert r["speedup_vs_baseline"] == pytest.approx(r["inference"]["images_per_s"] / base)
    assert report["results"][0]["speedup_vs_baseline"] == 1.0
    pruned = report["results"][2]
    assert pruned["speedup_vs_dense"] == pytest.approx(pruned["inference"]["images_per_s"]
                                                       / report["results"][1]["inference"]["images_per_s"])
    md = bench.format_markdown(report)
    head = md.splitlines()[0].split(" | ")
    assert head[5:7] == ["speedup", "vs resmlp_12_224"] and "note" not in head  # nothing skipped, no notes
    cells = md.splitlines()[4].split(" | ")
    assert cells[:2] == ["| deit_tiny_patch16_224", "pruned [0,2,4]"]
    assert cells[6] == f"{pruned['speedup_vs_baseline']:.2f}x"
    assert "vs resmlp_12_224: over resmlp_12_224's dense row" in md
    csv_rows = list(csv.DictReader(bench.format_csv(report).splitlines()))
    assert float(csv_rows[2]["speedup_vs_baseline"]) == pytest.approx(pruned["speedup_vs_baseline"])


def test_checkpoint_dir_and_file_are_benchmarked_as_saved(tmp_path):
    torch.manual_seed(0)
    base = shrink.create_model("deit_tiny_patch16_224", img_size=32)
    small = bench.build_variant(base, "pruned", [1, 3])
    shrink.save(small, tmp_path / "small")
    from safetensors.torch import save_file

    save_file(base.state_dict(), str(tmp_path / "w.safetensors"))
    specs = [ModelSpec(name="deit_tiny_patch16_224", checkpoint=str(tmp_path / "small"), compare=["dense"]),
             ModelSpec(name="deit_tiny_patch16_224", checkpoint=str(tmp_path / "w.safetensors"), compare=["dense"])]
    report = bench.run(BenchConfig(models=specs, img_size=32, latency=False, **FAST))
    loaded, weights = report["results"]
    assert loaded["label"] == "as loaded, attention-free [1,3]" and loaded["attention_free_blocks"] == [1, 3]
    assert loaded["params"]["total"] == sum(p.numel() for p in small.parameters())
    assert weights["label"] == "dense" and weights["params"]["total"] == sum(p.numel() for p in base.parameters())
    assert loaded["latency_ms"] is None


def test_interleaved_run_times_every_configuration_in_every_round():
    rounds = []

    def on_timing(timer, repeats):  # run's documented hook: after every timing visit
        rounds.append((timer.setup["batch_size"], repeats))

    spec = ModelSpec(name="deit_tiny_patch16_224", remove_layers=[0, 2, 4])
    cfg = BenchConfig(models=[spec], img_size=32, interleave=True, **{**FAST, "repeats": 3})
    report = bench.run(cfg, on_timing=on_timing)
    assert [r["variant"] for r in report["results"]] == ["dense", "pruned"]
    assert report["settings"]["interleave"] is True
    # 3 rounds x 2 configurations x (batch-2 throughput + batch-1 latency), one repeat per visit
    assert rounds == [(2, 1), (1, 1)] * 6
    for r in report["results"]:
        assert len(r["inference"]["images_per_s_repeats"]) == 3 and len(r["latency_ms"]["repeats"]) == 3
        assert r["memory"]["growth_mb"] >= 0
    with pytest.raises(shrink.ShrinkError, match="--interleave cannot be combined with --compile"):
        bench.run(BenchConfig(models=[spec], compile=True, interleave=True, **{**FAST, "warmup": 1}))
