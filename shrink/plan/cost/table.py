"""The cost table: milliseconds per part on a token grid, the prediction (a sum along a plan's token
counts, weighted per kind) and the table's JSON file (:meth:`CostTable.save` / :meth:`CostTable.load`)."""
from __future__ import annotations

import bisect
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shrink.errors import ShrinkError, first_line
from shrink.io import atomic_write_json
from shrink.plan.candidate import Candidate, block_kinds, token_counts
from shrink.plan.cost.key import CostKey

__all__ = ["KINDS", "PARTS_N", "PARTS_NR", "SCHEMA", "CostTable", "finite", "interp"]

SCHEMA = "shrink.plan.cost/2"  # /2: per-kind coefficients (coef) replace scale / offset_ms
PARTS_N = ("plain", "attn", "mlp", "free", "edges")  # one value per grid token count
KINDS = ("plain", "attn", "mlp", "free", "merge", "edges")  # one calibration coefficient each
PARTS_NR = ("merge", "merge_hidden")  # one value per (grid token count, grid r)


def _bracket(xs: Sequence[float], x: float) -> tuple[int, int, float]:
    """(lo, hi, t) with x = xs[lo] + t (xs[hi] - xs[lo]) on ascending ``xs``, clamped at the ends."""
    if x <= xs[0]:
        return 0, 0, 0.0
    if x >= xs[-1]:
        return len(xs) - 1, len(xs) - 1, 0.0
    hi = bisect.bisect_left(xs, x)
    lo = hi - 1
    return lo, hi, (x - xs[lo]) / (xs[hi] - xs[lo])


