"""Token merging (ToMe) as pure tensor functions, with no model code (the adapter is shrink.merging.patch).

Tokens are ``(B, N, C)``; the first ``num_protected`` (class, distillation, registers) never merge
and stay in front. The partition is the official one (facebookresearch/ToMe): tokens alternate
into set A (merge candidates) and set B (receivers) by their position in the *whole* sequence,
A = even positions 0, 2, 4, ..., B = odd positions 1, 3, 5, ...; protected tokens keep their set but
take no part (the official code masks them with -inf). With one class token, A = patches at
positions 2, 4, ... and B = positions 1, 3, ...; with class + distillation token both sets start
right after them. The same rule covers any number of prefix tokens (class + registers, none):
A is the unprotected tokens at even positions, B those at odd positions. Every A token picks its
most similar B token (cosine of the metric) and the ``r`` most similar pairs merge: the A token is
averaged into its B partner, weighted by how many input patches each one already stands for
("size"). Output order is ``[protected, kept A tokens in their original order, B tokens]``, which
is the official order for one class token and for class + distillation tokens. (Without any
prefix token the official code leaves the kept A tokens in similarity order; here they keep their
original order, so the next block's alternation still follows the image layout.)

Proportional attention adds ``log(size)`` to the logits of every key, which is exactly attention
over a sequence in which each merged key/value is repeated ``size`` times.

``tome_schedule`` turns ``r`` (int, per-block list or ``(r, inflection)`` ramp, the official
``parse_r`` formula) and ``start_idx`` into the r of every block, from the block kinds alone.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shrink.errors import ShrinkError

POLICIES = ("none", "hidden")  # what attention-free blocks do: pass tokens through / merge on norm2(x)


@dataclass(frozen=True)
class Matching:
    """Which tokens merge, as gather/scatter indices into the A and B sets (batch-first)."""

    num_protected: int
    unm_idx: torch.Tensor  # (B, n_a - r): A tokens that stay, ascending (original order)
    src_idx: torch.Tensor  # (B, r): A tokens merged away
    dst_idx: torch.Tensor  # (B, r): the B token each of them joins

    @property
    def r(self) -> int:
        return int(self.src_idx.shape[1])


def max_merge(num_tokens: int, num_protected: int) -> int:
    """The largest r a block can merge: half of the unprotected tokens, rounded down (the official cap;
    never more than the unprotected A tokens)."""
    return max(0, (num_tokens - num_protected) // 2)


def split_ab(x: torch.Tensor, num_protected: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The unprotected tokens of ``x`` ``(B, N, C)`` as views (A, B): A at even positions of the whole
    sequence, B at odd ones (so with an odd number of protected tokens B starts first)."""
    rest = x[:, num_protected:]
    if num_protected % 2:
        return rest[:, 1::2], rest[:, ::2]
    return rest[:, ::2], rest[:, 1::2]


