"""Building a cost table: time every part of a model on the token grid, smooth each part by a
quadratic in the token count, then calibrate on whole models (:mod:`shrink.plan.cost.fit`)."""
from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from shrink.bench.measure import set_allocator
from shrink.blocks.contract import get_blocks
from shrink.errors import ShrinkError
from shrink.merging.merge import max_merge
from shrink.plan.candidate import Candidate
from shrink.plan.cost.fit import calibrate, default_validation
from shrink.plan.cost.key import CostKey
from shrink.plan.cost.table import PARTS_N, PARTS_NR, CostTable, interp
from shrink.plan.cost.timing import (
    AttnHalf,
    MergeStep,
    MlpHalf,
    Plain,
    Runtime,
    edges_model,
    free_block,
    interleaved,
    runtime_for,
    torch_threads,
    whole_runner,
)

__all__ = ["build_cost_table", "r_grid_for", "smooth_parts", "token_grid"]

_logger = logging.getLogger(__name__)


def token_grid(num_tokens: int, num_protected: int, step: int) -> list[int]:
    """Every ``step`` tokens down from ``num_tokens``, and the fewest a plan can leave (protected + 1)."""
    if step < 1:
        raise ShrinkError(f"token_step must be >= 1, got {step}")
    low = num_protected + 1
    return sorted({*range(num_tokens, low, -step), low, num_tokens})


def r_grid_for(num_tokens: int, num_protected: int) -> list[int]:
    """The merge sizes timed: powers of two up to the most one block can merge, and that most."""
    top = max(1, max_merge(num_tokens, num_protected))
    return sorted({*(2 ** i for i in range(int(math.log2(top)) + 1)), top})


def build_cost_table(model: nn.Module, key: CostKey, *, token_step: int = 8, repeats: int = 5, warmup: int = 2,
                     progress: bool = True, validate: Sequence[Candidate] | None = None,
                     smooth: bool = True) -> CostTable:
    """Time every part of ``model`` (a dense timm ViT, not changed) under ``key`` and return the table.

    ``smooth``: each part's timings are replaced by a least-squares quadratic in the token count
    (:func:`smooth_parts`; the measured values stay in ``info["raw_parts"]``).

    ``validate``: (fit, check) plans whose whole models are measured after the parts, interleaved: the
    first list (its first plan the dense model) fits the coefficients, the second only checks them;
    both are recorded in ``validation``. None takes :func:`default_validation`, ([], []) skips it
    (every coefficient 1).
    """
    if repeats < 1 or warmup < 0:
        raise ShrinkError(f"repeats must be >= 1 and warmup >= 0, got {repeats}, {warmup}")
    set_allocator("steady", keep=True)
    t_start = time.perf_counter()
    model = copy.deepcopy(model).float().cpu().eval()
    blocks = get_blocks(model)
    if len(blocks) != key.depth:
        raise ShrinkError(f"the model has {len(blocks)} blocks; the cost key says {key.depth}")
    p, n0 = key.num_protected, key.num_tokens
    rt = runtime_for(key)
    grid, rg = token_grid(n0, p, token_step), r_grid_for(n0, p)
    ms, timers = _time_parts(model, blocks, key, rt, grid, rg, warmup=warmup, repeats=repeats, progress=progress)
    parts = _parts(ms, grid, rg, p)
    raw = None
    if smooth:
        raw, parts = parts, smooth_parts(parts, grid, p)
    table = CostTable(key=key, grid=grid, r_grid=rg, parts=parts,
                      info={"smooth": smooth, "raw_parts": raw, "merge_runtime": "eager" if key.runtime == "onnxruntime" else key.runtime,
                            "token_step": token_step, "repeats": repeats, "warmup": warmup,
                            "parts_s": round(time.perf_counter() - t_start, 1), "timers": len(timers)})
    fit, check = default_validation(key) if validate is None else validate
    if fit:
        calibrate(table, model, list(fit), list(check), repeats=repeats, warmup=warmup, progress=progress)
    table.info["build_s"] = round(time.perf_counter() - t_start, 1)
    return table


