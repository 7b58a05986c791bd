"""shrink.bench.measure: exact parameter and MAC counts (ToMe included), timing, peak memory, OOM halving."""
from __future__ import annotations

import copy
import logging
import warnings

import pytest
import timm
import torch
from torch import nn

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # fvcore's import touches the deprecated torch.jit.script
    from fvcore.nn import FlopCountAnalysis

import shrink
from shrink import bench

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def deit_tiny_224():
    return timm.create_model("deit_tiny_patch16_224").eval()


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


def test_time_calls_counts_and_repeats():
    calls = []
    first, per_call = bench.time_calls(lambda: calls.append(1), warmup=2, iters=3, repeats=4)
    assert len(calls) == 2 + 3 * 4
    assert len(per_call) == 4 and all(t >= 0 for t in per_call)
    assert first is not None


def test_cpu_peak_memory_sees_a_large_allocation():
    with bench.PeakMemory(torch.device("cpu")) as peak:
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


def test_tome_macs_follow_the_merged_token_counts(deit_tiny_64):
    from shrink.merging import patch as tome

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
