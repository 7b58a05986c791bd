"""Token merging (ToMe) on timm 1.x ViTs: equivalences, matching properties, schedules, adapter guards."""
from __future__ import annotations

import copy
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer

import shrink
from shrink.tome import (
    ToMeAttentionFreeBlock,
    ToMeBlock,
    ToMeDilutedBlock,
    apply_tome,
    attention_with_metric,
    is_tome,
    remove_tome,
    tome_info,
    tome_schedule,
    tome_state,
    tome_token_counts,
)
from shrink.tome_merge import (
    bipartite_soft_matching,
    init_source,
    max_merge,
    merge,
    merge_source,
    merge_wavg,
    ramp,
    split_ab,
)

REPO = Path(__file__).resolve().parents[1]
IMG = 64  # 4x4 = 16 patches per image: fast


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny models on a shared 2-core machine: OpenMP threads waiting on each other cost ~10 ms per op
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _seed(s: int = 0) -> None:
    torch.manual_seed(s)


def _tiny_vit(**kw) -> VisionTransformer:
    args = dict(img_size=IMG, patch_size=8, embed_dim=64, depth=4, num_heads=4, num_classes=10)
    args.update(kw)
    return VisionTransformer(**args).eval()


def _randomise_layerscale(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ls1.gamma", "ls2.gamma")):
                p.copy_(torch.rand_like(p) * 0.8 + 0.1)


def _exported_tiny() -> torch.nn.Module:
    m = timm.create_model("deit_tiny_patch16_224", img_size=IMG).eval()
    shrink.dilute(m, [0, 2])
    shrink.set_lambda(m, 0.0)
    return shrink.export(m)


def _variant(name: str) -> torch.nn.Module:
    _seed(0)
    if name == "deit3_small":
        m = timm.create_model("deit3_small_patch16_224", img_size=IMG).eval()
        _randomise_layerscale(m)
        return m
    if name == "qk_norm":
        return _tiny_vit(qk_norm=True)
    if name == "registers_avg":
        return _tiny_vit(reg_tokens=4, global_pool="avg", fc_norm=True)
    if name == "exported":
        return _exported_tiny()
    if name == "diluted_half":
        m = timm.create_model("deit_tiny_patch16_224", img_size=IMG).eval()
        return shrink.dilute(m, [1, 2], lam=0.5)
    return timm.create_model(f"{name}_patch16_224", img_size=IMG).eval()


VARIANTS = ["deit_tiny", "deit_tiny_distilled", "deit3_small", "qk_norm", "registers_avg", "exported", "diluted_half"]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


# --------------------------------------------------------------------------------------------------
# r = 0 equals the plain model; remove_tome restores it exactly
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", VARIANTS)
def test_r0_equals_plain_and_remove_restores(name):
    model = _variant(name)
    x = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))
    keys = list(model.state_dict())
    with torch.no_grad():
        ref = model(x)
        apply_tome(model, 0)
        assert is_tome(model)
        assert list(model.state_dict()) == keys  # blocks took over the submodules, keys unchanged
        out0 = model(x)
        assert _max_diff(out0, ref) <= 1e-5
        apply_tome(model, 2, policy="hidden")  # re-applying replaces the settings
        merged = model(x)
        assert _max_diff(merged, ref) > 1e-4  # it really merges (guards against a no-op adapter)
        remove_tome(model)
        assert not is_tome(model)
        assert not any(type(b).__name__.startswith("ToMe") for b in model.blocks)
        assert "pool" not in model.__dict__
        assert torch.equal(model(x), ref)


def test_blocks_that_see_no_merged_tokens_run_the_plain_path(monkeypatch):
    model = _variant("deit3_small")
    x = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
        apply_tome(model, [0, 2, 0] + [0] * 9)
        merging = model(x)
        # block 0 (r=0, nothing merged yet) is plain; block 1 merges; blocks 2.. weigh by size
        assert [b.tome_plain for b in model.blocks[:3]] == [True, False, False]
        model.blocks[0].tome_sized = True  # force the ToMe path: same result
        assert _max_diff(model(x), merging) <= 1e-5
        apply_tome(model, [0, 2, 0] + [0] * 9, prop_attn=False)
        assert [b.tome_plain for b in model.blocks[:3]] == [True, False, True]
        apply_tome(model, 0)
        assert all(b.tome_plain for b in model.blocks)

        def no_metric(*a, **k):
            raise AssertionError("r = 0 must not compute the ToMe attention / metric")

        monkeypatch.setattr(shrink.tome, "attention_with_metric", no_metric)
        assert torch.equal(model(x), ref)  # the timm code itself: bit-identical


