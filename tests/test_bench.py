"""Benchmark tool: exact parameter and MAC counts, the report schema, errors, OOM halving, outputs."""
from __future__ import annotations

import copy
import csv
import importlib.util
import json
import logging
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # fvcore's import touches the deprecated torch.jit.script
    from fvcore.nn import FlopCountAnalysis

import shrink
from shrink import bench
from shrink.bench import BenchConfig, ModelSpec

ROOT = Path(__file__).resolve().parents[1]
FAST = {"warmup": 0, "iters": 1, "repeats": 1, "batch_size": 2, "progress": False}


def _cli():
    spec = importlib.util.spec_from_file_location("benchmark_cli", ROOT / "benchmark.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def deit_tiny_224():
    return timm.create_model("deit_tiny_patch16_224").eval()


@pytest.fixture(scope="module")
def deit_tiny_64():
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", img_size=64).eval()


# ------------------------------------------------------------------------------------------------
# Parameters
# ------------------------------------------------------------------------------------------------

def test_params_deit_tiny_dense_and_pruned_exact(deit_tiny_224):
    dense = bench.count_parameters(deit_tiny_224)
    assert dense["total"] == 5_717_416  # timm's count for DeiT-T
    assert dense["total"] == sum(p.numel() for p in deit_tiny_224.parameters())
    assert sum(dense["by_module"].values()) == dense["total"]

    # Every removed block loses norm1 (weight, bias), attn.qkv (3D x D + 3D) and attn.proj (D x D + D),
    # read off the module shapes; DeiT v1 has no LayerScale (ls1 is an Identity).
    removed = 0
    for i in (0, 2, 4):
        blk = deit_tiny_224.blocks[i]
        n1, qkv, proj = blk.norm1, blk.attn.qkv, blk.attn.proj
        removed += n1.weight.shape[0] + n1.bias.shape[0]
        removed += qkv.weight.shape[0] * qkv.weight.shape[1] + qkv.bias.shape[0]
        removed += proj.weight.shape[0] * proj.weight.shape[1] + proj.bias.shape[0]
        assert not list(blk.ls1.parameters())
    d = deit_tiny_224.embed_dim
    assert removed == 3 * (2 * d + 4 * d * d + 4 * d)

    pruned_model = bench.build_variant(deit_tiny_224, "pruned", [0, 2, 4])
    pruned = bench.count_parameters(pruned_model)
    assert pruned["total"] == dense["total"] - removed == 5_271_592
    assert round(pruned["total"] / 1e6, 2) == 5.27
    assert pruned["in_blocks"]["attention"] == dense["in_blocks"]["attention"] - removed
    assert pruned["in_blocks"]["mlp"] == dense["in_blocks"]["mlp"]
    assert dense["in_blocks"]["attention"] == 12 * (2 * d + 4 * d * d + 4 * d)
    assert shrink.attention_free_indices(pruned_model) == [0, 2, 4]
    assert len(deit_tiny_224.blocks[0].attn.qkv.weight)  # the base model is left untouched


def test_params_deit_base_match_the_reference_counts():
    base = timm.create_model("deit_base_patch16_224")
    assert round(bench.count_parameters(base)["total"] / 1e6, 2) == 86.57
    for layers, millions in (([0, 1, 3, 4, 6], 74.75), ([0, 1, 3, 4, 6, 9], 72.38)):
        pruned = bench.build_variant(base, "pruned", layers)
        assert round(bench.count_parameters(pruned)["total"] / 1e6, 2) == millions


# ------------------------------------------------------------------------------------------------
# MACs
# ------------------------------------------------------------------------------------------------

def _fvcore_total(model, size, fused):
    m = copy.deepcopy(model)
    for mod in m.modules():
        if hasattr(mod, "fused_attn"):
            mod.fused_attn = fused
    fca = FlopCountAnalysis(m, torch.randn(1, *size))
    fca.unsupported_ops_warnings(False)
    fca.uncalled_modules_warnings(False)
    return fca.total()


def test_gmacs_dense_equals_fvcore_with_fused_attention_off(deit_tiny_64):
    size = (3, 64, 64)
    ours = bench.count_macs(deit_tiny_64, size)
    assert ours["total"] == _fvcore_total(deit_tiny_64, size, fused=False)
    # The other way: fused attention left on, our handle counts scaled_dot_product_attention.
    assert bench.count_macs(deit_tiny_64, size, fused_attn=True)["total"] == ours["total"]
    # Plain fvcore with fused attention misses exactly the two attention matmuls of the 12 blocks.
    n, d = (64 // 16) ** 2 + 1, deit_tiny_64.embed_dim
    assert ours["total"] - _fvcore_total(deit_tiny_64, size, fused=True) == 12 * 2 * n * n * d
    assert ours["gmacs"] == ours["total"] / 1e9
    assert "aten::softmax" in ours["unsupported_ops"]  # recorded, not printed


def test_removing_layers_lowers_macs_by_the_attention_macs(deit_tiny_64):
    size = (3, 64, 64)
    n, d = (64 // 16) ** 2 + 1, deit_tiny_64.embed_dim  # 17 tokens (16 patches + class), width 192
    dense = bench.count_macs(deit_tiny_64, size)
    pruned = bench.count_macs(bench.build_variant(deit_tiny_64, "pruned", [0, 2, 4]), size)
    # What fvcore counts for one attention sublayer (and so what removing it saves):
    #   qkv linear 3*N*D^2 + proj linear N*D^2            = 4*N*D^2   (by_operator "linear")
    #   q @ k^T N^2*D + attn @ v N^2*D                    = 2*N^2*D   (by_operator "matmul")
    #   norm1 LayerNorm: fvcore's 5 per element (affine)  = 5*N*D     (by_operator "layer_norm")
    # The scale multiply, the softmax and the residual add are not counted by fvcore at all
    # (they show up in unsupported_ops), and neither is the attention-free block's x * 2.
    per_layer = {"linear": 4 * n * d * d, "matmul": 2 * n * n * d, "layer_norm": 5 * n * d}
    for op, macs in per_layer.items():
        assert dense["by_operator"][op] - pruned["by_operator"][op] == 3 * macs, op
    assert dense["by_operator"]["conv"] == pruned["by_operator"]["conv"]
    assert dense["total"] - pruned["total"] == 3 * (4 * n * d * d + 2 * n * n * d + 5 * n * d)
    assert dense["unsupported_ops"]["aten::softmax"] - pruned["unsupported_ops"]["aten::softmax"] == 3


# ------------------------------------------------------------------------------------------------
# Measurement pieces
# ------------------------------------------------------------------------------------------------

def test_time_calls_counts_and_repeats():
    calls = []
    first, per_call = bench.time_calls(lambda: calls.append(1), warmup=2, iters=3, repeats=4)
    assert len(calls) == 2 + 3 * 4
    assert len(per_call) == 4 and all(t >= 0 for t in per_call)
    assert first is not None


def test_cpu_peak_memory_sees_a_large_allocation():
    with bench._PeakMemory(torch.device("cpu")) as peak:
        x = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB, touched
        del x
    r = peak.result(batch_size=1)
    assert r["growth_mb"] >= 48, r
    assert r["peak_mb"] >= r["baseline_mb"]


class _OomAbove(nn.Module):
    """Raises out-of-memory for batches larger than ``limit``, like a GPU that is too small."""

    def __init__(self, limit):
        super().__init__()
        self.limit = limit
        self.lin = nn.Linear(3, 2)
        self.seen = []

    def forward(self, x):
        self.seen.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.lin(x.mean(dim=(2, 3)))


def test_out_of_memory_halves_the_batch_and_says_so(caplog):
    m = _OomAbove(limit=2)
    with caplog.at_level(logging.WARNING, logger="shrink.bench"):
        r = bench.measure_inference(m, (3, 4, 4), 8, torch.device("cpu"), torch.float32, 1, 1, 1)
    assert (r["batch_size"], r["batch_size_requested"], r["oom_halvings"]) == (2, 8, 2)
    assert m.seen[:2] == [8, 4] and set(m.seen[2:]) == {2}
    assert "out of memory at batch 8" in caplog.text and "out of memory at batch 4" in caplog.text
    with pytest.raises(shrink.ShrinkError, match="even at batch 1"):
        bench.measure_inference(_OomAbove(limit=0), (3, 4, 4), 4, torch.device("cpu"), torch.float32, 0, 1, 1)


def test_other_errors_are_not_taken_for_out_of_memory():
    class Broken(nn.Module):
        def forward(self, x):
            raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        bench.measure_inference(Broken(), (3, 4, 4), 4, torch.device("cpu"), torch.float32, 0, 1, 1)


def test_input_size_follows_build_and_pretrained_cfg():
    m384 = timm.create_model("vit_tiny_patch16_384")
    assert bench.input_size(m384) == (3, 384, 384)
    m64 = timm.create_model("vit_tiny_patch16_384", img_size=64)
    assert bench.input_size(m64) == (3, 64, 64)
    assert bench.input_size(m384, img_size=96) == (3, 96, 96)


# ------------------------------------------------------------------------------------------------
# Model lists and removal sets
# ------------------------------------------------------------------------------------------------

def test_model_list_file_and_comma_list(tmp_path):
    f = tmp_path / "models.txt"
    f.write_text("# DeiT-T twice\ndeit_tiny_patch16_224 remove=0,2,4 compare=dense,pruned\n"
                 "deit_tiny_patch16_224 remove=0,2,4,6 compare=pruned tome_r=3 tome_start=1  # 30%\n\n"
                 "mixer_s16_224\n")
    defaults = ModelSpec(name="", tome_start_idx=0)
    specs = bench.parse_models(str(f), defaults)
    assert [s.name for s in specs] == ["deit_tiny_patch16_224"] * 2 + ["mixer_s16_224"]
    assert specs[0].remove_layers == [0, 2, 4] and specs[0].compare == ["dense", "pruned"]
    assert specs[1].remove_layers == [0, 2, 4, 6] and (specs[1].tome_r, specs[1].tome_start_idx) == (3, 1)
    assert specs[2].remove_layers is None and specs[2].compare is None
    assert [s.name for s in bench.parse_models("a, b,c", defaults)] == ["a", "b", "c"]
    with pytest.raises(shrink.ShrinkError, match="bad entry"):
        bench.parse_model_line("deit_tiny_patch16_224 layers=1", defaults)
    with pytest.raises(shrink.ShrinkError, match="unknown configuration"):
        bench.parse_compare("dense,sparse")
    assert bench.parse_compare("dense,tome") == ["dense", "dense+tome"]


def test_removal_sets_and_ratio(tmp_path, deit_tiny_64):
    sel = tmp_path / "sel.json"
    sel.write_text(json.dumps({"layers": [4, 0, 2, 6, 9], "criterion": "transfer_entropy"}))
    spec = ModelSpec(name="deit_tiny_patch16_224", selection=str(sel))
    assert bench.resolve_removal(deit_tiny_64, spec) == [4, 0, 2, 6, 9]
    spec.remove_ratio = 0.3  # 12 blocks -> 4 layers, the first 4 of the ranking
    assert bench.resolve_removal(deit_tiny_64, spec) == [4, 0, 2, 6]
    spec.remove_ratio = 0.5  # 6 layers, the file lists 5
    with pytest.raises(shrink.ShrinkError, match="needs 6 layers"):
        bench.resolve_removal(deit_tiny_64, spec)
    sel.write_text(json.dumps({"layers": [0, 1], "depth": 24}))
    with pytest.raises(shrink.ShrinkError, match="made for 24 blocks"):
        bench.resolve_removal(deit_tiny_64, ModelSpec(name="x", selection=str(sel)))
    with pytest.raises(shrink.ShrinkError, match="--selection sel.json"):
        bench.resolve_removal(deit_tiny_64, ModelSpec(name="x", remove_ratio=0.25))
    with pytest.raises(shrink.ShrinkError, match="out of range"):
        bench.resolve_removal(deit_tiny_64, ModelSpec(name="x", remove_layers=[0, 12]))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"layer": [1]}))
    with pytest.raises(shrink.ShrinkError, match="no 'layers' list"):
        bench.resolve_removal(deit_tiny_64, ModelSpec(name="x", selection=str(bad)))


