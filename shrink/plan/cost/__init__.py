"""The measured cost model: time each part of a ViT once, predict any plan's latency by summing.

A :class:`CostTable` holds, for one :class:`CostKey` (model, input, device, dtype, batch, threads,
runtime and the library versions), the milliseconds of one batch through each part of the model,
measured on a grid of token counts (every ``token_step`` tokens, linear interpolation between):

- ``plain``: a whole attention block as timm runs it (fused attention, no merging anywhere before);
- ``attn``: the attention half of a ToMe block (proportional attention with token sizes, the keys
  metric), ``mlp``: the MLP half (``x + mlp(norm2(x))``) -- a block that merges r of n tokens runs
  ``attn(n) + merge(n, r) + mlp(n - r)``, exactly as :mod:`shrink.merging.patch` runs it;
- ``free``: an attention-free block (exported, ``2x + mlp``);
- ``merge`` / ``merge_hidden``: the matching and merging step (bipartite soft matching on the keys
  metric / on ``norm2(x)`` for policy "hidden", then the size-weighted merge) per (n, r), on a grid
  of r (powers of two and the largest r), bilinear interpolation (under ONNX Runtime timed in eager
  torch: its shapes depend on n's parity, so one export cannot cover a token range);
- ``edges``: everything outside the blocks (stem: patch embedding, position embedding; head: final
  norm, pooling, classifier) with the given number of tokens reaching the head.

All parts are timed in one process with interleaved repeats (every repeat visits every part, the
order rotating); the median of the repeats is kept (as ``benchmark.py`` reports), and each part
is then smoothed by a least-squares quadratic in n over the grid (``smooth=True``; the measured
values stay in ``info["raw_parts"]``).
:meth:`CostTable.predict_ms` walks a :class:`Candidate`'s token counts
(:func:`shrink.plan.candidate.token_counts`) and sums, each part weighted by the coefficient of its
kind (``coef``: plain, attn, mlp, free, merge, edges). ``build_cost_table`` then measures whole models
in the same process, interleaved (median of the repeats, as ``benchmark.py``): four that span the
plans (dense; all attention removed; merging only; half removed and merging) fit the coefficients
(:func:`fit_coefficients`: relative least squares, pulled towards the dense model's measured / summed
ratio), and a fifth plan, not used in the fit, checks them; every one's predicted and measured
speed-ups are kept in ``validation``. Timings run with the steady allocator
(:func:`shrink.bench.measure.set_allocator`), as ``benchmark.py`` does by default. See docs/cost_model.md.

Runtimes: ``eager`` (the modules), ``compile`` (``torch.compile(dynamic=False)`` per part and shape:
slow to build), ``onnxruntime`` (each part exported once with a dynamic token axis, one session
per part, the CPU or CUDA execution provider).

A cached table is only used for the key it was built for: :meth:`CostTable.load` with ``expect``
raises a one-line :class:`ShrinkError` naming the fields that differ; :func:`cached_cost_table`
logs that line and rebuilds (the cache file name holds the model, runtime, device, dtype, batch and
threads, so a table for other versions is replaced, never used).

Modules: :mod:`.key` (the key), :mod:`.table` (the table, the prediction, its file), :mod:`.timing`
(the parts as modules, the runtimes, the interleaved timer), :mod:`.build` (timing the parts,
smoothing), :mod:`.fit` (whole models, the per-kind coefficients, the validation plans) and
:mod:`.cache` (the cache folder). Every public name is re-exported here.
"""
from shrink.plan.cost.build import build_cost_table, r_grid_for, smooth_parts, token_grid
from shrink.plan.cost.cache import cache_path, cached_cost_table
from shrink.plan.cost.fit import (
    RIDGE,
    build_plan_model,
    calibrate,
    default_validation,
    fit_coefficients,
    measure_models,
)
from shrink.plan.cost.key import RUNTIMES, TIMED_FAMILIES, CostKey, cost_key_for
from shrink.plan.cost.table import KINDS, PARTS_N, PARTS_NR, SCHEMA, CostTable

__all__ = ["KINDS", "PARTS_N", "PARTS_NR", "RIDGE", "RUNTIMES", "SCHEMA", "TIMED_FAMILIES", "CostKey", "CostTable",
           "build_cost_table", "build_plan_model", "cache_path", "cached_cost_table", "calibrate", "cost_key_for",
           "default_validation", "fit_coefficients", "measure_models", "r_grid_for", "smooth_parts", "token_grid"]