def test_torch_export_of_a_merging_model():
    model = timm.create_model("deit_tiny_patch16_224", img_size=IMG).eval()
    apply_tome(model, (3, -0.5))
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        ref = model(x)
        ep = torch.export.export(model, (x,))
        state = tome_state(model)
        state.size, state.last_block = None, sys.maxsize  # tracing leaves fake tensors behind
        assert _max_diff(ep.module()(x), ref) <= 1e-5
        assert torch.equal(model(x), ref)


def test_remove_keeps_weight_changes_and_training_mode():
    model = _variant("diluted_half")
    apply_tome(model, 3)
    model.train()
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight.mul_(1.5)
    shrink.set_lambda(model, 0.25)  # the ToMe diluted blocks are still DilutedBlocks
    remove_tome(model)
    assert model.training and all(b.training for b in model.blocks)
    assert isinstance(model.blocks[1], shrink.DilutedBlock) and not isinstance(model.blocks[1], ToMeDilutedBlock)
    assert model.blocks[1].lambda_value == 0.25
    ref = timm.create_model("deit_tiny_patch16_224", img_size=IMG)
    ref.load_state_dict({k: v for k, v in model.state_dict().items() if not k.endswith("lam")})
    assert torch.equal(ref.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)


# --------------------------------------------------------------------------------------------------
# Matching, merge and proportional attention as pure functions
# --------------------------------------------------------------------------------------------------

def test_r_is_capped_at_half_the_unprotected_tokens():
    metric = torch.randn(3, 1 + 9, 8)
    m = bipartite_soft_matching(metric, r=100, num_protected=1)
    assert m.r == max_merge(10, 1) == 4
    assert merge(m, metric).shape == (3, 10 - 4, 8)
    m2 = bipartite_soft_matching(torch.randn(1, 2 + 7, 4), r=100, num_protected=2)
    assert m2.r == 3
    assert bipartite_soft_matching(metric, r=0, num_protected=1) is None
    assert bipartite_soft_matching(torch.randn(1, 2, 4), r=5, num_protected=1) is None


def test_protected_tokens_never_merge_even_when_identical_to_others():
    _seed(0)
    num_protected = 3
    x = torch.randn(2, 13, 6)
    metric = torch.randn(2, 13, 6)
    metric[:, :num_protected] = metric[:, num_protected:num_protected + 1]  # as similar as can be
    m = bipartite_soft_matching(metric, r=5, num_protected=num_protected)
    src = merge_source(m, init_source(2, 13))
    out, size = merge_wavg(m, x)
    assert torch.equal(out[:, :num_protected], x[:, :num_protected])
    assert torch.equal(size[:, :num_protected], torch.ones(2, num_protected, 1))
    for i in range(num_protected):  # row i is token i alone; column i appears in no other row
        assert torch.equal(src[:, i], torch.nn.functional.one_hot(torch.tensor(i), 13).float().expand(2, -1))
        assert float(src[:, :, i].sum()) == 2.0


def test_merged_token_is_size_weighted_mean():
    # One class token at position 0, then patches at positions 1..4. The official partition counts
    # positions over the whole sequence: A = even (2, 4), B = odd (1, 3); the class token is in A
    # but never merges. Position 2 is a near-copy of 3 in the metric, 4 is orthogonal to 1 and 3,
    # so r=1 merges 2 into 3.
    metric = torch.tensor([[[0.0, 0, 1], [0, 1, 0], [1, 0.01, 0], [1, 0, 0], [0, 0, 1]]])
    x = torch.randn(1, 5, 4)
    size = torch.tensor([[[1.0], [3.0], [1.0], [2.0], [5.0]]])
    m = bipartite_soft_matching(metric, r=1, num_protected=1)
    out, new_size = merge_wavg(m, x, size)
    # output order: [protected, kept A (4), B: 1, 3 (+2)]
    assert out.shape == (1, 4, 4)
    torch.testing.assert_close(out[0, 0], x[0, 0])
    torch.testing.assert_close(out[0, 1], x[0, 4])
    torch.testing.assert_close(out[0, 2], x[0, 1])
    torch.testing.assert_close(out[0, 3], (2 * x[0, 3] + 1 * x[0, 2]) / 3)
    assert new_size.flatten().tolist() == [1.0, 5.0, 3.0, 3.0]