# ------------------------------------------------------------------------------------------------
# The whole run: report schema, outputs, skipping
# ------------------------------------------------------------------------------------------------

TOP_KEYS = {"schema": str, "date": str, "command": (str, type(None)), "environment": dict, "settings": dict,
            "results": list, "skipped": list}
SETTINGS_KEYS = {"device", "precision", "batch_size", "warmup", "iters", "repeats", "compile",
                 "channels_last", "img_size", "latency", "train", "interleave"}
ENV_KEYS = {"python", "platform", "cpu", "cpu_count", "torch_threads", "torch", "timm", "fvcore", "shrink",
            "gpu", "load_average"}
RESULT_KEYS = {"model": str, "variant": str, "label": str, "checkpoint": (str, type(None)),
               "removed_layers": (list, type(None)), "attention_free_blocks": list, "tome": (dict, type(None)),
               "input_size": list, "params": dict, "macs": dict, "gmacs": float, "inference": dict,
               "memory": dict, "latency_ms": (dict, type(None)), "train": (dict, type(None)), "notes": list,
               "speedup_vs_dense": (float, type(None))}
INFERENCE_KEYS = {"images_per_s", "images_per_s_min", "images_per_s_max", "images_per_s_repeats",
                  "first_call_s", "batch_size", "batch_size_requested", "oom_halvings"}
