"""shrink.merging.merge: the pure token-merging functions against the official definition and hand examples."""
from __future__ import annotations

import pytest
import torch

from shrink.merging.merge import (
    bipartite_soft_matching,
    init_source,
    max_merge,
    merge,
    merge_source,
    merge_wavg,
    ramp,
    split_ab,
)
from shrink.merging.patch import (
    tome_schedule,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _seed(s: int = 0) -> None:
    torch.manual_seed(s)


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