# --------------------------------------------------------------------------------------------------
# The official partition (facebookresearch/ToMe) and its generalisation to any prefix
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_protected, a_pos, b_pos", [
    (0, [0, 2, 4, 6, 8], [1, 3, 5, 7]),  # no prefix token
    (1, [2, 4, 6, 8], [1, 3, 5, 7]),  # class token (position 0, in A): patches 1, 3, ... are A
    (2, [2, 4, 6, 8], [3, 5, 7]),  # class + distillation token (position 1, in B)
    (5, [6, 8], [5, 7]),  # class + 4 registers
])
def test_partition_alternates_over_the_whole_sequence(num_protected, a_pos, b_pos):
    pos = torch.arange(9.0).view(1, 9, 1)
    a, b = split_ab(pos, num_protected)
    assert a.flatten().tolist() == a_pos and b.flatten().tolist() == b_pos


def test_distilled_layout_hand_example():
    # class (0, A) and distillation (1, B) tokens, then A = 2, 4, 6 and B = 3, 5. In the metric 6 is
    # a copy of 3, 2 is close to 5, and 4 is orthogonal to both 3 and 5. Best edges: 6->3 (cos 1),
    # 2->5 (cos 0.995), 4->either (cos 0). r=2 merges 6 into 3 and 2 into 5; 4 stays.
    metric = torch.tensor([[[1.0, 1, 1], [1, 1, 1], [0.1, 1, 0], [1, 0, 0], [0, 0, 1], [0, 1, 0], [1, 0, 0]]])
    x = torch.arange(7.0).view(1, 7, 1).expand(1, 7, 2).contiguous()
    m = bipartite_soft_matching(metric, r=2, num_protected=2)
    assert m.src_idx.tolist() == [[2, 0]] and m.dst_idx.tolist() == [[0, 1]]  # indices into A, B
    out, size = merge_wavg(m, x)
    # [class, distillation, kept A (4), B: 3 (+6), 5 (+2)]
    assert out[0, :, 0].tolist() == [0.0, 1.0, 4.0, 4.5, 3.5]
    assert size.flatten().tolist() == [1.0, 1.0, 1.0, 2.0, 2.0]


def test_register_layout_hand_example():
    # class + 2 registers (positions 0-2; position 1 is in B but masked), then B = 3, 5 and A = 4, 6.
    # 4 is closest to 5 and 6 to 3, with 6->3 the better edge: r=1 merges only 6 into 3.
    metric = torch.tensor([[[1.0, 0, 0], [1, 0, 0], [1, 0, 0], [1, 0, 0], [0.2, 1, 0], [0, 1, 0], [1, 0.1, 0]]])
    x = torch.arange(7.0).view(1, 7, 1)
    m = bipartite_soft_matching(metric, r=1, num_protected=3)
    out, size = merge_wavg(m, x)
    assert out.flatten().tolist() == [0.0, 1.0, 2.0, 4.0, 4.5, 5.0]  # [prefix, kept A (4), B: 3 (+6), 5]
    assert size.flatten().tolist() == [1.0, 1.0, 1.0, 1.0, 2.0, 1.0]