def interp(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Linear interpolation on ascending ``xs`` (clamped at the ends)."""
    lo, hi, t = _bracket(xs, x)
    return float(ys[lo] + t * (ys[hi] - ys[lo]))


@dataclass
class CostTable:
    """Milliseconds per part on a token grid (see the module docstring) and how the sum is calibrated."""

    key: CostKey
    grid: list[int]  # token counts, ascending
    r_grid: list[int]  # merge sizes, ascending
    parts: dict[str, Any]  # PARTS_N: list over grid; PARTS_NR: list over grid of lists over r_grid
    coef: dict[str, float] = field(default_factory=lambda: dict.fromkeys(KINDS, 1.0))  # predicted ms = sum of coef x part
    validation: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    _sums: dict[Candidate, dict[str, float]] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        g, rg = self.grid, self.r_grid
        if not g or any(b <= a for a, b in zip(g, g[1:], strict=False)) or not rg or any(
                b <= a for a, b in zip(rg, rg[1:], strict=False)):
            raise ShrinkError("cost table: the token and r grids must be non-empty and ascending")
        for name in PARTS_N:
            v = self.parts.get(name)
            if not isinstance(v, list) or len(v) != len(g) or not all(finite(t) for t in v):
                raise ShrinkError(f"cost table: part {name!r} must hold {len(g)} finite numbers")
        for name in PARTS_NR:
            v = self.parts.get(name)
            if not isinstance(v, list) or len(v) != len(g) or not all(
                    isinstance(row, list) and len(row) == len(rg) and all(finite(t) for t in row) for row in v):
                raise ShrinkError(f"cost table: part {name!r} must hold {len(g)} x {len(rg)} finite numbers")
        if not (isinstance(self.coef, dict) and set(self.coef) == set(KINDS)
                and all(finite(v) and v > 0 for v in self.coef.values())):
            raise ShrinkError(f"cost table: coef must give a number > 0 for each of {', '.join(KINDS)}")

    # ---- lookups ----
    def part_ms(self, name: str, n: float) -> float:
        return interp(self.grid, self.parts[name], n)

    def merge_ms(self, n: float, r: float, hidden: bool = False) -> float:
        """The matching + merging step merging ``r`` of ``n`` tokens (bilinear over the grids)."""
        if r <= 0:
            return 0.0
        rows = self.parts["merge_hidden" if hidden else "merge"]
        lo, hi, t = _bracket(self.grid, n)
        col = [a + t * (b - a) for a, b in zip(rows[lo], rows[hi], strict=True)]
        return interp(self.r_grid, col, r)

    # ---- the prediction ----
    def terms(self, cand: Candidate) -> list[tuple[str, float]]:
        """(part, ms) of every term of the sum for ``cand``, in model order (edges first); the part's
        kind (its coefficient) is the label up to ``(``, ``merge_hidden`` counting as ``merge``."""
        k = self.key
        kinds = block_kinds(k.depth, cand.removed)
        sched = cand.schedule(k.depth)
        counts = token_counts(k.num_tokens, k.num_protected, sched)
        out = [(f"edges({counts[-1]})", self.part_ms("edges", counts[-1]))]
        sized = False  # as shrink.merging.patch.apply_tome: a block after a merging block weighs attention by size
        for i, kind in enumerate(kinds):
            n, n2, r = counts[i], counts[i + 1], sched[i]
            if kind == "attn":
                if r == 0 and not sized:
                    out.append((f"plain({n})", self.part_ms("plain", n)))
                else:
                    out.append((f"attn({n})", self.part_ms("attn", n)))
                    if r > 0:
                        out.append((f"merge({n},{n - n2})", self.merge_ms(n, n - n2)))
                    out.append((f"mlp({n2})", self.part_ms("mlp", n2)))
            else:
                out.append((f"free({n})", self.part_ms("free", n)))
                if r > 0 and cand.tome_policy == "hidden":
                    out.append((f"merge_hidden({n},{n - n2})", self.merge_ms(n, n - n2, hidden=True)))
                    out.append((f"mlp({n2})-mlp({n})", self.part_ms("mlp", n2) - self.part_ms("mlp", n)))
            sized = sized or r > 0
        return out

    def kind_sums(self, cand: Candidate) -> dict[str, float]:
        """The table's ms along ``cand``'s token counts, summed per kind (uncalibrated)."""
        if cand not in self._sums:  # the search asks for the same plans (and the dense model) many times
            out = dict.fromkeys(KINDS, 0.0)
            for label, v in self.terms(cand):
                out[_kind(label)] += v
            self._sums[cand] = out
        return dict(self._sums[cand])

    def sum_ms(self, cand: Candidate) -> float:
        """The plain sum of the table along ``cand``'s token counts (no calibration)."""
        return sum(self.kind_sums(cand).values())

    def predict_ms(self, cand: Candidate) -> float:
        """Predicted latency (ms) of one batch of the whole model under ``cand``: each kind's sum times its
        coefficient."""
        return sum(self.coef[k] * v for k, v in self.kind_sums(cand).items())

    def dense_ms(self) -> float:
        return self.predict_ms(Candidate())

    def predict_speedup(self, cand: Candidate) -> float:
        return self.dense_ms() / self.predict_ms(cand)

    # ---- files ----
    def to_dict(self) -> dict[str, Any]:
        return {"schema": SCHEMA, "key": self.key.to_dict(), "grid": list(self.grid), "r_grid": list(self.r_grid),
                "parts": self.parts, "coef": dict(self.coef),
                "validation": self.validation, "info": self.info}

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def from_dict(cls, d: Any, where: str = "cost table") -> CostTable:
        if not isinstance(d, dict) or d.get("schema") != SCHEMA:
            raise ShrinkError(f"{where} is not a {SCHEMA} table")
        try:
            key = CostKey.from_dict(d["key"])
            grid, r_grid = d["grid"], d["r_grid"]
            if not all(isinstance(v, int) for v in [*grid, *r_grid]):
                raise ShrinkError("grids must hold integers")
            if not isinstance(d["parts"], dict):
                raise ShrinkError("parts must be a mapping")
            validation, info = d.get("validation", []), d.get("info", {})
            if not isinstance(validation, list) or not isinstance(info, dict):
                raise ShrinkError("validation / info have the wrong type")
            return cls(key=key, grid=list(grid), r_grid=list(r_grid), parts=d["parts"], coef=d["coef"],
                       validation=validation, info=info)
        except KeyError as e:
            raise ShrinkError(f"{where} has no {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise ShrinkError(f"{where} is malformed: {e}") from None
        except ShrinkError as e:
            raise ShrinkError(f"{where}: {e}") from None

    @classmethod
    def load(cls, path: str | Path, expect: CostKey | None = None) -> CostTable:
        """Read a table; with ``expect`` a table for any other key (versions included) is a ShrinkError."""
        p = Path(path)
        try:
            d = json.loads(p.read_text())
        except OSError as e:
            raise ShrinkError(f"cannot read cost table {p}: {e.strerror or e}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ShrinkError(f"cost table {p} is not valid JSON: {first_line(e)}") from None
        table = cls.from_dict(d, f"cost table {p}")
        if expect is not None:
            diff = table.key.differences(expect)
            if diff:
                raise ShrinkError(f"cost table {p} was measured for another setting ({'; '.join(diff)})")
        return table


def _kind(label: str) -> str:
    name = label.split("(", 1)[0]
    return "merge" if name == "merge_hidden" else name


def finite(v: Any) -> bool:
    """True for a finite int or float (not a bool)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
