"""Whole models and the coefficients: plans built as models, measured interleaved, and the per-kind
coefficients fitted on them (:func:`fit_coefficients`), with the validation plans that fit and check."""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence

from torch import nn

from shrink.bench.measure import set_allocator
from shrink.errors import ShrinkError
from shrink.merging.merge import max_merge
from shrink.plan.candidate import Candidate
from shrink.plan.cost.key import CostKey
from shrink.plan.cost.table import KINDS, CostTable, finite
from shrink.plan.cost.timing import interleaved, runtime_for, torch_threads, whole_runner

__all__ = ["RIDGE", "build_plan_model", "calibrate", "default_validation", "fit_coefficients", "measure_models"]

_logger = logging.getLogger(__name__)


def build_plan_model(base: nn.Module, cand: Candidate) -> nn.Module:
    """A copy of ``base`` under ``cand``: its removed blocks exported attention-free, then ToMe."""
    from shrink.bench.spec import build_variant

    variant = ("pruned" if cand.removed else "dense") + ("+tome" if cand.tome_r else "")
    return build_variant(base, variant, list(cand.removed) or None, cand.tome_r, cand.tome_start_idx,
                         cand.tome_policy, cand.tome_inflection)


def measure_models(base: nn.Module, key: CostKey, cands: Sequence[Candidate], *, repeats: int = 5, warmup: int = 2,
                   progress: bool = True) -> list[float]:
    """Median ms of one batch of each plan's whole model (``base`` under ``cand``), interleaved."""
    set_allocator("steady", keep=True)
    rt = runtime_for(key)
    with torch_threads(key.threads):
        timers = {i: whole_runner(build_plan_model(base, c), key, rt) for i, c in enumerate(cands)}
        ms = interleaved(timers, warmup, repeats, rt.sync, progress, "whole models")
    return [ms[i] for i in range(len(cands))]


def default_validation(key: CostKey) -> tuple[list[Candidate], list[Candidate]]:
    """The plans that fit the coefficients -- the dense model, all attention removed, merging only (r0 =
    the most a block can merge / depth), half the attention removed and merging -- and one that checks
    them (the first third removed, 1.5 r0, policy hidden)."""
    d = key.depth
    r0 = max(1, max_merge(key.num_tokens, key.num_protected) // max(d, 1))
    fit = [Candidate(), Candidate(removed=tuple(range(d))), Candidate(tome_r=r0),
           Candidate(removed=tuple(range(d // 2)), tome_r=r0)]
    check = [Candidate(removed=tuple(range(d // 3)), tome_r=max(1, 3 * r0 // 2), tome_policy="hidden")]
    return fit, [c for c in check if c not in fit]


RIDGE = 0.1  # weight of the pull towards the dense model's ratio (relative units; see fit_coefficients)


def fit_coefficients(sums: Sequence[dict[str, float]], measured: Sequence[float], ridge: float = RIDGE) -> dict[str, float]:
    """Per-kind coefficients c minimising sum_m ((sum_k c_k S_mk - y_m) / y_m)^2 + ridge sum_k ((c_k - c0) / c0)^2.

    ``sums[m]`` is plan m's table sum per kind (:meth:`CostTable.kind_sums`), ``measured[m]`` its whole-model
    ms; plan 0 is the dense model and c0 its measured / summed ratio (the single common factor this
    replaces). The pull towards c0 settles kinds the plans cannot tell apart (attention and MLP halves
    always come together); each c is kept within [c0 / 4, 4 c0]. Measured on deit_small (batch 16, 2
    threads, steady allocator; scripts/cost_fit_check.py): fitted on 4 plans, the speed-ups of 16 were
    within 1.1 % eager and 3.7 % ONNX Runtime (one common factor: 4.6 % and 9.7 %)."""
    import numpy as np

    if len(sums) != len(measured) or not sums or not all(finite(m) and m > 0 for m in measured):
        raise ShrinkError("fit_coefficients: one positive measurement per plan is needed")
    S = np.array([[float(s.get(k, 0.0)) for k in KINDS] for s in sums])
    y = np.asarray(measured, dtype=float)
    if S[0].sum() <= 0:
        raise ShrinkError("fit_coefficients: the dense model's table sum is 0")
    c0 = y[0] / S[0].sum()
    k = len(KINDS)
    a = np.vstack([S / y[:, None], math.sqrt(ridge) * np.eye(k) / c0])
    b = np.concatenate([np.ones(len(y)), math.sqrt(ridge) * np.ones(k)])
    c, *_ = np.linalg.lstsq(a, b, rcond=None)
    c = np.clip(c, c0 / 4, 4 * c0)
    return {name: float(v) for name, v in zip(KINDS, c, strict=True)}


def calibrate(table: CostTable, model: nn.Module, fit: list[Candidate], check: Sequence[Candidate] = (), *,
              repeats: int = 5, warmup: int = 2, progress: bool = True) -> None:
    """Measure ``fit`` (the first is the dense model) and ``check`` as whole models, interleaved; fit
    ``table.coef`` on ``fit`` (:func:`fit_coefficients`) and record every plan's summed, predicted and
    measured ms and speed-ups in ``table.validation`` (``"fit"``: whether it was used in the fit)."""
    cands = [*fit, *check]
    measured = measure_models(model, table.key, cands, repeats=repeats, warmup=warmup, progress=progress)
    sums = [table.kind_sums(c) for c in cands]
    table.coef = fit_coefficients(sums[:len(fit)], measured[:len(fit)])
    dense_m, dense_p, dense_s = measured[0], table.predict_ms(cands[0]), sum(sums[0].values())
    table.validation = []
    for i, (c, m) in enumerate(zip(cands, measured, strict=True)):
        s, p = sum(sums[i].values()), table.predict_ms(c)
        table.validation.append({"candidate": c.as_dict(), "fit": i < len(fit), "sum_ms": s, "predicted_ms": p,
                                 "measured_ms": m, "sum_speedup": dense_s / s, "predicted_speedup": dense_p / p,
                                 "measured_speedup": dense_m / m})
        _logger.info("cost table %s: %s sum %.1f ms, predicted %.1f ms, measured %.1f ms",
                     "fit" if i < len(fit) else "check", c.as_dict(), s, p, m)