def _official_definition(metric, x, size, r, p):
    """The official matching written out token by token (float64): A/B by position in the whole
    sequence, protected tokens masked, each A token's best B (lower index on ties), the r best
    edges (lower A index on ties) merged by size; order [prefix, kept A, B]."""
    n = x.shape[1]
    unit = metric / metric.norm(dim=-1, keepdim=True)
    r = min(r, (n - p) // 2)
    outs, sizes = [], []
    for bi in range(x.shape[0]):
        a_pos = [i for i in range(p, n) if i % 2 == 0]
        b_pos = [j for j in range(p, n) if j % 2 == 1]
        best = {}
        for i in a_pos:
            sims = [(float(unit[bi, i] @ unit[bi, j]), -j) for j in b_pos]
            top = max(sims)
            best[i] = (top[0], -top[1])
        merged = sorted(a_pos, key=lambda i: (-best[i][0], i))[:r]
        total = {j: x[bi, j] * size[bi, j] for j in b_pos}
        weight = {j: size[bi, j].clone() for j in b_pos}
        for i in merged:
            j = best[i][1]
            total[j] = total[j] + x[bi, i] * size[bi, i]
            weight[j] = weight[j] + size[bi, i]
        kept = [i for i in a_pos if i not in merged]
        outs.append(torch.stack([x[bi, i] for i in range(p)] + [x[bi, i] for i in kept]
                                + [total[j] / weight[j] for j in b_pos]))
        sizes.append(torch.stack([size[bi, i] for i in range(p)] + [size[bi, i] for i in kept]
                                 + [weight[j] for j in b_pos]))
    return torch.stack(outs), torch.stack(sizes)


@pytest.mark.parametrize("p, n, r", [(1, 17, 5), (1, 16, 100), (2, 18, 6), (2, 13, 3), (5, 21, 7), (0, 12, 4)])
def test_matching_follows_the_official_definition(p, n, r):
    gen = torch.Generator().manual_seed(n * 10 + p)
    metric = torch.randn(3, n, 6, generator=gen, dtype=torch.float64)
    x = torch.randn(3, n, 4, generator=gen, dtype=torch.float64)
    size = torch.randint(1, 5, (3, n, 1), generator=gen).double()
    m = bipartite_soft_matching(metric, r, num_protected=p)
    out, new_size = merge_wavg(m, x, size)
    ref, ref_size = _official_definition(metric, x, size, r, p)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(new_size.double(), ref_size)


def test_ramp_is_the_official_schedule():
    # lo = int(r (1 - inflection)), hi = 2r - lo, layer i: int(lo + i (hi - lo) / (L - 1))
    # r=13, inflection -0.5, 12 layers: lo = int(19.5) = 19, hi = 7, step -12/11 = -1.09:
    # 19, 17.9, 16.8, 15.7, 14.6, 13.5, 12.5, 11.4, 10.3, 9.2, 8.1, 7
    assert ramp(13, -0.5, 12) == [19, 17, 16, 15, 14, 13, 12, 11, 10, 9, 8, 7]
    # r=3, inflection 0.5, 4 layers: lo = int(1.5) = 1, hi = 5, step 4/3: 1, 2.33, 3.67, 5
    assert ramp(3, 0.5, 4) == [1, 2, 3, 5]
    assert ramp(5, -1.0, 3) == [10, 5, 0]  # the "decreasing" schedule: 2r down to 0
    assert ramp(7, 0.0, 5) == [7] * 5
    assert ramp(3, 0.5, 1) == [1]  # one layer: lo (the official formula divides by zero there)
    kinds = ["attn", "free", "attn", "attn", "free", "attn"]  # the ramp runs over the merging blocks
    assert tome_schedule(kinds, (3, 0.5)) == [1, 0, 2, 3, 0, 5]
    # with policy "hidden" all 6 blocks merge: step 4/5 = 0.8: 1, 1.8, 2.6, 3.4, 4.2, 5
    assert tome_schedule(kinds, (3, 0.5), policy="hidden") == [1, 1, 2, 3, 4, 5]


def test_repeated_merges_give_the_mean_of_the_source_tokens():
    _seed(3)
    x = torch.randn(2, 1 + 20, 5, dtype=torch.float64)
    cur, size, src = x, None, init_source(2, 21)
    for r in (6, 4, 3):
        m = bipartite_soft_matching(torch.randn(2, cur.shape[1], 7), r=r, num_protected=1)
        cur, size = merge_wavg(m, cur, size)
        src = merge_source(m, src)
        assert float(size.sum(dim=1).max()) == float(size.sum(dim=1).min()) == 21.0
        assert torch.equal(src.sum(dim=-1, keepdim=True), size)
    expected = (src.double() @ x) / size.double()
    torch.testing.assert_close(cur, expected)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_proportional_attention_equals_attention_over_repeated_keys(fused, qk_norm):
    _seed(0)
    attn = Attention(32, num_heads=4, qkv_bias=True, qk_norm=qk_norm, norm_layer=torch.nn.LayerNorm).eval()
    attn.fused_attn = fused
    x = torch.randn(2, 6, 32)
    size = torch.tensor([[1, 3, 1, 2, 4, 1], [2, 1, 1, 1, 5, 3]], dtype=torch.float32).unsqueeze(-1)
    with torch.no_grad():
        out, metric = attention_with_metric(attn, x, size)
        for b in range(2):
            reps = size[b, :, 0].long()
            x_rep = x[b].repeat_interleave(reps, dim=0).unsqueeze(0)  # token j repeated size_j times
            ref = attn(x_rep)[0]
            first = torch.cumsum(reps, 0) - reps  # first copy of every token
            assert _max_diff(out[b], ref[first]) <= 1e-5
    assert metric.shape == (2, 6, 8)  # keys averaged over the 4 heads


# --------------------------------------------------------------------------------------------------
# Model level: sizes, protection, fused vs unfused, pooling, diluted / attention-free blocks
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["deit_tiny_distilled", "registers_avg"])
def test_sizes_sum_to_token_count_after_every_block_and_prefix_is_kept(name):
    model = _variant(name)
    apply_tome(model, 3, trace_source=True)
    state = tome_state(model)
    n0 = model.patch_embed.num_patches + model.num_prefix_tokens
    seen = []

    def check(_m, _i, out):
        size = state.size if state.size is not None else torch.ones(out.shape[0], out.shape[1], 1)
        assert size.shape[:2] == out.shape[:2]
        assert torch.all(size.sum(dim=1) == n0)
        seen.append(out.shape[1])

    for b in model.blocks:
        b.register_forward_hook(check)
    with torch.no_grad():
        model(torch.randn(2, 3, IMG, IMG))
    assert seen[-1] < n0 and len(seen) == len(model.blocks)
    p = model.num_prefix_tokens
    assert torch.equal(state.source[:, :p, :p], torch.eye(p).expand(2, -1, -1))
    assert float(state.source[:, p:, :p].abs().sum()) == 0.0  # no other token contains a prefix token
    assert torch.equal(state.source.sum(dim=-1, keepdim=True), state.size)