TRAIN_KEYS = INFERENCE_KEYS | {"optimizer", "autocast"}
MEMORY_KEYS = {"method", "batch_size", "baseline_mb", "peak_mb", "growth_mb"}
LATENCY_KEYS = {"median", "min", "max", "repeats"}
PARAMS_KEYS = {"total", "by_module", "in_blocks"}
MACS_KEYS = {"total", "gmacs", "by_operator", "unsupported_ops", "method"}
TOME_KEYS = {"r", "start_idx", "policy", "r_per_block", "tokens_per_block"}


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    deit = ModelSpec(name="deit_tiny_patch16_224", remove_layers=[0, 2, 4], compare=["dense", "pruned", "pruned+tome"],
                     tome_r=1, tome_start_idx=1)
    specs = [deit, ModelSpec(name="mixer_s16_224", remove_layers=[0, 2, 4], compare=["dense", "pruned"])]
    cfg = BenchConfig(models=specs, img_size=32, train=True, json_path=str(out / "r.json"),
                      csv_path=str(out / "r.csv"), plot_path=str(out / "r.png"), command="pytest", **FAST)
    return bench.run(cfg), out


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


def test_mixed_run_skips_removal_on_the_mlp_model_and_measures_the_rest(mixed_run):
    report, out = mixed_run
    got = [(r["model"], r["variant"]) for r in report["results"]]
    assert got == [("deit_tiny_patch16_224", "dense"), ("deit_tiny_patch16_224", "pruned"),
                   ("deit_tiny_patch16_224", "pruned+tome"),
                   ("mixer_s16_224", "dense")]
    assert report["skipped"] == [{"model": "mixer_s16_224", "variant": "pruned",
                                  "reason": "mixer_s16_224: --compare pruned needs --remove-layers or --selection"}]
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
    assert md.count("\n| ") == len(got) and md.startswith("| model |") and "pruned [0,2,4]" in md and "skipped: mixer_s16_224 pruned" in md


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


