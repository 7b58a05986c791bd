"""Token merging on the families that run timm's own attention or the block contract's fused one:
padded NaFlexVit batches, ParallelScalingBlock / DiffParallelScalingBlock, windowed SAM (refused), and
torch.compile of merged models of every family (no recompilation between two batches of one shape)."""
from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import shrink
from shrink.blocks.contract import get_blocks
from shrink.merging.kernels import AttentionCall
from shrink.merging.merge import bipartite_soft_matching
from shrink.merging.patch import key_validity, tome_state

from .._families import CASES, build, images

P = 16  # NaFlexVit's patch size in tests/_families.py


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _naflex_batch(valid_rows: list[list[int]], seed: int = 0):
    """Pre-patchified NaFlex input: patches (B, N, P*P*3), coordinates on a 2 x 3 grid, validity."""
    n = len(valid_rows[0])
    g = torch.Generator().manual_seed(seed)
    patches = torch.randn(len(valid_rows), n, P * P * 3, generator=g)
    coord = torch.tensor([[i // 3, i % 3] for i in range(n)]).expand(len(valid_rows), -1, -1)
    return patches, coord, torch.tensor(valid_rows, dtype=torch.bool)


# ---- the matching with padding -------------------------------------------------------------------

def test_matching_never_pairs_a_real_token_with_padding_and_pairs_padding_first():
    g = torch.Generator().manual_seed(0)
    metric = torch.randn(3, 9, 4, generator=g)
    valid = torch.tensor([[1] * 9, [1] * 6 + [0] * 3, [1, 1, 1, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    m = bipartite_soft_matching(metric, 4, 1, valid)
    a_idx = torch.arange(1, 9)[1::2]  # A = even positions of the sequence (1 protected token): 2, 4, 6, 8
    b_idx = torch.arange(1, 9)[::2]  # B = 1, 3, 5, 7
    src, dst = a_idx[m.src_idx], b_idx[m.dst_idx]
    for row in range(3):
        assert torch.equal(valid[row, src[row]], valid[row, dst[row]])  # no mixed pair
    assert set(src[2].tolist()) >= {4, 6, 8}  # the padding of sample 2 (A: 4, 6, 8) merges first
    assert m.r == 4
    # a sample with one real token in A and no real token in B could only merge it with padding: r is capped
    lonely = torch.tensor([[1, 0, 1, 0, 0]], dtype=torch.bool)  # protected, B pad, A real, B pad, A pad
    m = bipartite_soft_matching(torch.randn(1, 5, 4, generator=g), 2, 1, lonely)
    assert m is not None and m.r == 1 and (torch.arange(1, 5)[1::2][m.src_idx] == 4).all()


@pytest.mark.parametrize("form", ["bool-symmetric", "additive-key-only", "additive-inf"])
def test_key_validity_reads_padding_masks_and_refuses_other_masks(form):
    valid = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    if form == "bool-symmetric":
        mask = (valid[:, :, None] & valid[:, None, :]).unsqueeze(1)
    elif form == "additive-key-only":
        mask = torch.zeros(2, 1, 1, 4).masked_fill(~valid[:, None, None, :], torch.finfo(torch.float32).min)
    else:
        mask = torch.zeros(2, 1, 4, 4).masked_fill(~valid[:, None, None, :], float("-inf"))
    assert torch.equal(key_validity(mask, 4), valid)
    with pytest.raises(shrink.ShrinkError, match="padding masks only") as e:
        key_validity(torch.randn(2, 1, 4, 4), 4)  # a bias, not a padding mask
    assert "\n" not in str(e.value)
    causal = torch.ones(4, 4, dtype=torch.bool).tril()
    with pytest.raises(shrink.ShrinkError, match="padding masks only"):
        key_validity(causal, 4)


# ---- NaFlexVit -----------------------------------------------------------------------------------

def test_naflexvit_merges_images_and_padded_batches():
    model = build("naflexvit")
    x = images("naflexvit")
    with torch.no_grad():
        ref = model(x)
        patches, coord, valid = _naflex_batch([[1, 1, 1, 1, 0, 0], [1] * 6])
        ref_nf = model(patches, patch_coord=coord, patch_valid=valid)
        # r = 0 through the ToMe path (every block weighs by size and reads the mask itself): timm's result
        shrink.apply_tome(model, 0)
        for b in get_blocks(model):
            b.tome_sized = True
        assert maxdiff(model(x), ref) <= 1e-5
        assert maxdiff(model(patches, patch_coord=coord, patch_valid=valid), ref_nf) <= 1e-5
        shrink.apply_tome(model, 2)
        npt = model.num_prefix_tokens
        assert shrink.tome_token_counts(model, input_size=32) == [npt + 4 - 2, npt + 4 - 3, npt + 4 - 3]
        assert torch.isfinite(model(x)).all()
        for rows in ([[1, 1, 1, 1, 0, 0], [1] * 6], [[1, 0, 0, 0, 0, 0], [1] * 6], [[1, 1, 1, 0, 0, 0]] * 2):
            patches, coord, valid = _naflex_batch(rows)
            out = model(patches, patch_coord=coord, patch_valid=valid)
            st = tome_state(model)
            kept = st.tracked["valid"][..., 0]
            assert torch.isfinite(out).all() and set(kept.unique().tolist()) <= {0.0, 1.0}  # never a mixed token
            real = (st.size[..., 0] * kept)[:, npt:].sum(dim=1)  # patches held by real tokens
            assert torch.equal(real, valid.sum(dim=1).float()), (rows, real)
            # what the padding holds changes nothing
            noisy = patches.clone()
            noisy[~valid] = 10 * torch.randn(int((~valid).sum()), P * P * 3)
            assert maxdiff(model(noisy, patch_coord=coord, patch_valid=valid), out) == 0.0


def test_naflexvit_with_a_bias_mask_is_refused_in_one_line():
    model = build("naflexvit")
    shrink.apply_tome(model, 1)
    x = torch.randn(1, 3, 32, 32)
    tokens = model.num_prefix_tokens + 4
    with pytest.raises(shrink.ShrinkError, match="padding masks only") as e:
        model.forward_features(x, attn_mask=torch.randn(1, 1, tokens, tokens))
    assert "\n" not in str(e.value)


# ---- ParallelScalingBlock / DiffParallelScalingBlock ---------------------------------------------

@pytest.mark.parametrize("key", ["parallel-scaling", "diff-parallel-scaling"])
def test_parallel_blocks_attend_proportionally_to_token_size(key):
    """The block on merged tokens of sizes s equals the block on the sequence in which every token is
    repeated s times (first copies compared), and its metric is its keys averaged over heads."""
    model = build(key)
    blk = get_blocks(model)[1]
    fam = shrink.blocks.contract.block_family(blk)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, model.embed_dim, generator=g)
    size = torch.tensor([[1, 3, 1, 2, 1], [2, 1, 1, 4, 1]], dtype=torch.float32).unsqueeze(-1)
    with torch.no_grad():
        out, metric = fam.merged_forward(blk, x, 1.0, 1.0, {}, AttentionCall(size, True, 1))
        for b in range(2):
            reps = size[b, :, 0].long()
            ref = blk(x[b].repeat_interleave(reps, dim=0).unsqueeze(0))[0]
            first = torch.cumsum(reps, 0) - reps
            assert maxdiff(out[b], ref[first]) <= 1e-5
        assert metric.shape == (2, 5, blk.head_dim)
        plain, none = fam.merged_forward(blk, x, 1.0, 1.0, {}, AttentionCall(None, False, 1))
        assert none is None and maxdiff(plain, blk(x)) == 0.0


def test_windowed_sam_blocks_are_refused_with_the_reason():
    model = build("sam-windowed")
    with pytest.raises(shrink.ShrinkError, match="no place in the grid") as e:
        shrink.apply_tome(model, 1)
    assert "\n" not in str(e.value) and "r = 0 works" in str(e.value)


# ---- torch.compile -------------------------------------------------------------------------------

# one case per block family and attention kernel (CaiT with its size-weighted 'avg' head)
COMPILED = ["vit-map-head", "respost", "parallel-things", "parallel-scaling", "diff-parallel-scaling", "naflexvit",
            "dinov3-rope", "rope-mixed", "eva-postnorm", "beit", "relpos-shared", "relpos-respost", "cait"]


@pytest.mark.parametrize("key", COMPILED)
def test_compiled_merging_model_equals_eager_without_recompiling(key):
    """Dynamo (AOT autograd, no C++ build in CI) over a merged model: equal to eager, one graph set for
    two batches of one shape (a recompile would count a second frame compilation)."""
    torch._dynamo.reset()
    model = build(key)
    if key == "cait":
        model.reset_classifier(5, "avg")
    shrink.apply_tome(model, 2, policy="hidden")
    size = CASES[key][2]
    x1, x2 = images(key, seed=1), images(key, seed=2)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad():
        y1 = compiled(x1)
        frames = counter.frame_count
        y2 = compiled(x2)
        assert counter.frame_count == frames, f"recompiled for a second batch of the same shape ({key})"
        assert maxdiff(y1, model(x1)) <= 1e-5 and maxdiff(y2, model(x2)) <= 1e-5
        counts = shrink.tome_token_counts(model, input_size=size)
    assert counts[-1] < counts[0]
    torch._dynamo.reset()


# ---- copies of merging models --------------------------------------------------------------------

@pytest.mark.parametrize("key", ["vit-map-head", "dinov3-rope", "beit", "cait", "naflexvit"])
def test_a_copy_of_a_merging_model_is_independent(key):
    """shrink.export and copy.deepcopy of a merging model give a merging model of its own: removing
    ToMe from the copy (as best/ is saved) leaves the original merging as before, and the copy is timm's.
    (Undo steps were closures over the original: the copy's remove_tome undid the original's trackers,
    and a BEiT run with --tome-train then failed after its first best/ save.)"""
    import copy

    model = build(key)
    x = images(key)
    with torch.no_grad():
        plain = model(x)
        shrink.apply_tome(model, [1] * len(get_blocks(model)))
        merged = model(x)
        twin = copy.deepcopy(model)
        assert maxdiff(twin(x), merged) == 0.0
        shrink.remove_tome(twin)
        assert maxdiff(twin(x), plain) <= 1e-6  # the copy is the plain model again
        assert maxdiff(model(x), merged) == 0.0  # the original still merges, trackers and hooks intact
        assert tome_state(model).tracked.keys() == tome_state(model).trackers.keys()
        small = shrink.export(model)  # a deep copy (how best/ is made), its ToMe removed
        shrink.remove_tome(small)
        assert maxdiff(model(x), merged) == 0.0
