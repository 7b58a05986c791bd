"""Token merging on relative-position-bias attention (shrink.merging.relpos): BEiT (per-block and shared
bias tables) and the RelPos ViTs (RelPosMlp / RelPosBias per block or shared, post-norm ResPostRelPosBlock).

The bias between merged tokens is the mean over the pairs of their input tokens: checked against an
explicit double loop on a small grid, and end to end (two identical patches whose bias rows and columns
are equal merge exactly). Plus: r = 0 is timm, the kernels equal the modules before any merge, token
counts, exported models, size-weighted pooling, torch.compile: tests/merging/test_tome_families.py; merged .pt2 / ONNX export: tests/blocks/test_blocks.py."""
from __future__ import annotations

import copy

import pytest
import timm
import torch

import shrink
from shrink.merging.kernels import AttentionCall, attention_kernel
from shrink.merging.merge import bipartite_soft_matching, init_source, merge_wavg
from shrink.merging.patch import tome_state
from shrink.merging.relpos import TRACKER, merge_bias, merged_bias, merged_bias_dense

from .._families import CASES, build, images

KEYS = ["beit", "beit-shared-bias", "relpos", "relpos-shared", "relpos-respost"]


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _brute(bias: torch.Tensor, where: torch.Tensor, n: int) -> torch.Tensor:
    """sum_{p in i, q in j} B[p, q] / (|i| |j|) by an explicit loop over every token pair and input pair."""
    bias = bias if bias.dim() == 4 else bias.unsqueeze(0)
    B, N0 = where.shape
    out = torch.zeros(B, bias.shape[1], n, n, dtype=torch.float64)
    for b in range(B):
        groups = [[p for p in range(N0) if where[b, p] == i] for i in range(n)]
        for i in range(n):
            for j in range(n):
                total = sum(bias[b % bias.shape[0], :, p, q].double() for p in groups[i] for q in groups[j])
                out[b, :, i, j] = total / (len(groups[i]) * len(groups[j]))
    return out


# ---- the merged bias against the brute-force reference --------------------------------------------

def test_merged_bias_is_the_mean_over_input_pairs_on_a_small_grid():
    """3 x 3 grid + class token (N0 = 10), 2 heads, hand-made merges: scatter-add, dense S B S^T and the
    double loop agree; the class token (never merged) keeps its own row and column."""
    g = torch.Generator().manual_seed(0)
    bias = torch.randn(2, 10, 10, generator=g)  # (H, N0, N0) as BEiT's shared table gives it
    # sample 0: {1, 2}, {4, 5, 7}; sample 1: {3, 9}, {1, 6, 8}; the class token 0 alone in both
    where = torch.tensor([[0, 1, 1, 2, 3, 3, 4, 3, 5, 6],
                          [0, 1, 2, 3, 4, 5, 1, 6, 1, 3]])
    size = torch.zeros(2, 7).scatter_add(1, where, torch.ones(2, 10))
    ref = _brute(bias, where, 7)
    fast = merged_bias(bias, where, size)
    assert fast.shape == (2, 2, 7, 7) and maxdiff(fast.double(), ref) <= 1e-6
    members = torch.zeros(2, 7, 10).scatter(1, where.unsqueeze(1), 1.0) / size.unsqueeze(-1)
    assert maxdiff(merged_bias_dense(bias, members).double(), ref) <= 1e-6
    assert maxdiff(fast[:, :, 0, 0], bias[None, :, 0, 0].expand(2, -1)) == 0.0  # class token to itself
    # a 4-d bias (1, H, N0, N0) as RelPos modules give it: the same
    assert maxdiff(merged_bias(bias.unsqueeze(0), where, size), fast) == 0.0
    # a wrong definition (the bias at one representative input token per token) would differ
    reps = [int((where[0] == i).nonzero()[0]) for i in range(7)]
    assert maxdiff(bias[:, reps][:, :, reps], fast[0]) > 1e-2