def bipartite_soft_matching(
    metric: torch.Tensor, r: int, num_protected: int = 1, valid: torch.Tensor | None = None
) -> Matching | None:
    """Pick the ``r`` best (A, B) pairs by cosine similarity of ``metric`` ``(B, N, C)``.

    A and B as in :func:`split_ab`; ``r`` is capped at half of the unprotected tokens (as in the
    official code, ``(N - num_protected) // 2``); returns None when nothing merges. Ties are broken
    by position (stable sort), the lower index first.

    ``valid`` ``(B, N)`` bool (padded batches, NaFlexVit): a real token and a padding token never
    merge. Pairs of different kinds are excluded, padding pairs go first (so what real tokens do does
    not depend on what the padding holds), and ``r`` is further capped at the number of A tokens that
    have a partner of their own kind in every sample (so no sample is forced into a mixed pair).
    """
    if metric.dim() != 3:
        raise ValueError(f"metric must be (batch, tokens, channels), got shape {tuple(metric.shape)}")
    n = metric.shape[1]
    if not 0 <= num_protected <= n:
        raise ValueError(f"num_protected={num_protected} is outside 0..{n}")
    r = min(int(r), max_merge(n, num_protected))
    if r <= 0:
        return None
    with torch.no_grad():
        a, b = split_ab(F.normalize(metric.float(), dim=-1), num_protected)
        scores = a @ b.transpose(-1, -2)  # (B, n_a, n_b) cosine similarities
        if valid is not None:
            va, vb = split_ab(valid.unsqueeze(-1), num_protected)
            same = va == vb.transpose(-1, -2)  # (B, n_a, n_b): both real or both padding
            scores = scores.masked_fill(~same, -math.inf)
            # padding merges with padding first, whatever it holds: what real tokens do never depends on it
            scores = scores.masked_fill(same & ~va, 2.0)
            r = min(r, int(same.any(dim=-1).sum(dim=-1).min()))
            if r <= 0:
                return None
        best, best_b = scores.max(dim=-1)  # each A token's most similar B token
        order = best.argsort(dim=-1, descending=True, stable=True)
        src_idx = order[:, :r]
        unm_idx = order[:, r:].sort(dim=-1).values
        dst_idx = best_b.gather(1, src_idx)
    return Matching(num_protected, unm_idx, src_idx, dst_idx)