@pytest.mark.parametrize("name", ["deit_tiny", "deit3_small", "qk_norm", "diluted_half"])
def test_fused_and_unfused_attention_agree(name):
    model = _variant(name)
    apply_tome(model, 3, start_idx=1)
    x = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        fused = model(x)
        for b in model.blocks:
            if hasattr(b, "attn"):
                b.attn.fused_attn = False
        plain = model(x)
    assert tome_token_counts(model)[-1] < model.patch_embed.num_patches + 1
    assert _max_diff(fused, plain) <= 1e-5


def test_avg_pool_is_weighted_by_size():
    model = _variant("registers_avg")
    apply_tome(model, 4)
    with torch.no_grad():
        feats = model.forward_features(torch.randn(2, 3, IMG, IMG))
        size = tome_state(model).size
        p = model.num_prefix_tokens
        pooled = model.pool(feats)
        for b in range(2):
            expanded = feats[b, p:].repeat_interleave(size[b, p:, 0].long(), dim=0)
            assert expanded.shape[0] == model.patch_embed.num_patches
            torch.testing.assert_close(pooled[b], expanded.mean(dim=0))
        assert _max_diff(pooled, feats[:, p:].mean(dim=1)) > 1e-6  # differs from the unweighted mean


@pytest.mark.parametrize("policy", ["none", "hidden"])
def test_diluted_at_lambda0_matches_exported_under_tome(policy):
    _seed(0)
    dil = timm.create_model("deit_tiny_patch16_224", img_size=IMG).eval()
    shrink.dilute(dil, [0, 2], lam=0.0)
    exp = shrink.export(dil)
    apply_tome(dil, 2, start_idx=1, policy=policy)
    apply_tome(exp, 2, start_idx=1, policy=policy)
    assert isinstance(dil.blocks[0], ToMeDilutedBlock) and isinstance(exp.blocks[0], ToMeAttentionFreeBlock)
    assert tome_info(dil)["schedule"] == tome_info(exp)["schedule"]
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        assert _max_diff(dil(x), exp(x)) <= 1e-5
    assert tome_token_counts(dil) == tome_token_counts(exp)