def test_merge_bias_follows_the_tracked_members_of_real_merges():
    """Two rounds of real ToMe matching on a 4 x 4 grid: the tracked members (identity merged by
    size-weighted mean, as ToMeState does) give the brute-force mean bias; unmerged, the bias is untouched."""
    g = torch.Generator().manual_seed(1)
    N0, B = 17, 2
    bias = torch.randn(1, 3, N0, N0, generator=g)
    x = torch.randn(B, N0, 8, generator=g)
    members, size = init_source(B, N0), None

    class State:
        tracked: dict

    st = State()
    st.tracked, st.size = {TRACKER: members}, None
    call = AttentionCall(None, False, 0, {}, st)
    assert merge_bias(bias, N0, call) is bias
    for r in (3, 4):
        m = bipartite_soft_matching(x, r, num_protected=1)
        members = merge_wavg(m, members, size)[0]
        x, size = merge_wavg(m, x, size)
    st.tracked, st.size = {TRACKER: members}, size
    n = x.shape[1]
    assert n == N0 - 7
    where = members.argmax(dim=1)
    assert torch.equal(size[..., 0], torch.zeros(B, n).scatter_add(1, where, torch.ones(B, N0)))
    assert maxdiff(merge_bias(bias, n, AttentionCall(size, False, 1, {}, st)).double(), _brute(bias, where, n)) <= 1e-6
    st.tracked = {}
    with pytest.raises(shrink.ShrinkError, match="does not track"):
        merge_bias(bias, n, AttentionCall(size, False, 1, {}, st))


# ---- the kernels before any merge are the modules -------------------------------------------------

@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("fused", [True, False])
def test_kernels_equal_the_module_before_any_merge(key, fused):
    model = build(key)
    x = torch.randn(2, CASES[key][2] ** 2 // 256 + model.num_prefix_tokens, 32,
                    generator=torch.Generator().manual_seed(0))
    ctx = {}
    if getattr(model, "rel_pos_bias", None) is not None:
        ctx["shared_rel_pos_bias"] = model.rel_pos_bias()
    if getattr(model, "shared_rel_pos", None) is not None:
        ctx["shared_rel_pos"] = model.shared_rel_pos.get_bias()
    attn = model.blocks[1].attn
    attn.fused_attn = fused
    kernel = attention_kernel(attn)
    assert kernel is not None
    out, metric = kernel(attn, x, AttentionCall(None, True, 1, ctx, None))
    assert maxdiff(out, attn(x, **ctx)) == 0.0
    assert metric.shape == (2, x.shape[1], 16)


# ---- the families end to end ------------------------------------------------------------------------

@pytest.mark.parametrize("key", KEYS)
def test_r0_is_timm_and_merging_counts_and_exported_models(key):
    model, x = build(key), images(key)
    ref = model(x)
    shrink.apply_tome(model, r=0)
    assert maxdiff(model(x), ref) == 0.0
    whole = shrink.tome_token_counts(model, input_size=CASES[key][2])
    shrink.apply_tome(model, r=1)
    counts = shrink.tome_token_counts(model, input_size=CASES[key][2])
    npt = model.num_prefix_tokens
    expect, n = [], whole[0]
    for _ in counts:
        n -= min(1, (n - npt) // 2)
        expect.append(n)
    assert counts == expect and counts[-1] < whole[-1], (whole, counts)
    y = model(x)
    assert torch.isfinite(y).all() and maxdiff(y, ref) > 0.0
    # dense outputs unmerge onto the full patch grid
    _, inter = model.forward_intermediates(x, indices=[0, 2], output_fmt="NCHW")
    assert all(t.shape == (2, 32, 2, 2) for t in inter)
    model.train()  # training through merged biases: gradients reach the tables / bias MLPs
    model(x).sum().backward()
    tables = [p for n, p in model.named_parameters() if "rel_pos" in n or "relative_position" in n]
    assert tables and all(p.grad is not None and torch.isfinite(p.grad).all() for p in tables)
    model.eval()
    shrink.remove_tome(model)
    assert maxdiff(model(x), ref) == 0.0
    small = shrink.export(shrink.dilute(copy.deepcopy(model), [0], lam=0.0))
    shrink.apply_tome(small, r=2, policy="hidden")
    counts = shrink.tome_token_counts(small, input_size=CASES[key][2])
    assert counts == sorted(counts, reverse=True) and counts[-1] < counts[0] - 1
    assert torch.isfinite(small(x)).all()


def _grid_model(key: str, fused: bool) -> torch.nn.Module:
    """A 4 x 4 grid model of ``key``'s kind whose biases depend on the row offset only: two patches of one
    image row then have equal bias rows and columns (class-token entries are constants)."""
    if key == "relpos-cls-bias":  # a class token and RelPosBias (a table with class entries)
        name, kwargs = CASES["relpos"][0], {**CASES["relpos"][1], "class_token": True, "rel_pos_type": "bias"}
    else:
        name, kwargs = CASES[key][:2]
    kwargs = {**kwargs, "img_size": 64}
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5, **kwargs).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        for m in model.modules():
            table = getattr(m, "relative_position_bias_table", None)
            if isinstance(table, torch.nn.Parameter):  # index = (dy + 3) * 7 + (dx + 3) (+ class entries)
                rows = torch.arange(table.shape[0]) // 7
                table.copy_(torch.randn(rows.max() + 1, table.shape[1], generator=g)[rows])
            if type(m).__name__ == "RelPosMlp":
                m.mlp.fc1.weight[:, 1] = 0.0  # the mlp sees (dy, dx): make it blind to dx
            if hasattr(m, "fused_attn"):
                m.fused_attn = fused
    return model


