"""What a plan is: the attention layers removed and the ToMe settings, and the token counts they imply.

A :class:`Candidate` is pure data (no model): the cost model sums its measured table along
:func:`token_counts`, the proxy builds the model it describes, and the search enumerates them.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from shrink.errors import ShrinkError
from shrink.merging.merge import POLICIES, max_merge, tome_schedule


@dataclass(frozen=True)
class Candidate:
    """One plan: ``removed`` block indices lose their attention (lambda = 0, exported), and tokens merge
    with ``apply_tome(model, r, start_idx, policy)`` where r is ``tome_r`` (constant) or the official
    ramp ``(tome_r, tome_inflection)`` when the inflection is not 0."""

    removed: tuple[int, ...] = field(default_factory=tuple)
    tome_r: int = 0
    tome_inflection: float = 0.0
    tome_start_idx: int = 0
    tome_policy: str = "none"

    def __post_init__(self) -> None:
        removed = tuple(sorted({int(i) for i in self.removed}))
        if any(i < 0 for i in removed):
            raise ShrinkError(f"removed block indices must be >= 0, got {list(self.removed)}")
        object.__setattr__(self, "removed", removed)
        if int(self.tome_r) != self.tome_r or self.tome_r < 0:
            raise ShrinkError(f"tome_r must be a non-negative integer, got {self.tome_r!r}")
        if not -1.0 <= float(self.tome_inflection) <= 1.0:
            raise ShrinkError(f"tome_inflection must be in [-1, 1], got {self.tome_inflection!r}")
        if self.tome_policy not in POLICIES:
            raise ShrinkError(f"tome_policy must be one of {', '.join(POLICIES)}, got {self.tome_policy!r}")

    @property
    def r_arg(self) -> int | tuple[int, float]:
        """The ``r`` argument of :func:`shrink.merging.patch.apply_tome`."""
        return (int(self.tome_r), float(self.tome_inflection)) if self.tome_inflection else int(self.tome_r)

    def schedule(self, depth: int) -> list[int]:
        """The r of every block of a ``depth``-block model after the removal (0 everywhere without merging)."""
        kinds = block_kinds(depth, self.removed)
        if self.tome_r == 0:
            return [0] * depth
        return tome_schedule(kinds, self.r_arg, self.tome_start_idx, self.tome_policy)

    def config(self) -> dict[str, Any]:
        """The ``main_lambda.py`` config keys of this plan."""
        return {"remove_layers": list(self.removed), "tome_r": int(self.tome_r),
                "tome_inflection": float(self.tome_inflection), "tome_start_idx": int(self.tome_start_idx),
                "tome_policy": self.tome_policy}

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["removed"] = list(self.removed)
        return d


def block_kinds(depth: int, removed: Sequence[int]) -> list[str]:
    """'attn' / 'free' per block after removing the attention of ``removed``."""
    bad = [i for i in removed if not 0 <= int(i) < depth]
    if bad:
        raise ShrinkError(f"removed blocks {bad} are out of range for a {depth}-block model")
    gone = {int(i) for i in removed}
    return ["free" if i in gone else "attn" for i in range(depth)]


def token_counts(num_tokens: int, num_protected: int, schedule: Sequence[int]) -> list[int]:
    """Tokens entering each block, then the tokens after the last one (``len(schedule) + 1`` values).

    Block i merges ``min(schedule[i], max_merge(n_i))`` tokens between its token mixer and its MLP (as
    :mod:`shrink.merging.patch` does), so its attention runs on ``n_i`` tokens and its MLP on ``n_{i+1}``.
    """
    counts = [int(num_tokens)]
    for r in schedule:
        n = counts[-1]
        counts.append(n - min(int(r), max_merge(n, num_protected)))
    return counts
