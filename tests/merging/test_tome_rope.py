"""Token merging on timm's Eva class (shrink/tome_rope.py): rotary embeddings evaluated at the merged
tokens' size-weighted mean coordinates (EVA-02 / PE ``RotaryEmbeddingCat``, DINOv3, ``rope_mixed``,
MRoPE), EvaAttention and AttentionRope (grouped-query too), post-norm blocks, MAP and avg pooling."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
from timm.layers import pos_embed_sincos

import shrink
from shrink.merging.kernels import AttentionCall, attention_kernel
from shrink.merging.merge import bipartite_soft_matching, init_source, merge_source, merge_wavg
from shrink.merging.patch import tome_state, tome_token_counts
from shrink.merging.rope import TRACKER, rope_attention, rope_coords, rope_embed_at

from .._families import CASES, SMALL
from .._families import build as build_case

# keys of tests/_families.py (the block-contract table) plus options that only the merging path sees
EXTRA: dict[str, tuple[str, dict, int]] = {
    "eva-map": ("eva02_tiny_patch14_224", dict(img_size=28, global_pool="map", **SMALL), 28),
    # Perception Encoder: AttentionRope, 'xy' grid with offset 1 and a reference shape, MAP head; GQA
    "pe-gqa": ("vit_pe_core_tiny_patch16_384", dict(img_size=32, qkv_fused=False, num_kv_heads=1, **SMALL), 32),
    "mrope": ("eva02_tiny_patch14_224", dict(img_size=28, rope_type="mrope", **SMALL), 28),
    "rope-mixed-4x4": ("vit_small_patch16_rope_mixed_224", dict(img_size=64, **SMALL), 64),
}
FAMILY_KEYS = ["eva02-rope", "dinov3-rope", "rope-mixed", "eva-postnorm"]
KEYS = FAMILY_KEYS + ["eva-map", "pe-gqa", "mrope"]


def build(key: str, seed: int = 0) -> torch.nn.Module:
    if key in CASES:
        return build_case(key, seed=seed)
    name, kwargs, _ = EXTRA[key]
    torch.manual_seed(seed)
    model = timm.create_model(name, num_classes=5, **kwargs).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model


def img_size(key: str) -> int:
    return CASES[key][2] if key in CASES else EXTRA[key][2]


def images(key: str, batch: int = 2, seed: int = 1, size: int | None = None) -> torch.Tensor:
    size = size or img_size(key)
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def expected_counts(n: int, protected: int, schedule: list[int]) -> list[int]:
    out = []
    for r in schedule:
        n -= min(r, (n - protected) // 2)
        out.append(n)
    return out


def grid_table(model: torch.nn.Module, shape) -> torch.Tensor:
    """timm's rope table for an (H, W) grid, as Eva._pos_embed gets it."""
    rope = model.rope
    if model.dynamic_img_size or not hasattr(rope, "feat_shape"):
        return rope.get_embed(shape=shape)
    return rope.get_embed()


def half_offset_table(rope: torch.nn.Module, shape, monkeypatch) -> torch.Tensor:
    """timm's own table with every coordinate moved by +0.5 grid step on both axes: row (i, j) is the
    embedding at the mean of patches (i, j) and (i + 1, j + 1), computed by timm."""
    r2 = copy.deepcopy(rope)
    if hasattr(r2, "grid_offset"):  # Cat, DinoV3: the offset is added in index units, before any scaling
        r2.grid_offset = r2.grid_offset + 0.5
        r2.reset_parameters()
        return r2.get_embed(shape=shape)
    orig = pos_embed_sincos._build_grid  # Mixed, MRope: no offset setting, shift timm's grid builder

    def shifted(*args, **kw):
        return orig(*args, **{**kw, "grid_offset": kw.get("grid_offset", 0.0) + 0.5})

    monkeypatch.setattr(pos_embed_sincos, "_build_grid", shifted)
    out = r2.get_embed(shape=shape)
    monkeypatch.setattr(pos_embed_sincos, "_build_grid", orig)
    return out


def as_heads(table: torch.Tensor) -> torch.Tensor:
    """(N, 2D) -> (1, N, 2D); (depth, heads, N, 2D) stays."""
    return table.unsqueeze(0) if table.dim() == 2 else table


# --------------------------------------------------------------------------------------------------
# The formula: equal to timm on the grid, the mean when two tokens merge
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", KEYS)
def test_rope_embedding_at_the_grid_is_timms_table(key):
    model = build(key)
    shape = tuple(model.patch_embed.grid_size)
    table = as_heads(grid_table(model, shape))  # (depth or 1, heads or N ...)
    coords = rope_coords(model.rope, shape).unsqueeze(0)
    for i in range(len(model.blocks) if model.rope_mixed else 1):
        mine = rope_embed_at(model.rope, coords, i)[0]  # (heads or 1, N, 2D)
        ref = table[i] if model.rope_mixed else table
        assert mine.shape == ref.shape
        assert maxdiff(mine, ref) <= 1e-6