def _biases(model: torch.nn.Module) -> list[torch.Tensor]:
    """Every relative-position bias of the model over its input tokens."""
    out = []
    for m in model.modules():
        if hasattr(m, "get_bias"):  # RelPosMlp / RelPosBias / RelPosBiasTf
            out.append(m.get_bias())
        elif type(m).__name__ == "RelativePositionBias":  # BEiT's shared table
            out.append(m())
        elif getattr(m, "relative_position_bias_table", None) is not None and hasattr(m, "_get_rel_pos_bias"):
            out.append(m._get_rel_pos_bias())
    return out


@pytest.mark.parametrize("key", [*KEYS, "relpos-cls-bias"])
@pytest.mark.parametrize("fused", [True, False])
def test_merging_two_identical_tokens_with_equal_bias_rows_is_exact(key, fused):
    """Patches (0, 0) and (0, 1) are identical and every bias depends on the row offset only: merging the
    pair (size 2, mean bias, proportional attention) computes exactly what the unmerged model does."""
    model = _grid_model(key, fused)
    npt = model.num_prefix_tokens
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    x[..., 0:16, 16:32] = x[..., 0:16, 0:16]
    biases = _biases(model)
    assert biases
    for b in biases:  # the premise: equal rows and columns for the two patches
        assert maxdiff(b[..., npt, :], b[..., npt + 1, :]) == 0.0 and maxdiff(b[..., npt], b[..., npt + 1]) == 0.0
    ref = model(x)
    for schedule in ([1, 0, 0], [0, 1, 0]):
        shrink.apply_tome(model, schedule)
        y = model(x)
        where = tome_state(model).tracked[TRACKER].argmax(dim=1)
        assert torch.equal(where[:, npt], where[:, npt + 1])  # the identical pair merged (and nothing else)
        assert tome_state(model).size.shape[1] == 16 + npt - 1
        assert maxdiff(y, ref) <= 1e-5, schedule
        # without proportional attention the merged pair counts once: not the unmerged model
        shrink.apply_tome(model, schedule, prop_attn=False)
        assert maxdiff(model(x), ref) > 1e-4
    shrink.remove_tome(model)


def test_average_pooling_weighs_merged_tokens_by_size_and_unknown_rel_pos_is_refused():
    model = build("relpos")
    shrink.apply_tome(model, r=1)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 1, 32, generator=g), torch.randn(2, 1, 32, generator=g)
    state = tome_state(model)
    state.size = torch.tensor([2.0, 1.0]).expand(2, -1).unsqueeze(-1)
    pooled = model.forward_head(torch.cat([a, b], dim=1))
    state.size = None
    assert maxdiff(pooled, model.forward_head(torch.cat([a, a, b], dim=1))) <= 1e-6
    shrink.remove_tome(model)
    assert "forward_head" not in model.__dict__

    class OwnRelPos(type(model.blocks[0].attn.rel_pos)):
        pass

    model.blocks[2].attn.rel_pos.__class__ = OwnRelPos
    with pytest.raises(shrink.ShrinkError, match="OwnRelPos") as e:
        shrink.apply_tome(model, r=1)
    assert "\n" not in str(e.value) and "r = 0 works" in str(e.value)
    shrink.apply_tome(model, r=0)
