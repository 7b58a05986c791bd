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
"""
from __future__ import annotations

import bisect
import contextlib
import copy
import io
import json
import logging
import math
import platform
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shrink.bench.measure import set_allocator
from shrink.blocks.attention_free import export
from shrink.blocks.contract import AttentionFreeBlock, block_family, get_blocks
from shrink.blocks.dilution import dilute
from shrink.errors import ShrinkError
from shrink.io import atomic_write_json
from shrink.merging.kernels import AttentionCall, attention_kernel, model_support
from shrink.merging.merge import bipartite_soft_matching, max_merge, merge_wavg
from shrink.modelio.create import input_size as model_input_size
from shrink.plan.candidate import Candidate, block_kinds, token_counts
from shrink.precision import dtype_of

__all__ = ["KINDS", "RUNTIMES", "SCHEMA", "CostKey", "CostTable", "build_cost_table", "build_plan_model",
           "cached_cost_table", "cost_key_for", "fit_coefficients", "measure_models"]

_logger = logging.getLogger(__name__)

SCHEMA = "shrink.plan.cost/2"  # /2: per-kind coefficients (coef) replace scale / offset_ms
RUNTIMES = ("eager", "compile", "onnxruntime")
PARTS_N = ("plain", "attn", "mlp", "free", "edges")  # one value per grid token count
KINDS = ("plain", "attn", "mlp", "free", "merge", "edges")  # one calibration coefficient each
PARTS_NR = ("merge", "merge_hidden")  # one value per (grid token count, grid r)


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


# ------------------------------------------------------------------------------------------------
# The key
# ------------------------------------------------------------------------------------------------

@dataclass
class CostKey:
    """Everything the timings depend on; two tables are interchangeable only when their keys are equal."""

    model: str
    input_size: tuple[int, int, int]
    num_tokens: int
    num_protected: int
    depth: int
    device: str
    dtype: str
    batch_size: int
    threads: int | None
    runtime: str
    versions: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.input_size = tuple(int(v) for v in self.input_size)
        if self.runtime not in RUNTIMES:
            raise ShrinkError(f"unknown runtime {self.runtime!r}; choose from {', '.join(RUNTIMES)}")
        dtype_of(self.dtype)
        if self.batch_size < 1 or self.depth < 1 or self.num_tokens < 1 or not 0 <= self.num_protected < self.num_tokens:
            raise ShrinkError(f"bad cost key: batch {self.batch_size}, depth {self.depth}, tokens {self.num_tokens}, "
                              f"protected {self.num_protected}")
        if self.threads is not None and self.threads < 1:
            raise ShrinkError(f"threads must be >= 1, got {self.threads}")

    def __str__(self) -> str:
        v = " ".join(f"{k} {self.versions[k]}" for k in sorted(self.versions))
        return (f"{self.model} {'x'.join(map(str, self.input_size))} ({self.num_tokens} tokens, {self.depth} blocks) "
                f"on {self.device} {self.dtype}, batch {self.batch_size}, "
                f"{'default' if self.threads is None else self.threads} threads, {self.runtime}; {v}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        return d

    @classmethod
    def from_dict(cls, d: Any) -> CostKey:
        if not isinstance(d, dict):
            raise ShrinkError("cost key is not a mapping")
        want = {f for f in cls.__dataclass_fields__}
        if set(d) != want:
            raise ShrinkError(f"cost key fields {sorted(d)} differ from {sorted(want)}")
        ints = ("num_tokens", "num_protected", "depth", "batch_size")
        if not all(isinstance(d[k], int) and not isinstance(d[k], bool) for k in ints) or not (
                d["threads"] is None or isinstance(d["threads"], int)):
            raise ShrinkError("cost key: token counts, depth, batch size and threads must be integers")
        if not (isinstance(d["input_size"], list) and len(d["input_size"]) == 3
                and all(isinstance(v, int) for v in d["input_size"])):
            raise ShrinkError("cost key: input_size must be 3 integers")
        if not all(isinstance(d[k], str) for k in ("model", "device", "dtype", "runtime")) or not (
                isinstance(d["versions"], dict) and all(isinstance(v, str) for v in d["versions"].values())):
            raise ShrinkError("cost key: model, device, dtype, runtime and versions must be strings")
        return cls(**{**d, "input_size": tuple(d["input_size"])})

    def differences(self, other: CostKey) -> list[str]:
        """``field: table X, wanted Y`` (self is the table's key) for every field that differs, versions one by one."""
        a, b = self.to_dict(), other.to_dict()
        out = [f"{k}: table {a[k]}, wanted {b[k]}" for k in a if k != "versions" and a[k] != b[k]]
        va, vb = a["versions"], b["versions"]
        out += [f"{k}: table {va.get(k)}, wanted {vb.get(k)}" for k in sorted(set(va) | set(vb)) if va.get(k) != vb.get(k)]
        return out


def _count_tokens(model: nn.Module, size: Sequence[int]) -> int:
    blocks = get_blocks(model)
    seen: list[int] = []
    hook = blocks[0].register_forward_pre_hook(lambda _m, args: seen.append(int(args[0].shape[1])))
    p = next(model.parameters())
    try:
        with torch.inference_mode():
            model.eval()(torch.zeros(1, *size, device=p.device, dtype=p.dtype))
    finally:
        hook.remove()
    return seen[0]


# block families whose parts (attention half with sizes, MLP half, merge) run on their own
TIMED_FAMILIES = frozenset({"vit", "respost", "parallel-things", "eva", "eva-postnorm"})


def cost_key_for(model: nn.Module, model_name: str, *, device: str | torch.device = "cpu", dtype: str = "fp32",
                 batch_size: int = 16, threads: int | None = None, runtime: str = "eager",
                 img_size: int | None = None) -> CostKey:
    """The key of ``model`` (a dense timm ViT) measured under these settings, with the installed versions."""
    size = model_input_size(model, img_size)
    depth = len(get_blocks(model))
    families = {getattr(block_family(b), "name", type(b).__name__) for b in get_blocks(model)}
    if not families <= TIMED_FAMILIES:
        raise ShrinkError(f"the cost model times {', '.join(sorted(TIMED_FAMILIES))} blocks; this model has "
                          f"{', '.join(sorted(families - TIMED_FAMILIES))} (its merging needs the model's positions "
                          "or biases, not timed yet)")
    versions = {"python": platform.python_version(), "torch": torch.__version__, "timm": _version("timm") or "?",
                "shrink": _version("shrink") or "?", "allocator": set_allocator("steady", keep=True)}
    if runtime == "onnxruntime":
        versions["onnxruntime"] = _version("onnxruntime") or "?"
        versions["onnxscript"] = _version("onnxscript") or "?"
    dev = torch.device(device)
    if dev.type == "cuda":
        versions["gpu"] = torch.cuda.get_device_name(dev)
    else:
        versions["cpu"] = _cpu_name()
    return CostKey(model=model_name, input_size=tuple(size), num_tokens=_count_tokens(model, size),
                   num_protected=_num_protected(model), depth=depth, device=str(dev),
                   dtype=dtype, batch_size=int(batch_size), threads=threads, runtime=runtime, versions=versions)


def _num_protected(model: nn.Module) -> int:
    """Tokens that never merge in the block sequence (CaiT: none; its class token joins after the blocks)."""
    support = model_support(model)
    return support.num_protected(model) if support is not None else int(getattr(model, "num_prefix_tokens", 0))


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


# ------------------------------------------------------------------------------------------------
# The table and the prediction
# ------------------------------------------------------------------------------------------------

def _bracket(xs: Sequence[float], x: float) -> tuple[int, int, float]:
    """(lo, hi, t) with x = xs[lo] + t (xs[hi] - xs[lo]) on ascending ``xs``, clamped at the ends."""
    if x <= xs[0]:
        return 0, 0, 0.0
    if x >= xs[-1]:
        return len(xs) - 1, len(xs) - 1, 0.0
    hi = bisect.bisect_left(xs, x)
    lo = hi - 1
    return lo, hi, (x - xs[lo]) / (xs[hi] - xs[lo])


def _interp(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
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
            if not isinstance(v, list) or len(v) != len(g) or not all(_finite(t) for t in v):
                raise ShrinkError(f"cost table: part {name!r} must hold {len(g)} finite numbers")
        for name in PARTS_NR:
            v = self.parts.get(name)
            if not isinstance(v, list) or len(v) != len(g) or not all(
                    isinstance(row, list) and len(row) == len(rg) and all(_finite(t) for t in row) for row in v):
                raise ShrinkError(f"cost table: part {name!r} must hold {len(g)} x {len(rg)} finite numbers")
        if not (isinstance(self.coef, dict) and set(self.coef) == set(KINDS)
                and all(_finite(v) and v > 0 for v in self.coef.values())):
            raise ShrinkError(f"cost table: coef must give a number > 0 for each of {', '.join(KINDS)}")

    # ---- lookups ----
    def part_ms(self, name: str, n: float) -> float:
        return _interp(self.grid, self.parts[name], n)

    def merge_ms(self, n: float, r: float, hidden: bool = False) -> float:
        """The matching + merging step merging ``r`` of ``n`` tokens (bilinear over the grids)."""
        if r <= 0:
            return 0.0
        rows = self.parts["merge_hidden" if hidden else "merge"]
        lo, hi, t = _bracket(self.grid, n)
        col = [a + t * (b - a) for a, b in zip(rows[lo], rows[hi], strict=True)]
        return _interp(self.r_grid, col, r)

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
            raise ShrinkError(f"cost table {p} is not valid JSON: {str(e).splitlines()[0]}") from None
        table = cls.from_dict(d, f"cost table {p}")
        if expect is not None:
            diff = table.key.differences(expect)
            if diff:
                raise ShrinkError(f"cost table {p} was measured for another setting ({'; '.join(diff)})")
        return table


def _kind(label: str) -> str:
    name = label.split("(", 1)[0]
    return "merge" if name == "merge_hidden" else name


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# ------------------------------------------------------------------------------------------------
# The parts as modules (so that every runtime can run them)
# ------------------------------------------------------------------------------------------------

class _Plain(nn.Module):
    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class _AttnHalf(nn.Module):
    """x + attention branch, proportional attention on ``size``, and the keys metric (a merging block's first half)."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fam = block_family(self.block)
        metrics: list[torch.Tensor] = []

        def call(attn: nn.Module, h: torch.Tensor, _ctx: dict) -> torch.Tensor:
            kernel = attention_kernel(attn)  # the family's ToMe kernel (no positions: cost, not values)
            if kernel is None:
                raise ShrinkError(f"no ToMe attention kernel for {type(attn).__name__}: cannot time its merging")
            y, metric = kernel(attn, h, AttentionCall(size, True, 0, {}, None))
            metrics.append(metric)
            return y

        return x + fam.attention_branch(self.block, x, {}, attn_call=call), metrics[0]


class _MlpHalf(nn.Module):
    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + block_family(self.block).mlp_branch(self.block, x, {})


class _Merge(nn.Module):
    """Bipartite soft matching of ``r`` on ``metric`` and the size-weighted merge of ``x`` and the sizes."""

    def __init__(self, r: int, num_protected: int, hidden_block: nn.Module | None = None):
        super().__init__()
        self.r, self.p = int(r), int(num_protected)
        self.block = hidden_block  # policy "hidden": the metric is the block's norm2(x)

    def forward(self, x: torch.Tensor, metric: torch.Tensor, size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.block is not None:
            metric = block_family(self.block).merge_input(self.block, x)
        m = bipartite_soft_matching(metric, self.r, self.p)
        if m is None:
            return x, size
        return merge_wavg(m, x, size)


class _Keep(nn.Module):
    """Stands for the blocks in the edges model: keeps the first ``n`` tokens."""

    def __init__(self, n: int | None = None):
        super().__init__()
        self.n = n

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:  # Eva passes rope=, BEiT a bias
        return x if self.n is None else x[:, : self.n]


def _edges_model(model: nn.Module, n: int | None) -> nn.Module:
    """``model`` (shallow copy) with its blocks replaced by :class:`_Keep`: stem + head on ``n`` tokens."""
    blocks = get_blocks(model)
    m = copy.copy(model)
    m._modules = dict(model._modules)
    name = next(k for k, v in model._modules.items() if v is blocks)
    m._modules[name] = nn.Sequential(_Keep(n))
    return m


def _free_block(model: nn.Module, index: int) -> nn.Module:
    """Block ``index`` of a copy of ``model`` with its attention removed (dilute at 0 + export)."""
    m = copy.deepcopy(model)
    dilute(m, [index], lam=0.0)
    m = export(m, inplace=True)
    blk = get_blocks(m)[index]
    if not isinstance(blk, AttentionFreeBlock):
        raise ShrinkError(f"block {index} did not export attention-free ({type(blk).__name__})")
    return blk


# ------------------------------------------------------------------------------------------------
# Runtimes: a module and its inputs -> a callable that runs it once
# ------------------------------------------------------------------------------------------------

class _Runtime:
    def __init__(self, key: CostKey):
        self.key = key
        self.device = torch.device(key.device)
        self.dtype = dtype_of(key.dtype)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def prepare(self, module: nn.Module, n_min: int) -> Callable[[tuple[torch.Tensor, ...]], Callable[[], Any]]:
        """``module`` ready to run; returns ``bind(inputs) -> run()`` (inputs at any token count >= n_min)."""
        module = module.to(self.device, self.dtype).eval()

        def bind(inputs: tuple[torch.Tensor, ...]) -> Callable[[], Any]:
            inputs = tuple(t.to(self.device, self.dtype if t.is_floating_point() else t.dtype) for t in inputs)

            def run() -> Any:
                with torch.inference_mode():
                    return module(*inputs)
            return run
        return bind


class _Compiled(_Runtime):
    def __init__(self, key: CostKey):
        super().__init__(key)
        # one compilation per part and shape: dynamo's per-code recompile limit would silently fall back to eager
        import torch._dynamo

        for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                     "accumulated_cache_size_limit"):
            if hasattr(torch._dynamo.config, name):
                setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 100_000))

    def prepare(self, module, n_min):
        module = module.to(self.device, self.dtype).eval()
        compiled = torch.compile(module, dynamic=False)

        def bind(inputs):
            inputs = tuple(t.to(self.device, self.dtype) for t in inputs)

            def run():
                with torch.inference_mode():
                    return compiled(*inputs)
            return run
        return bind


class _Ort(_Runtime):
    """Each part exported once to ONNX with a dynamic token axis (every input's dim 1), one session."""

    def prepare(self, module, n_min):
        module = module.float().cpu().eval()
        state: dict[str, Any] = {}

        def bind(inputs):
            if "session" not in state:
                state["session"] = self._export(module, inputs, n_min)
            session = state["session"]
            names = [i.name for i in session.get_inputs()]
            feed = {nm: t.float().cpu().numpy() for nm, t in zip(names, inputs, strict=True)}

            def run():
                return session.run(None, feed)
            return run
        return bind

    def _export(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], n_min: int) -> Any:
        import onnxruntime as ort

        from shrink.bench.ort import _options, _providers
        from shrink.deploy import _translation_table, require_deploy_extra

        require_deploy_extra()
        n = torch.export.Dim("n", min=max(n_min, 2), max=self.key.num_tokens)
        dyn = tuple({1: n} if t.dim() == 3 else None for t in inputs)
        try:
            with torch.no_grad():
                ep = torch.export.export(module, tuple(t.float().cpu() for t in inputs), dynamic_shapes=dyn)
            with contextlib.redirect_stdout(io.StringIO()):
                proto = torch.onnx.export(ep, (), dynamo=True, optimize=True, verbose=False,
                                          custom_translation_table=_translation_table()).model_proto
        except Exception as e:  # noqa: BLE001 - the exporters raise many types
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ShrinkError(f"cost table: ONNX export of part {type(module).__name__} failed: {first}") from e
        return ort.InferenceSession(proto.SerializeToString(), sess_options=_options(self.key.threads),
                                    providers=_providers(self.device))


def _runtime(key: CostKey) -> _Runtime:
    return {"eager": _Runtime, "compile": _Compiled, "onnxruntime": _Ort}[key.runtime](key)


# ------------------------------------------------------------------------------------------------
# Building the table
# ------------------------------------------------------------------------------------------------

def token_grid(num_tokens: int, num_protected: int, step: int) -> list[int]:
    """Every ``step`` tokens down from ``num_tokens``, and the fewest a plan can leave (protected + 1)."""
    if step < 1:
        raise ShrinkError(f"token_step must be >= 1, got {step}")
    low = num_protected + 1
    return sorted({*range(num_tokens, low, -step), low, num_tokens})


def r_grid_for(num_tokens: int, num_protected: int) -> list[int]:
    top = max(1, max_merge(num_tokens, num_protected))
    return sorted({*(2 ** i for i in range(int(math.log2(top)) + 1)), top})


def _interleaved(timers: dict[Any, Callable[[], Any]], warmup: int, repeats: int, sync: Callable[[], None],
                 progress: bool, desc: str, stat: Callable[[list[float]], float] = statistics.median) -> dict[Any, float]:
    """``stat`` (median) of the ms of each timer: every repeat runs every timer once, the order rotating."""
    from tqdm.auto import tqdm

    keys = list(timers)
    got: dict[Any, list[float]] = {k: [] for k in keys}
    with tqdm(total=(warmup + repeats) * len(keys), desc=desc, unit="call", disable=not progress, leave=False) as bar:
        for rep in range(warmup + repeats):
            shift = rep % len(keys)
            for k in keys[shift:] + keys[:shift]:
                sync()
                t0 = time.perf_counter()
                timers[k]()
                sync()
                if rep >= warmup:
                    got[k].append((time.perf_counter() - t0) * 1e3)
                bar.update()
    return {k: stat(v) for k, v in got.items()}


@contextlib.contextmanager
def _threads(n: int | None):
    old = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


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
    b, p, n0 = key.batch_size, key.num_protected, key.num_tokens
    rt = _runtime(key)
    grid, rg = token_grid(n0, p, token_step), r_grid_for(n0, p)
    dim = _embed_dim(model, key)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(b, n0, dim, generator=gen)
    block = blocks[min(1, len(blocks) - 1)]  # a block as the model runs it (all blocks of one model are alike)
    free = _free_block(model, min(1, len(blocks) - 1))

    def tok(n: int) -> torch.Tensor:
        return x0[:, :n].contiguous()

    def ones(n: int) -> torch.Tensor:
        return torch.ones(b, n, 1)

    timers: dict[tuple, Callable[[], Any]] = {}
    with _threads(key.threads):
        prepared = {"plain": rt.prepare(_Plain(copy.deepcopy(block)), grid[0]),
                    "attn": rt.prepare(_AttnHalf(copy.deepcopy(block)), grid[0]),
                    "mlp": rt.prepare(_MlpHalf(copy.deepcopy(block)), grid[0]),
                    "free": rt.prepare(_Plain(copy.deepcopy(free)), grid[0])}
        metric_dim = _metric_dim(block, x0)
        for n in reversed(grid):  # the first bind exports (onnxruntime): at the most tokens
            timers[("plain", n)] = prepared["plain"]((tok(n),))
            timers[("attn", n)] = prepared["attn"]((tok(n), ones(n)))
            timers[("mlp", n)] = prepared["mlp"]((tok(n),))
            timers[("free", n)] = prepared["free"]((tok(n),))
        # ONNX Runtime: the merge step's shapes depend on n's parity and r, so no one export covers a token
        # range; it is timed in eager torch (a small share of a block; its error shows in the validation)
        merge_rt = _Runtime(key) if key.runtime == "onnxruntime" else rt
        for hidden in (False, True):
            name = "merge_hidden" if hidden else "merge"
            for r in rg:
                lo = 2 * r + p  # max_merge(n) >= r from here on
                if lo > n0:
                    continue
                bind = merge_rt.prepare(_Merge(r, p, copy.deepcopy(free) if hidden else None), lo)
                for n in grid:
                    if n >= lo:
                        metric = torch.randn(b, n, metric_dim, generator=gen)
                        timers[(name, n, r)] = bind((tok(n), metric, ones(n)))
        edges = _edges_timers(model, key, rt, grid)
        timers.update(edges)
        _logger.info("cost table: timing %d parts x %d repeats (%s)", len(timers), repeats, key)
        # the median of the repeats, as benchmark.py reports whole models: the fastest repeat would miss
        # what a loaded machine adds to every small op (measured: whole ToMe models then lose to the sum)
        ms = _interleaved(timers, warmup, repeats, rt.sync, progress, "cost table")
    parts: dict[str, Any] = {name: [ms[(name, n)] for n in grid] for name in ("plain", "attn", "mlp", "free")}
    timed = sorted(n for name, n, *_ in ms if name == "edges")
    parts["edges"] = [_interp(timed, [ms[("edges", t)] for t in timed], n) for n in grid]
    for name in PARTS_NR:
        rows = []
        for n in grid:
            cap = max_merge(n, p)
            # r beyond what n allows is capped (as bipartite_soft_matching does): the largest timed r <= cap
            rows.append([0.0 if cap == 0 else ms[(name, n, max(v for v in rg if v <= min(r, cap)))] for r in rg])
        parts[name] = rows
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


def _edges_timers(model: nn.Module, key: CostKey, rt: _Runtime, grid: list[int]) -> dict[tuple, Callable]:
    x = torch.randn(key.batch_size, *key.input_size, generator=torch.Generator().manual_seed(1))
    if key.runtime == "onnxruntime":  # one export: stem + head on all tokens (the head's share of fewer is small)
        return {("edges", key.num_tokens): _whole_runner(_edges_model(model, None), key, rt)}
    out = {}
    for n in _coarse(grid):  # the head's cost hardly depends on the token count: every 4th grid point
        out[("edges", n)] = rt.prepare(_edges_model(model, n), grid[0])((x,))
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
        _, metric = _AttnHalf(block)(x[:1, :8], torch.ones(1, 8, 1))
    return int(metric.shape[-1])


# ------------------------------------------------------------------------------------------------
# Whole models: plans as models, and their measurement (calibration, benchmark)
# ------------------------------------------------------------------------------------------------

def build_plan_model(base: nn.Module, cand: Candidate) -> nn.Module:
    """A copy of ``base`` under ``cand``: its removed blocks exported attention-free, then ToMe."""
    from shrink.bench.spec import build_variant

    variant = ("pruned" if cand.removed else "dense") + ("+tome" if cand.tome_r else "")
    return build_variant(base, variant, list(cand.removed) or None, cand.tome_r, cand.tome_start_idx,
                         cand.tome_policy, cand.tome_inflection)


def _whole_runner(model: nn.Module, key: CostKey, rt: _Runtime) -> Callable[[], Any]:
    x = torch.randn(key.batch_size, *key.input_size, generator=torch.Generator().manual_seed(1))
    if key.runtime == "onnxruntime":
        from shrink.bench.ort import build_session

        session, _ = build_session(model, key.input_size, torch.device(key.device), key.threads,
                                   example_batch=max(2, key.batch_size))
        name = session.get_inputs()[0].name
        feed = {name: x.numpy()}
        return lambda: session.run(None, feed)
    return rt.prepare(model, 1)((x,))


def measure_models(base: nn.Module, key: CostKey, cands: Sequence[Candidate], *, repeats: int = 5, warmup: int = 2,
                   progress: bool = True) -> list[float]:
    """Median ms of one batch of each plan's whole model (``base`` under ``cand``), interleaved."""
    set_allocator("steady", keep=True)
    rt = _runtime(key)
    with _threads(key.threads):
        timers = {i: _whole_runner(build_plan_model(base, c), key, rt) for i, c in enumerate(cands)}
        ms = _interleaved(timers, warmup, repeats, rt.sync, progress, "whole models")
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

    if len(sums) != len(measured) or not sums or not all(_finite(m) and m > 0 for m in measured):
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


# ------------------------------------------------------------------------------------------------
# The cache
# ------------------------------------------------------------------------------------------------

def cache_path(cache_dir: str | Path, key: CostKey) -> Path:
    """One file per model, input, device, dtype, batch, threads and runtime (versions are checked inside)."""
    raw = (f"{key.model}_{'x'.join(map(str, key.input_size))}_{key.device}_{key.dtype}_b{key.batch_size}_"
           f"t{key.threads or 'default'}_{key.runtime}")
    return Path(cache_dir) / (re.sub(r"[^A-Za-z0-9._-]+", "-", raw) + ".json")


def _older_schema(path: Path) -> str | None:
    """The schema of a cost table file written in another (earlier) layout, else None."""
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    schema = d.get("schema") if isinstance(d, dict) else None
    ours = SCHEMA.split("/")[0] + "/"
    return schema if isinstance(schema, str) and schema.startswith(ours) and schema != SCHEMA else None


def cached_cost_table(model: nn.Module, model_name: str, *, cache_dir: str | Path, device: str = "cpu",
                      dtype: str = "fp32", batch_size: int = 16, threads: int | None = None, runtime: str = "eager",
                      img_size: int | None = None, rebuild: bool = False, token_step: int = 8, repeats: int = 5,
                      warmup: int = 2, progress: bool = True, smooth: bool = True) -> CostTable:
    """The table for these settings from ``cache_dir``, or built and saved there.

    A cached file for another key (other library versions, another CPU) is never used: its one-line
    reason is logged and the table is rebuilt; an unreadable or corrupt file is a ShrinkError (delete
    it or pass ``rebuild=True``)."""
    key = cost_key_for(model, model_name, device=device, dtype=dtype, batch_size=batch_size, threads=threads,
                       runtime=runtime, img_size=img_size)
    path = cache_path(cache_dir, key)
    older = _older_schema(path) if path.exists() and not rebuild else None
    if older:
        _logger.warning("cost table %s was written by another version of shrink (%s): rebuilding it", path, older)
    elif path.exists() and not rebuild:
        try:
            table = CostTable.load(path, expect=None)
        except ShrinkError as e:
            raise ShrinkError(f"{e} (delete it or rebuild the table)") from None
        diff = table.key.differences(key)
        if not diff:
            _logger.info("cost table: using %s", path)
            return table
        _logger.warning("cost table %s was measured for another setting (%s): rebuilding it", path, "; ".join(diff))
    with _threads(threads):
        table = build_cost_table(model, key, token_step=token_step, repeats=repeats, warmup=warmup, progress=progress,
                                 smooth=smooth)
    table.save(path)
    _logger.info("cost table: built in %.0f s, saved to %s", table.info["build_s"], path)
    return table