def test_interleaved_run_times_every_configuration_in_every_round(monkeypatch):
    rounds = []
    real = bench.TimedModel.time

    def spy(self, iters, repeats, sync):
        rounds.append((self.setup["batch_size"], repeats))
        real(self, iters, repeats, sync)

    monkeypatch.setattr(bench.TimedModel, "time", spy)
    spec = ModelSpec(name="deit_tiny_patch16_224", remove_layers=[0, 2, 4])
    cfg = BenchConfig(models=[spec], img_size=32, interleave=True, **{**FAST, "repeats": 3})
    report = bench.run(cfg)
    assert [r["variant"] for r in report["results"]] == ["dense", "pruned"]
    assert report["settings"]["interleave"] is True
    # 3 rounds x 2 configurations x (batch-2 throughput + batch-1 latency), one repeat per visit
    assert rounds == [(2, 1), (1, 1)] * 6
    for r in report["results"]:
        assert len(r["inference"]["images_per_s_repeats"]) == 3 and len(r["latency_ms"]["repeats"]) == 3
        assert r["memory"]["growth_mb"] >= 0
    with pytest.raises(shrink.ShrinkError, match="--interleave cannot be combined with --compile"):
        bench.run(BenchConfig(models=[spec], compile=True, interleave=True, **{**FAST, "warmup": 1}))