def _time_parts(model: nn.Module, blocks: Sequence[nn.Module], key: CostKey, rt: Runtime, grid: list[int],
                rg: list[int], *, warmup: int, repeats: int, progress: bool) -> tuple[dict[tuple, float], dict]:
    """Every part timed on the grid in interleaved repeats: (median ms per timer key, the timers)."""
    x0, gen, block, free = _inputs(model, blocks, key)
    with torch_threads(key.threads):
        prepared = _prepare_parts(rt, block, free, grid[0])
        metric_dim = _metric_dim(block, x0)
        timers = _bind_parts(prepared, x0, grid)
        timers.update(_merge_timers(key, rt, free, x0, gen, grid, rg, metric_dim))
        edges = _edges_timers(model, key, rt, grid)
        timers.update(edges)
        _logger.info("cost table: timing %d parts x %d repeats (%s)", len(timers), repeats, key)
        # the median of the repeats, as benchmark.py reports whole models: the fastest repeat would miss
        # what a loaded machine adds to every small op (measured: whole ToMe models then lose to the sum)
        ms = interleaved(timers, warmup, repeats, rt.sync, progress, "cost table")
    return ms, timers


def _inputs(model: nn.Module, blocks: Sequence[nn.Module],
            key: CostKey) -> tuple[torch.Tensor, torch.Generator, nn.Module, nn.Module]:
    """(random tokens at the most tokens, the generator that drew them (it draws the merge metrics next),
    a block and an attention-free block as the model runs them)."""
    dim = _embed_dim(model, key)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(key.batch_size, key.num_tokens, dim, generator=gen)
    block = blocks[min(1, len(blocks) - 1)]  # a block as the model runs it (all blocks of one model are alike)
    free = free_block(model, min(1, len(blocks) - 1))
    return x0, gen, block, free


def _tok(x0: torch.Tensor, n: int) -> torch.Tensor:
    return x0[:, :n].contiguous()


def _ones(x0: torch.Tensor, n: int) -> torch.Tensor:
    return torch.ones(x0.shape[0], n, 1)


def _prepare_parts(rt: Runtime, block: nn.Module, free: nn.Module, n: int) -> dict[str, Callable]:
    """The block's parts (whole, attention half, MLP half, attention-free), each a copy, prepared at ``n`` tokens."""
    return {"plain": rt.prepare(Plain(copy.deepcopy(block)), n),
            "attn": rt.prepare(AttnHalf(copy.deepcopy(block)), n),
            "mlp": rt.prepare(MlpHalf(copy.deepcopy(block)), n),
            "free": rt.prepare(Plain(copy.deepcopy(free)), n)}


def _bind_parts(prepared: dict[str, Callable], x0: torch.Tensor, grid: list[int]) -> dict[tuple, Callable]:
    timers: dict[tuple, Callable[[], Any]] = {}
    for n in reversed(grid):  # the first bind exports (onnxruntime): at the most tokens
        timers[("plain", n)] = prepared["plain"]((_tok(x0, n),))
        timers[("attn", n)] = prepared["attn"]((_tok(x0, n), _ones(x0, n)))
        timers[("mlp", n)] = prepared["mlp"]((_tok(x0, n),))
        timers[("free", n)] = prepared["free"]((_tok(x0, n),))
    return timers


def _merge_timers(key: CostKey, rt: Runtime, free: nn.Module, x0: torch.Tensor, gen: torch.Generator,
                  grid: list[int], rg: list[int], metric_dim: int) -> dict[tuple, Callable]:
    """The merge step, without and with the attention-free block on the hidden tokens, at every r and n it allows."""
    p, n0 = key.num_protected, key.num_tokens
    # ONNX Runtime: the merge step's shapes depend on n's parity and r, so no one export covers a token
    # range; it is timed in eager torch (a small share of a block; its error shows in the validation)
    merge_rt = Runtime(key) if key.runtime == "onnxruntime" else rt
    timers: dict[tuple, Callable] = {}
    for hidden in (False, True):
        name = "merge_hidden" if hidden else "merge"
        for r in rg:
            lo = 2 * r + p  # max_merge(n) >= r from here on
            if lo > n0:
                continue
            bind = merge_rt.prepare(MergeStep(r, p, copy.deepcopy(free) if hidden else None), lo)
            for n in grid:
                if n >= lo:
                    metric = torch.randn(key.batch_size, n, metric_dim, generator=gen)
                    timers[(name, n, r)] = bind((_tok(x0, n), metric, _ones(x0, n)))
    return timers