def test_diluted_at_lambda1_matches_plain_blocks_under_tome():
    _seed(0)
    plain = timm.create_model("deit_tiny_patch16_224", img_size=IMG).eval()
    dil = shrink.dilute(timm.create_model("deit_tiny_patch16_224", img_size=IMG).eval(), [1, 3], lam=1.0)
    dil.load_state_dict(plain.state_dict(), strict=False)
    apply_tome(plain, 3)
    apply_tome(dil, 3)
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        assert _max_diff(plain(x), dil(x)) <= 1e-6


def test_attention_free_policy_hidden_merges_and_none_does_not():
    model = _exported_tiny()  # blocks 0 and 2 attention-free; attention blocks 1, 3, 4, ...
    apply_tome(model, 2, start_idx=0, policy="none")
    none = tome_token_counts(model)
    apply_tome(model, 2, start_idx=0, policy="hidden")
    hidden = tome_token_counts(model)
    assert isinstance(model.blocks[0], ToMeAttentionFreeBlock) and isinstance(model.blocks[1], ToMeBlock)
    # start_idx=0 starts at block 1 (the first block with attention): block 0 never merges
    assert none[:4] == [17, 15, 15, 13] and hidden[:4] == [17, 15, 13, 11]


def test_deit_base_reference_token_counts():
    # DeiT-B at 224: 1 class token + 14 * 14 = 196 patches = 197 tokens. Blocks [0, 1, 3, 4, 6] are
    # attention-free (policy "none": they pass tokens through), so the attention blocks are
    # 2, 5, 7, 8, 9, 10, 11. start_idx=1 counts attention blocks: merging starts at the second one,
    # block 5. Each merging block removes min(24, unprotected // 2) tokens:
    #   blocks 0-4: 197 (no merge)       block 5: 196 // 2 = 98 >= 24  -> 173
    #   block 6: attention-free -> 173   block 7: 172 // 2 = 86 >= 24  -> 149
    #   block 8: 148 // 2 = 74 -> 125    block 9: 124 // 2 = 62 -> 101
    #   block 10: 100 // 2 = 50 -> 77    block 11: 76 // 2 = 38 -> 53
    expected = [197, 197, 197, 197, 197, 173, 173, 149, 125, 101, 77, 53]
    _seed(0)
    model = timm.create_model("deit_base_patch16_224").eval()
    shrink.dilute(model, [0, 1, 3, 4, 6], lam=0.0)
    shrink.export(model, inplace=True)
    apply_tome(model, 24, start_idx=1)
    assert tome_info(model)["schedule"] == [0, 0, 0, 0, 0, 24, 0, 24, 24, 24, 24, 24]
    assert tome_token_counts(model, batch=1) == expected


def test_state_resets_without_block0_and_survives_deepcopy():
    _seed(0)
    model = timm.create_model("deit_tiny_patch16_224", img_size=IMG).eval()
    shrink.dilute(model, [0], lam=0.0)
    apply_tome(model, 2)
    shrink.export(model, inplace=True)  # block 0 becomes a plain AttentionFreeBlock, the others stay ToMe
    assert not isinstance(model.blocks[0], ToMeAttentionFreeBlock) and isinstance(model.blocks[1], ToMeBlock)
    x = torch.randn(1, 3, IMG, IMG)
    with torch.no_grad():
        first, second = model(x), model(x)  # a stale state would break the second forward
        assert torch.equal(first, second)
        twin = copy.deepcopy(model)
        assert tome_state(twin) is not tome_state(model) and tome_state(twin).model is twin
        assert torch.equal(twin(x), first)
    assert tome_token_counts(model) == [17, 15, 13, 11, 9, 7, 5, 3, 2, 2, 2, 2]


# --------------------------------------------------------------------------------------------------
# Schedules and errors
# --------------------------------------------------------------------------------------------------