# ------------------------------------------------------------------------------------------------
# Errors: one line, exit code 2, no output files
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--model", "no_such_model_xyz"], "unknown model 'no_such_model_xyz'"),
    (["--model", "deit_tiny_patch16_224", "--checkpoint", "{tmp}/bad.pth"], "cannot read"),
    (["--model", "deit_tiny_patch16_224", "--checkpoint", "{tmp}/missing.pth"], "checkpoint not found"),
    (["--model", "mixer_s16_224", "--remove-layers", "0,2"], "mixer_s16_224 has no attention layers to remove"),
    (["--model", "resnet18", "--tome-r", "4"], "ToMe needs a model with a sequence of tokens"),
    (["--model", "mixer_s16_224", "--tome-r", "2"], "not a timm VisionTransformer|ToMe not available"),
    (["--model", "deit_tiny_patch16_224", "--remove-ratio", "0.25"], "--selection sel.json"),
    (["--model", "deit_tiny_patch16_224", "--compare", "dense,pruned"], "needs --remove-layers"),
    (["--model", "deit_tiny_patch16_224", "--tome-r", "4", "--compare", "dense"], r"no \+tome configuration"),
    (["--model", "deit_tiny_patch16_224", "--remove-layers", "1", "--compare", "dense"], "no pruned configuration"),
    (["--model", "deit_tiny_patch16_224,mixer_s16_224", "--checkpoint", "x.pth"], "exactly one model"),
    (["--model", "deit_tiny_patch16_224", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["--model", "deit_tiny_patch16_224", "--device", "cuda:0"] if not torch.cuda.is_available()
     else ["--model", "deit_tiny_patch16_224", "--device", "tpu"], "cuda|not supported|unknown device"),
])
def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, capsys, args, message):
    (tmp_path / "bad.pth").write_bytes(b"this is not a checkpoint")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    out_json = tmp_path / "out.json"
    rc = _cli().main([*args, "--no-progress", "--json", str(out_json)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("benchmark.py: error: "), err
    assert re.search(message, err[0], re.IGNORECASE), err[0]
    assert not out_json.exists() and not list(tmp_path.glob(".out.json*"))


def test_tome_macs_follow_the_merged_token_counts(deit_tiny_64):
    from shrink import tome

    size = (3, 64, 64)
    pruned = bench.count_macs(bench.build_variant(deit_tiny_64, "pruned", [0, 2, 4]), size)
    r0 = bench.build_variant(deit_tiny_64, "pruned+tome", [0, 2, 4], tome_r=0, tome_start_idx=1)
    assert bench.count_macs(r0, size)["total"] == pruned["total"]  # r = 0 merges nothing, costs nothing
    merged = bench.build_variant(deit_tiny_64, "pruned+tome", [0, 2, 4], tome_r=2, tome_start_idx=1)
    tokens = tome.tome_token_counts(merged, size)
    assert tokens[:3] == [17, 17, 17] and tokens[3] == 15 and tokens[-1] < tokens[3]  # block 3 = 2nd attention block
    ours = bench.count_macs(merged, size)
    assert ours["total"] < pruned["total"]
    assert bench.count_macs(merged, size, fused_attn=True)["total"] == ours["total"]  # handle == fused off
    # The MLPs see the merged token counts: fc1 + fc2 of block i cost 2 * tokens_i * D * 4D (mlp_ratio 4).
    d = deit_tiny_64.embed_dim
    mlp = sum(2 * n * d * 4 * d for n in tokens)
    qkv_proj = sum(4 * n_in * d * d for i, n_in in enumerate([17] + tokens[:-1]) if i not in (0, 2, 4))
    head = d * deit_tiny_64.num_classes
    assert ours["by_operator"]["linear"] == mlp + qkv_proj + head


@pytest.mark.slow  # two fresh interpreters importing torch + timm
def test_cli_end_to_end_in_a_subprocess(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmark.py"), "--model", "deit_tiny_patch16_224", "--img-size", "32",
           "--remove-layers", "0,2,4", "--batch-size", "2", "--warmup", "0", "--iters", "1", "--repeats", "1",
           "--no-latency", "--no-progress", "--threads", "1", "--json", str(tmp_path / "r.json")]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("| model | configuration |") and "pruned [0,2,4]" in p.stdout
    assert "Unsupported operator" not in p.stderr and "Warning" not in p.stderr, p.stderr
    assert json.loads((tmp_path / "r.json").read_text())["command"].startswith("python benchmark.py --model")
    bad = subprocess.run([*cmd[:3], "no_such_model_xyz", "--no-progress"], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip() == "benchmark.py: error: unknown model 'no_such_model_xyz': not a timm model name (see timm.list_models())"