def _parts(ms: dict[tuple, float], grid: list[int], rg: list[int], p: int) -> dict[str, Any]:
    """The table's parts from the timings: per grid point, and per grid point x r for the merge steps."""
    parts: dict[str, Any] = {name: [ms[(name, n)] for n in grid] for name in ("plain", "attn", "mlp", "free")}
    timed = sorted(n for name, n, *_ in ms if name == "edges")
    parts["edges"] = [interp(timed, [ms[("edges", t)] for t in timed], n) for n in grid]
    for name in PARTS_NR:
        rows = []
        for n in grid:
            cap = max_merge(n, p)
            # r beyond what n allows is capped (as bipartite_soft_matching does): the largest timed r <= cap
            rows.append([0.0 if cap == 0 else ms[(name, n, max(v for v in rg if v <= min(r, cap)))] for r in rg])
        parts[name] = rows
    return parts


def smooth_parts(parts: dict[str, Any], grid: list[int], num_protected: int) -> dict[str, Any]:
    """Each part as a least-squares quadratic in the token count n, evaluated on the grid (>= 0).

    A part's cost is a + b n + c n^2 (linear layers and norms grow with n, attention scores with n^2);
    the fit over the whole grid averages the timing noise of single points, and points more than 4
    median deviations off the first fit (a timing hit by other load) are left out of the second.
    Merge columns are fitted where a merge is possible (max_merge(n) > 0)."""
    import numpy as np

    def fit(xs: list[int], ys: list[float]) -> list[float]:
        if len(xs) < 4:
            return list(ys)
        x, y = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
        keep = np.ones(len(x), dtype=bool)
        for _ in range(2):  # fit, drop the points far off it (a repeat hit by other load), fit again
            coef = np.polyfit(x[keep], y[keep], 2)
            res = np.abs(y - np.polyval(coef, x))
            mad = float(np.median(res[keep]))
            new = res <= max(4.0 * mad, 1e-12 + 1e-9 * float(np.abs(y).max()))
            if new.sum() < 4 or (new == keep).all():
                break
            keep = new
        return [max(0.0, float(v)) for v in np.polyval(coef, x)]

    out: dict[str, Any] = {name: fit(grid, parts[name]) for name in PARTS_N}
    for name in PARTS_NR:
        rows = [list(row) for row in parts[name]]
        ok = [i for i, n in enumerate(grid) if max_merge(n, num_protected) > 0]
        for j in range(len(rows[0]) if rows else 0):
            fitted = fit([grid[i] for i in ok], [rows[i][j] for i in ok])
            for i, v in zip(ok, fitted, strict=True):
                rows[i][j] = v
        out[name] = rows
    return out


def _edges_timers(model: nn.Module, key: CostKey, rt: Runtime, grid: list[int]) -> dict[tuple, Callable]:
    x = torch.randn(key.batch_size, *key.input_size, generator=torch.Generator().manual_seed(1))
    if key.runtime == "onnxruntime":  # one export: stem + head on all tokens (the head's share of fewer is small)
        return {("edges", key.num_tokens): whole_runner(edges_model(model, None), key, rt)}
    out = {}
    for n in _coarse(grid):  # the head's cost hardly depends on the token count: every 4th grid point
        out[("edges", n)] = rt.prepare(edges_model(model, n), grid[0])((x,))
    return out


def _coarse(grid: list[int]) -> list[int]:
    return sorted({*grid[::4], grid[-1]})


def _embed_dim(model: nn.Module, key: CostKey) -> int:
    seen: list[int] = []
    blocks = get_blocks(model)
    hook = blocks[0].register_forward_pre_hook(lambda _m, args: seen.append(int(args[0].shape[-1])))
    try:
        with torch.inference_mode():
            model(torch.zeros(1, *key.input_size))
    finally:
        hook.remove()
    return seen[0]


def _metric_dim(block: nn.Module, x: torch.Tensor) -> int:
    with torch.inference_mode():
        _, metric = AttnHalf(block)(x[:1, :8], torch.ones(1, 8, 1))
    return int(metric.shape[-1])