def test_schedule_forms():
    kinds = ["attn", "free", "attn", "attn", "free", "attn"]
    assert tome_schedule(kinds, 5) == [5, 0, 5, 5, 0, 5]
    assert tome_schedule(kinds, 5, start_idx=1) == [0, 0, 5, 5, 0, 5]
    assert tome_schedule(kinds, 5, start_idx=1, policy="hidden") == [0, 0, 5, 5, 5, 5]
    assert tome_schedule(kinds, (4, -1.0)) == [8, 0, 5, 2, 0, 0]
    assert tome_schedule(kinds, (4, 0.0)) == [4, 0, 4, 4, 0, 4]
    assert tome_schedule(kinds, [1, 0, 2, 3, 0, 4]) == [1, 0, 2, 3, 0, 4]
    assert ramp(10, 0.5, 3) == [5, 10, 15]
    for bad in [dict(r=-1), dict(r=[1, 2]), dict(r=(4, 2.0)), dict(r=1.5), dict(r=3, start_idx=4),
                dict(r=3, policy="mlp"), dict(r=[0, 1, 0, 0, 0, 0]), dict(r=[0] * 6, start_idx=1)]:
        with pytest.raises(shrink.ShrinkError):
            tome_schedule(kinds, **bad)


@pytest.mark.parametrize("make", [
    lambda: timm.create_model("mixer_s16_224", img_size=IMG, num_classes=10),
    lambda: timm.create_model("resnet18", num_classes=10),
    lambda: _tiny_vit(global_pool="map"),
])
def test_apply_on_unsupported_models_raises(make):
    model = make()
    with pytest.raises(shrink.ShrinkError) as e:
        apply_tome(model, 4)
    assert "\n" not in str(e.value)
    assert not is_tome(model)


def test_fully_attention_free_model_needs_policy_hidden():
    model = _tiny_vit(depth=2)
    shrink.dilute(model, [0, 1], lam=0.0)
    shrink.export(model, inplace=True)
    with pytest.raises(shrink.ShrinkError):
        apply_tome(model, 2)
    apply_tome(model, 2, policy="hidden")
    assert tome_token_counts(model) == [1 + 64 - 2, 1 + 64 - 4]


def test_gradient_checkpointing_is_refused_and_training_works_without_it():
    model = _tiny_vit()
    apply_tome(model, 3)
    model.train()
    x = torch.randn(2, 3, IMG, IMG)
    model(x).sum().backward()  # merging is differentiable for the tokens
    assert model.blocks[0].attn.qkv.weight.grad is not None
    model.set_grad_checkpointing(True)
    with pytest.raises(shrink.ShrinkError, match="gradient checkpointing"):
        model(x)
    with torch.no_grad():
        model(x)  # no recomputation without gradients: allowed
    apply_tome(model, 0)  # nothing merges: checkpointing is fine
    model(x).sum().backward()


def test_forward_intermediates_nlc_works_nchw_is_refused():
    model = _tiny_vit()
    apply_tome(model, 3)
    x = torch.randn(1, 3, IMG, IMG)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x, output_fmt="NLC")
        assert [t.shape[1] for t in inter] == [61, 58, 55, 52]  # 64 patches - 3 per block, class token split off
        with pytest.raises(shrink.ShrinkError, match="NCHW"):
            model.forward_intermediates(x)
        remove_tome(model)
        assert model.forward_intermediates(x)[1][0].shape == (1, 64, 8, 8)


def test_bad_reapply_keeps_the_previous_settings():
    model = _tiny_vit()
    apply_tome(model, 3)
    with pytest.raises(shrink.ShrinkError):
        apply_tome(model, 3, start_idx=10)
    assert is_tome(model) and tome_info(model)["schedule"] == [3, 3, 3, 3]
    assert tome_token_counts(model) == [62, 59, 56, 53]


def test_attn_mask_is_refused_and_remove_without_apply_raises():
    model = _tiny_vit()
    with pytest.raises(shrink.ShrinkError):
        remove_tome(model)
    apply_tome(model, 1)
    with pytest.raises(shrink.ShrinkError):
        model.blocks[0](torch.randn(1, 17, 64), attn_mask=torch.zeros(17, 17))
    assert isinstance(model.blocks[0], Block)  # ToMe blocks remain timm Blocks for isinstance checks