@pytest.mark.parametrize("key", ["eva02-rope", "pe-gqa", "dinov3-rope", "rope-mixed", "mrope"])
def test_two_identical_tokens_merge_to_the_embedding_at_their_mean(key, monkeypatch):
    """Tokens p = (0, 0) and q = (1, 1) with the same metric merge; the merged token's rotary
    embedding is timm's at ((p + q) / 2), here timm's table shifted by half a step, row p."""
    model = build(key)
    rope = model.rope
    H, W = shape = tuple(model.patch_embed.grid_size)
    assert W % 2 == 0  # p (even position) in set A, q = p + W + 1 (odd) in set B
    p, q = 0, W + 1
    coords = rope_coords(rope, shape).unsqueeze(0)  # (1, N, 2)
    metric = torch.randn(1, H * W, 8, generator=torch.Generator().manual_seed(0))
    metric[:, q] = metric[:, p]
    m = bipartite_soft_matching(metric, 1, num_protected=0)
    assert m.src_idx.tolist() == [[p // 2]] and m.dst_idx.tolist() == [[q // 2]]
    merged, size = merge_wavg(m, coords)
    row = (size[0, :, 0] == 2).nonzero().item()
    assert maxdiff(merged[0, row], (coords[0, p] + coords[0, q]) / 2) == 0.0
    ref = as_heads(half_offset_table(rope, shape, monkeypatch))
    for i in range(len(model.blocks) if model.rope_mixed else 1):
        mine = rope_embed_at(rope, merged, i)[0, :, row]  # (heads or 1, 2D)
        want = (ref[i] if model.rope_mixed else ref)[:, p]
        assert maxdiff(mine, want) <= 1e-5
        # and not the embedding of either patch: the position really moved
        assert maxdiff(mine, rope_embed_at(rope, coords, i)[0, :, p]) > 1e-2


@pytest.mark.parametrize("key", ["dinov3-rope", "rope-mixed-4x4"])
def test_identical_patches_merge_and_attend_with_the_rope_at_their_mean(key, monkeypatch):
    """A model whose patches p and q are identical (no absolute position table): their tokens match
    perfectly on the keys, merge, and the kernel's attention output on the merged tokens is timm's
    attention with the rope at their mean (timm's half-step table) and log(size) on the keys."""
    model = build(key)
    size_px = 64
    img = images(key, batch=1, size=size_px)
    ph, pw = model.patch_embed.patch_size
    H, W = size_px // ph, size_px // pw
    p, q = 1, W + 2  # (0, 1) and (1, 2): p in set A, q in set B behind an odd number of prefix tokens
    img[..., ph:2 * ph, 2 * pw:3 * pw] = img[..., 0:ph, pw:2 * pw]  # patch q := patch p
    npt = model.num_prefix_tokens
    assert npt % 2 == 1 and model.pos_embed is None
    with torch.no_grad():
        x = model.norm_pre(model._pos_embed(model.patch_embed(img))[0])
        table = grid_table(model, (H, W))
    assert maxdiff(x[:, npt + p], x[:, npt + q]) == 0.0
    shrink.apply_tome(model, r=1)
    state = tome_state(model)
    model(img)  # records the grid
    state.size, state.tracked = None, {}  # the kernel starts on whole tokens
    attn = next(a for a in model.modules() if attention_kernel(a) is rope_attention)
    block_table = table[0] if model.rope_mixed else table
    with torch.no_grad():
        _, metric = rope_attention(attn, x, AttentionCall(None, True, 0, {"rope": block_table}, state))
    m = bipartite_soft_matching(metric, 1, npt)
    assert m.src_idx.tolist() == [[p // 2]] and m.dst_idx.tolist() == [[q // 2]]
    coords = state.trackers[TRACKER](x, state)
    xm, size = merge_wavg(m, x)
    state.size, state.tracked = size, {TRACKER: merge_wavg(m, coords)[0]}
    with torch.no_grad():
        out, _ = rope_attention(attn, xm, AttentionCall(size, False, 0, {"rope": block_table}, state))
    # the reference: timm's forward, each patch token with timm's rope row of its own patch, the merged
    # one with the row of timm's half-step table at p
    src = merge_source(m, init_source(1, x.shape[1]))[0, npt:, npt:]  # (N' patches, N patches)
    rows = src.argmax(dim=1)
    half = half_offset_table(model.rope, (H, W), monkeypatch)
    half = half[0] if model.rope_mixed else half  # (heads, N, 2D) or (N, 2D), as block_table
    ref_rope = block_table[..., rows, :].clone()
    merged_row = (src.sum(dim=1) == 2).nonzero().item()
    ref_rope[..., merged_row, :] = half[..., p, :]
    bias = size.log().transpose(1, 2).unsqueeze(1)
    with torch.no_grad():
        ref = attn(xm, rope=ref_rope, attn_mask=bias)
    assert maxdiff(out, ref) <= 1e-5
    state.size, state.tracked = None, {}


# --------------------------------------------------------------------------------------------------
# Acceptance per family: r = 0 is timm, r > 0 merges (dense and exported), pooling weighs by size
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", KEYS)
def test_r0_is_timm_and_merging_counts_and_finite(key):
    model, x = build(key), images(key)
    ref = model(x)
    shrink.apply_tome(model, r=0)
    assert maxdiff(model(x), ref) == 0.0
    n0 = tome_token_counts(model, input_size=img_size(key))[0]
    npt = model.num_prefix_tokens
    shrink.apply_tome(model, r=1)
    counts = tome_token_counts(model, input_size=img_size(key))
    assert counts == expected_counts(n0, npt, [1] * len(model.blocks)) and counts[-1] < n0
    y = model(x)
    assert torch.isfinite(y).all() and maxdiff(y, ref) > 0
    shrink.apply_tome(model, r=1, prop_attn=False)  # no size weights: the rope still follows the tokens
    assert torch.isfinite(model(x)).all() and tome_token_counts(model, input_size=img_size(key)) == counts
    # dense outputs come back on the full patch grid; the block before the first merge is timm's
    shrink.apply_tome(model, r=[0, 1, 1])
    inter = model.forward_intermediates(x, indices=[0, 2], intermediates_only=True)
    shrink.remove_tome(model)
    plain = model.forward_intermediates(x, indices=[0, 2], intermediates_only=True)
    assert [t.shape for t in inter] == [t.shape for t in plain]
    assert maxdiff(inter[0], plain[0]) <= 1e-5
    # the exported model (block 0 attention-free) merges too
    small = shrink.export(shrink.dilute(copy.deepcopy(model), [0], lam=0.0))
    for policy in ("none", "hidden"):
        shrink.apply_tome(small, r=1, policy=policy)
        counts = tome_token_counts(small, input_size=img_size(key))
        assert counts[-1] < n0 and counts == sorted(counts, reverse=True)
        assert torch.isfinite(small(x)).all()


@pytest.mark.parametrize("key", ["eva02-rope", "eva-map"])
def test_pooling_weighs_merged_tokens_by_size(key):
    """Pooling tokens [a, b] of sizes [2, 1] equals pooling [a, a, b] (avg: patch tokens; MAP: every token)."""
    model = build(key)
    shrink.apply_tome(model, r=1)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 1, 32, generator=g), torch.randn(2, 1, 32, generator=g)
    prefix = torch.randn(2, model.num_prefix_tokens, 32, generator=g)
    state = tome_state(model)
    state.size = torch.tensor([1.0] * model.num_prefix_tokens + [2.0, 1.0]).expand(2, -1).unsqueeze(-1)
    pooled = model.forward_head(torch.cat([prefix, a, b], dim=1), pre_logits=True)
    state.size = None
    whole = model.forward_head(torch.cat([prefix, a, a, b], dim=1), pre_logits=True)
    plain = model.forward_head(torch.cat([prefix, a, b], dim=1), pre_logits=True)
    assert maxdiff(pooled, whole) <= 1e-5 and maxdiff(pooled, plain) > 1e-4


def test_refusals_are_one_line():
    # train-time coordinate augmentation: its random grid cannot follow the merged tokens
    model = timm.create_model("eva02_tiny_patch14_224", img_size=28, rope_shift_coords=0.5, **SMALL)
    shrink.apply_tome(model, r=1)
    x = images("eva02-rope")
    model.train()
    with pytest.raises(shrink.ShrinkError, match="augmentation") as e:
        model(x)
    assert "\n" not in str(e.value)
    model.eval()
    assert torch.isfinite(model(x)).all()
    # patch dropout while training: the kept patches' positions are unknown
    model = timm.create_model("eva02_tiny_patch14_224", img_size=56, patch_drop_rate=0.5, **SMALL)
    shrink.apply_tome(model, r=1)
    model.train()
    with pytest.raises(shrink.ShrinkError, match="patch dropout"):
        model(images("eva02-rope", size=56))
    # an attention-pool head with its own positional table; a rope class with no coordinate formula here
    model = build("eva-map")
    model.attn_pool.pos_embed = torch.nn.Parameter(torch.zeros(4, 32))
    with pytest.raises(shrink.ShrinkError, match="attention pooling"):
        shrink.apply_tome(model, r=1)
    model = build("eva02-rope")
    model.rope = pos_embed_sincos.RotaryEmbedding(dim=16, feat_shape=[2, 2])
    with pytest.raises(shrink.ShrinkError, match="RotaryEmbedding rotary") as e:
        shrink.apply_tome(model, r=1)
    assert "\n" not in str(e.value)
    shrink.apply_tome(model, r=0)  # r = 0 is never refused