def _take(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def merge(m: Matching, x: torch.Tensor, reduce: str = "sum") -> torch.Tensor:
    """Apply a matching to ``x`` ``(B, N, C)``: merged A tokens are reduced into their B partner."""
    p = m.num_protected
    a, b = split_ab(x, p)
    dst = m.dst_idx.unsqueeze(-1).expand(-1, -1, x.shape[-1])
    b = b.scatter_reduce(1, dst, _take(a, m.src_idx), reduce=reduce, include_self=True)
    return torch.cat([x[:, :p], _take(a, m.unm_idx), b], dim=1)


def merge_wavg(
    m: Matching, x: torch.Tensor, size: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted mean merge: returns the merged tokens and their sizes ``(B, N', 1)``.

    ``size`` ``(B, N, 1)`` counts the input patches each token stands for (None: all ones).
    """
    if size is None:
        size = torch.ones(x.shape[0], x.shape[1], 1, device=x.device, dtype=torch.float32)
    total = merge(m, x * size.to(x.dtype), "sum")
    size = merge(m, size, "sum")
    return total / size.to(x.dtype), size


def init_source(batch: int, num_tokens: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Source map before any merge: token i is made of input token i, ``(B, N, N)`` identity."""
    eye = torch.eye(num_tokens, device=device, dtype=torch.float32)
    return eye.unsqueeze(0).expand(batch, -1, -1).contiguous()


def merge_source(m: Matching, source: torch.Tensor) -> torch.Tensor:
    """Track which input tokens every merged token is made of: rows are 0/1 masks over inputs."""
    return merge(m, source, "amax")


def proportional_bias(size: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Additive attention bias ``log(size)`` per key, ``(B, 1, 1, N)``; None when all sizes are 1."""
    if size is None:
        return None
    return size.log().to(dtype).squeeze(-1)[:, None, None, :]


def proportional_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    size: torch.Tensor | None = None,
    *,
    fused: bool = True,
    scale: float | None = None,
    dropout: nn.Module | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Softmax attention over ``(B, H, N, D)`` heads with ``+ log(size)`` on each key's logit.

    ``fused`` uses ``F.scaled_dot_product_attention`` (bias as an additive float mask, none while
    every size is 1); otherwise the explicit ``softmax(q k^T * scale + bias) v`` with ``dropout``.
    """
    bias = proportional_bias(size, q.dtype)
    if fused:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    attn = (q * scale) @ k.transpose(-2, -1)
    if bias is not None:
        attn = attn + bias
    attn = attn.softmax(dim=-1)
    if dropout is not None:
        attn = dropout(attn)
    return attn @ v


def weighted_mean(x: torch.Tensor, size: torch.Tensor | None) -> torch.Tensor:
    """Mean over tokens of ``(B, N, C)`` counting each token ``size`` times (plain mean if None)."""
    if size is None:
        return x.mean(dim=1)
    w = size.to(x.dtype)
    return (x * w).sum(dim=1) / w.sum(dim=1)


def ramp(r: int, inflection: float, num_layers: int) -> list[int]:
    """The official (r, inflection) schedule (``tome.utils.parse_r``) over ``num_layers`` layers.

    ``lo = int(r * (1 - inflection))``, ``hi = 2r - lo``, layer i gets
    ``int(lo + i * (hi - lo) / (num_layers - 1))`` (truncated): inflection 0 is constant r, -1 goes
    from 2r down to 0 (the paper's "decreasing" schedule), +1 from 0 up to 2r. One layer gets ``lo``
    (the official formula divides by zero there).
    """
    if not -1.0 <= inflection <= 1.0 or math.isnan(inflection):
        raise ValueError(f"inflection must be in [-1, 1], got {inflection}")
    if num_layers <= 0:
        return []
    lo = int(r * (1.0 - inflection))
    hi = 2 * r - lo
    if num_layers == 1:
        return [lo]
    step = (hi - lo) / (num_layers - 1)
    return [int(lo + step * i) for i in range(num_layers)]


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def tome_schedule(
    kinds: Sequence[str], r: int | Sequence[int] | tuple[int, float], start_idx: int = 0, policy: str = "none"
) -> list[int]:
    """The r of every block, given block kinds ('attn' / 'free') and apply_tome's arguments."""
    if policy not in POLICIES:
        raise ShrinkError(f"unknown ToMe policy {policy!r}; choose one of {', '.join(POLICIES)}")
    if not _is_int(start_idx) or start_idx < 0:
        raise ShrinkError(f"start_idx must be a non-negative integer, got {start_idx!r}")
    depth = len(kinds)
    attn_pos = [i for i, k in enumerate(kinds) if k == "attn"]
    if not attn_pos and policy == "none":
        raise ShrinkError("the model has no attention blocks and policy='none': ToMe would never merge "
                          "(use policy='hidden' to merge in attention-free blocks)")
    if attn_pos and start_idx >= len(attn_pos):
        raise ShrinkError(f"start_idx={start_idx} but the model has only {len(attn_pos)} attention blocks")
    if not attn_pos and start_idx != 0:
        raise ShrinkError("start_idx counts attention blocks, and this model has none: use start_idx=0")
    start = attn_pos[start_idx] if attn_pos else 0
    can_merge = [k == "attn" or policy == "hidden" for k in kinds]
    merging = [i for i in range(depth) if i >= start and can_merge[i]]

    if isinstance(r, list):
        if len(r) != depth or not all(_is_int(v) and v >= 0 for v in r):
            raise ShrinkError(f"a per-block r list needs {depth} non-negative integers (one per block), got {r!r}")
        if start_idx != 0:
            raise ShrinkError("give either a per-block r list or start_idx, not both")
        for i, v in enumerate(r):
            if v > 0 and not can_merge[i]:
                raise ShrinkError(f"r[{i}]={v} but block {i} is attention-free and policy='none' never merges there")
        return [int(v) for v in r]
    if isinstance(r, tuple):
        if len(r) != 2 or not _is_int(r[0]) or r[0] < 0 or not isinstance(r[1], numbers.Real):
            raise ShrinkError(f"a ramp r must be (r, inflection) with r >= 0 and inflection in [-1, 1], got {r!r}")
        try:
            values = ramp(int(r[0]), float(r[1]), len(merging))
        except ValueError as e:
            raise ShrinkError(str(e)) from None
    elif _is_int(r) and r >= 0:
        values = [int(r)] * len(merging)
    else:
        raise ShrinkError(f"r must be a non-negative int, a per-block list or an (r, inflection) tuple, got {r!r}")
    out = [0] * depth
    for i, v in zip(merging, values, strict=True):
        out[i] = v
    return out