# --------------------------------------------------------------------------------------------------
# Visualisation
# --------------------------------------------------------------------------------------------------

def _test_image(path: Path, size: int = 64) -> Path:
    a = np.zeros((size, size + 16, 3), np.uint8)
    a[: size // 2] = (220, 30, 30)
    a[size // 2:, size // 2:] = (20, 200, 40)
    Image.fromarray(a).save(path)
    return path


def test_merge_png_and_groups(tmp_path):
    from shrink.tome_vis import merge_groups, render_groups, save_merge_png

    model = _tiny_vit()
    with pytest.raises(shrink.ShrinkError):
        save_merge_png(model, _test_image(tmp_path / "in.png"), tmp_path / "x.png")
    apply_tome(model, 3)
    out = save_merge_png(model, tmp_path / "in.png", tmp_path / "merges.png", title="t")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left
    groups = merge_groups(model, torch.randn(3, IMG, IMG))
    assert groups.shape == (8, 8) and len(groups.unique()) == tome_token_counts(model)[-1] - 1
    assert tome_state(model).trace_source is False  # restored after the forward
    pic = render_groups(np.full((16, 16, 3), 0.5), torch.tensor([[0, 0], [1, 1]]))
    assert pic.shape == (16, 16, 3) and np.allclose(pic[0, 0], 0.5) and np.allclose(pic[7, 3], 1.0)


def _cli():
    spec = importlib.util.spec_from_file_location("tome_visualize", REPO / "scripts" / "tome_visualize.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_visualize_cli(tmp_path, capsys):
    img = _test_image(tmp_path / "in.png")
    common = ["--model", "deit_tiny_patch16_224", "--img-size", "64", "--image", str(img), "--r", "2"]
    cli = _cli()
    assert cli.main(common + ["--out", str(tmp_path / "m.png")]) == 0
    assert (tmp_path / "m.png").stat().st_size > 1000
    capsys.readouterr()
    assert cli.main(common + ["--start-idx", "99", "--out", str(tmp_path / "b.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: start_idx=99") and not any("Traceback" in e for e in err)
    assert not (tmp_path / "b.png").exists()
    assert cli.main(common[:-4] + ["--image", str(tmp_path / "missing.png"), "--out", str(tmp_path / "c.png")]) == 2
    assert not (tmp_path / "c.png").exists()


@pytest.mark.slow
def test_visualize_cli_subprocess(tmp_path):
    img = _test_image(tmp_path / "in.png")
    script = REPO / "scripts" / "tome_visualize.py"
    assert "--start-idx" in subprocess.run([sys.executable, str(script), "--help"], capture_output=True,
                                           text=True, timeout=120).stdout
    bad = subprocess.run([sys.executable, str(script), "--image", str(img), "--r", "2", "--start-idx", "99",
                          "--model", "deit_tiny_patch16_224", "--img-size", "64", "--out", str(tmp_path / "b.png")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("error: start_idx=99")
    assert not (tmp_path / "b.png").exists()


def test_merge_png_for_a_greyscale_model(tmp_path):
    """vit_digits takes 1-channel 8x8 images: an RGB picture is converted to grey, not refused."""
    from PIL import Image

    from shrink.tome_vis import save_merge_png

    model = shrink.create_model("vit_digits", pretrained=True).eval()
    shrink.apply_tome(model, r=2)
    Image.fromarray((torch.rand(16, 16, 3) * 255).to(torch.uint8).numpy()).save(tmp_path / "rgb.png")
    out = save_merge_png(model, tmp_path / "rgb.png", tmp_path / "m.png")
    assert out.is_file() and out.stat().st_size > 0


def test_official_comparison_script_needs_the_official_code(tmp_path, capsys):
    """scripts/tome_vs_official.py never ships the official code: without it, one line and exit 2."""
    spec = importlib.util.spec_from_file_location("tome_vs_official", REPO / "scripts" / "tome_vs_official.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for argv in (["--official-path", str(tmp_path), "logits"], ["speed"]):
        assert mod.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ")
