"""The search: candidates -> predicted cost (cheap, the cost table) -> those meeting the target -> proxy -> Pareto front.

1. :func:`enumerate_candidates`: removal sets (prefixes of the criterion's order) x ToMe r (a grid, constant
   and the official ramps with inflection -0.5 / +0.5) x start block x policy for attention-free blocks.
   Candidates that build the same model (the same removed blocks and the same tokens merged in every
   block) are kept once. For every removal set the most merging it allows (r = the cap in every block
   from the first attention block on, attention-free ones too) is among them, so the fastest plan the
   search space holds is there: a target beyond it is out of reach.
2. :func:`search`: every candidate's latency from the cost table; a target (:class:`Target`) out of reach
   is a one-line :class:`~shrink.errors.ShrinkError` naming the best reachable value; of the candidates
   that meet it, the ``max_candidates`` closest to the target (the least compressed: compressing further
   than the target asks only costs accuracy) are scored by the proxy; the Pareto front (predicted
   speed-up up, proxy KL down) and the chosen plan (lowest KL) come back as a :class:`SearchResult`.
3. :func:`shrink.plan.outputs.write_outputs`: ``plan.yaml`` (a ``main_lambda.py --config`` file),
   ``plan.json``, ``pareto.json``, ``pareto.md`` and ``pareto.png``, each written atomically.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from shrink.errors import ShrinkError
from shrink.merging.merge import max_merge
from shrink.plan.candidate import Candidate, token_counts

__all__ = ["INFLECTIONS", "Entry", "MacCounter", "SearchResult", "Target", "describe", "enumerate_candidates",
           "pareto_front", "r_grid", "search"]

INFLECTIONS = (0.0, -0.5, 0.5)  # constant r and the official ramps (decreasing, increasing)
TARGET_KINDS = ("speedup", "ms", "gmacs")


class CostModel(Protocol):  # what the search needs of shrink.plan.cost.CostTable
    def predict_ms(self, cand: Candidate) -> float: ...
    def dense_ms(self) -> float: ...


@dataclass(frozen=True)
class Target:
    """``speedup`` (at least this many times the dense model's predicted speed), ``ms`` (at most this
    predicted latency per batch) or ``gmacs`` (at most this many fvcore GMACs per image)."""

    kind: str
    value: float

    def __post_init__(self) -> None:
        if self.kind not in TARGET_KINDS:
            raise ShrinkError(f"unknown target {self.kind!r}; choose one of {', '.join(TARGET_KINDS)}")
        v = self.value
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ShrinkError(f"--target-{self.kind} must be a positive number, got {v!r}")
        if self.kind == "speedup" and v < 1.0:
            raise ShrinkError(f"--target-speedup must be at least 1 (the dense model), got {v:g}")

    @property
    def flag(self) -> str:
        return f"--target-{self.kind}"

    def measure(self, entry: Entry) -> float:
        """The entry's value in the target's unit."""
        return {"speedup": entry.predicted_speedup, "ms": entry.predicted_ms, "gmacs": entry.gmacs}[self.kind]

    def met(self, entry: Entry) -> bool:
        v = self.measure(entry)
        return v >= self.value if self.kind == "speedup" else v <= self.value

    def slack(self, entry: Entry) -> float:
        """How far past the target the entry is (>= 0 when met; smaller = closer to the target)."""
        v = self.measure(entry)
        return v / self.value if self.kind == "speedup" else self.value / v

    def unit(self, v: float) -> str:
        return {"speedup": f"{v:.3f}x", "ms": f"{v:.3f} ms", "gmacs": f"{v:.4g} GMACs"}[self.kind]

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "value": self.value}


@dataclass
class Entry:
    """One candidate with its predicted cost and, once scored, its proxy score."""

    candidate: Candidate
    predicted_ms: float
    predicted_speedup: float
    tokens: list[int]
    gmacs: float | None = None
    score: Any = None  # ProxyScore once scored

    def as_dict(self) -> dict[str, Any]:
        d = {"candidate": self.candidate.as_dict(), "predicted_ms": self.predicted_ms,
             "predicted_speedup": self.predicted_speedup, "tokens": self.tokens}
        if self.gmacs is not None:
            d["gmacs"] = self.gmacs
        if self.score is not None:
            d["proxy"] = self.score.as_dict()
        return d


@dataclass
class SearchResult:
    target: Target
    dense_ms: float
    entries: list[Entry]  # every distinct candidate, with its predicted cost
    meeting: int  # how many meet the target
    scored: list[Entry]  # those the proxy scored
    front: list[Entry]  # the Pareto front of the scored ones, by predicted speed-up
    chosen: Entry
    best_reachable: float
    order: list[int] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------
# Candidates
# ------------------------------------------------------------------------------------------------

def r_grid(num_tokens: int, num_protected: int, depth: int, max_values: int = 8) -> list[int]:
    """ToMe r values to try: 0 and a grid up to the r that merges the unprotected tokens away over the
    depth (ceil((N - protected) / depth); e.g. {0, 1, 2} for 16 digit tokens and 12 blocks, {0, 2, ..., 16}
    for 196 tokens), about ``max_values`` non-zero values."""
    top = min(max_merge(num_tokens, num_protected), max(1, math.ceil((num_tokens - num_protected) / depth)))
    step = max(1, top // max_values)
    return [0, *range(step, top + 1, step)]


def _merges(cand: Candidate, depth: int, num_tokens: int, num_protected: int) -> tuple[list[int], tuple[int, ...]]:
    counts = token_counts(num_tokens, num_protected, cand.schedule(depth))
    return counts, tuple(a - b for a, b in zip(counts[:-1], counts[1:], strict=True))


def enumerate_candidates(
    order: Sequence[int],
    depth: int,
    num_tokens: int,
    num_protected: int,
    *,
    r_values: Iterable[int] | None = None,
    inflections: Iterable[float] = INFLECTIONS,
    start_idxs: Iterable[int] = (0, 1, 2),
    policies: Iterable[str] = ("none", "hidden"),
    merging: bool = True,
) -> list[Candidate]:
    """Every distinct candidate: prefixes of ``order`` (none to all) x r x inflection x start x policy,
    and (unless ``r_values`` is given) for each prefix the most merging it allows. Combinations
    ``apply_tome`` would refuse (a start block past the last attention block, policy ``none`` without
    attention) are skipped; of candidates that merge the same tokens in the same blocks after the same
    removal, the first (simplest) is kept."""
    order = [int(i) for i in order]
    if len(set(order)) != len(order):
        raise ShrinkError(f"the removal order repeats a block: {order}")
    most = merging and r_values is None  # the default space holds each removal set's most merging
    r_values = sorted({int(r) for r in (r_values if r_values is not None else
                                        r_grid(num_tokens, num_protected, depth))} | {0}) if merging else [0]
    inflections, start_idxs, policies = list(inflections), list(start_idxs), list(policies)
    seen: set[tuple] = set()
    out: list[Candidate] = []

    def add(c: Candidate) -> None:
        try:
            _, merges = _merges(c, depth, num_tokens, num_protected)
        except ShrinkError:  # a start block or policy this removal set does not allow
            return
        key = (c.removed, merges)
        if key not in seen:
            seen.add(key)
            out.append(c)

    cap = max_merge(num_tokens, num_protected)
    for j in range(len(order) + 1):
        removed = tuple(order[:j])
        if most:  # the most this removal set can merge: every block from the first attention one, r = cap
            add(Candidate(removed, cap, 0.0, 0, "hidden"))
        for r in r_values:
            if r == 0:
                add(Candidate(removed))
                continue
            for infl in inflections:
                for s in start_idxs:
                    for pol in policies:
                        add(Candidate(removed, r, infl, s, pol))
    return out


# ------------------------------------------------------------------------------------------------
# GMACs: fvcore, memoised per block
# ------------------------------------------------------------------------------------------------

class MacCounter:
    """fvcore multiply-adds per image of candidates (as ``shrink.bench.measure.count_macs`` counts them:
    attention matmuls in, 1 multiply-add = 1), traced on the proxy's in-place candidate model.

    A block's MACs depend only on its kind, the tokens it receives and the tokens it merges, so each
    trace's per-block counts are remembered and a candidate whose blocks were all seen is not traced.
    """

    def __init__(self, configure: Callable[[Candidate], Any], model: Any, size: Sequence[int],
                 num_tokens: int, num_protected: int, depth: int):
        self.configure, self.model, self.size = configure, model, tuple(size)
        self.num_tokens, self.num_protected, self.depth = num_tokens, num_protected, depth
        self.blocks: dict[tuple, int] = {}
        self.rest: dict[tuple, int] = {}
        self.traces = 0

    def _keys(self, cand: Candidate) -> tuple[list[tuple], tuple]:
        counts, merges = _merges(cand, self.depth, self.num_tokens, self.num_protected)
        gone = set(cand.removed)
        keys = [("free" if i in gone else "attn", counts[i], merges[i]) for i in range(self.depth)]
        return keys, (counts[-1], any(merges))

    def total(self, cand: Candidate) -> int:
        keys, rest = self._keys(cand)
        if rest not in self.rest or any(k not in self.blocks for k in keys):
            self._trace(cand, keys, rest)
        return self.rest[rest] + sum(self.blocks[k] for k in keys)

    def gmacs(self, cand: Candidate) -> float:
        return self.total(cand) / 1e9

    def _trace(self, cand: Candidate, keys: list[tuple], rest: tuple) -> None:
        import warnings

        import torch
        from fvcore.nn import FlopCountAnalysis

        from shrink.bench.measure import _sdpa_macs
        from shrink.blocks.dilution import get_blocks

        p = next(self.model.parameters())
        x = torch.randn(1, *self.size, generator=torch.Generator().manual_seed(0)).to(p.device)
        fused = {m: m.fused_attn for m in self.model.modules() if hasattr(m, "fused_attn")}
        names = {id(b): n for n, b in self.model.named_modules()}
        block_names = [names[id(b)] for b in get_blocks(self.model)]
        try:
            for m in fused:
                m.fused_attn = False
            with warnings.catch_warnings(), torch.no_grad(), self.configure(cand):
                warnings.simplefilter("ignore")
                fca = FlopCountAnalysis(self.model, x)
                fca.set_op_handle("aten::scaled_dot_product_attention", _sdpa_macs)
                fca.unsupported_ops_warnings(False)
                fca.uncalled_modules_warnings(False)
                fca.tracer_warnings("none")
                total = int(fca.total())
                per = fca.by_module()
        finally:
            for m, v in fused.items():
                m.fused_attn = v
        self.traces += 1
        counted = [int(per.get(n, 0)) for n in block_names]
        for k, v in zip(keys, counted, strict=True):
            self.blocks.setdefault(k, v)
        self.rest.setdefault(rest, total - sum(counted))


# ------------------------------------------------------------------------------------------------
# The search
# ------------------------------------------------------------------------------------------------

def pareto_front(entries: Sequence[Entry]) -> list[Entry]:
    """Scored entries that no other beats on both predicted speed-up (higher) and proxy KL (lower),
    sorted by speed-up; of exact ties the first is kept."""
    front: list[Entry] = []
    for e in sorted(entries, key=lambda e: (-e.predicted_speedup, e.score.kl)):
        if not front or e.score.kl < front[-1].score.kl:
            front.append(e)
    return front[::-1]


def describe(c: Candidate) -> str:
    """One line naming a plan: its removed blocks and its merging."""
    merge = "no merging" if not c.tome_r else (
        f"r={c.tome_r}" + (f" ramp {c.tome_inflection:+g}" if c.tome_inflection else "")
        + f" from attention block {c.tome_start_idx}, policy {c.tome_policy}")
    return f"remove {list(c.removed) or 'none'}, {merge}"


def search(
    candidates: Sequence[Candidate],
    table: CostModel,
    target: Target,
    *,
    depth: int,
    num_tokens: int,
    num_protected: int,
    score: Callable[[Sequence[Candidate]], list[Any]] | None = None,
    gmacs: Callable[[Candidate], float] | None = None,
    max_candidates: int = 64,
    device: str = "",
) -> SearchResult:
    """Cost every candidate, keep those meeting ``target``, score the ``max_candidates`` closest to it with
    ``score`` (a list of candidates -> a list of ProxyScore-like objects with ``kl``, ``top1_agreement``
    and ``as_dict``), and return the front and the chosen plan (lowest KL, then higher agreement, then
    faster)."""
    if not candidates:
        raise ShrinkError("no candidates to search")
    if max_candidates < 1:
        raise ShrinkError(f"--max-candidates must be at least 1, got {max_candidates}")
    if target.kind == "gmacs" and gmacs is None:
        raise ShrinkError("--target-gmacs needs a MAC counter")
    dense = float(table.dense_ms())
    entries = []
    for c in candidates:
        ms = float(table.predict_ms(c))
        counts, _ = _merges(c, depth, num_tokens, num_protected)
        entries.append(Entry(c, ms, dense / ms, counts))
    if target.kind == "gmacs":
        for e in entries:
            e.gmacs = gmacs(e.candidate)
        best_entry = min(entries, key=lambda e: e.gmacs)
        best = best_entry.gmacs
        if not target.met(best_entry):
            raise ShrinkError(f"{target.flag} {target.value:g} is out of reach: the fewest is "
                              f"{target.unit(best)} per image ({describe(best_entry.candidate)})")
    else:
        best_entry = max(entries, key=lambda e: e.predicted_speedup)
        best = best_entry.predicted_speedup if target.kind == "speedup" else best_entry.predicted_ms
        if not target.met(best_entry):
            on = f" on {device}" if device else ""
            raise ShrinkError(f"{target.flag} {target.value:g} is out of reach{on}: the best reachable is "
                              f"{target.unit(best)} predicted ({describe(best_entry.candidate)})")
    meeting = [e for e in entries if target.met(e)]
    # closest to the target first (least compressed), then fewer removed layers, then the enumeration order
    pick = sorted(meeting, key=lambda e: (target.slack(e), len(e.candidate.removed)))[:max_candidates]
    if score is None:
        raise ShrinkError("the search needs a proxy to score candidates")
    for e, s in zip(pick, score([e.candidate for e in pick]), strict=True):
        e.score = s
    chosen = min(pick, key=lambda e: (e.score.kl, -e.score.top1_agreement, -e.predicted_speedup))
    return SearchResult(target=target, dense_ms=dense, entries=entries, meeting=len(meeting), scored=pick,
                        front=pareto_front(pick), chosen=chosen, best_reachable=best)
