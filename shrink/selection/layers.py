"""Which attention layers to remove: transfer-entropy greedy selection and the criteria it is compared with.

Every scoring criterion ranks candidate layers so that *lower means remove first*:

- ``transfer_entropy`` (the paper, Algorithm 1): ``TE(S) = H(full) - H(attention of S skipped)``,
  ``H`` the Gaussian entropy of the head's input feature. Greedy: add the layer with the minimum
  *signed* ``TE(S + {l})``; ``te_abs=True`` ranks by ``|TE|`` instead (see docs/selection.md).
- ``entropy``: entropy of the layer's attention-branch output (the paper's observation that
  low-entropy attention layers carry little information).
- ``cosine`` (Attention Drop): ``1 - cos(X, X + Attn(LN(X)))`` over all calibration tokens.
- ``block_influence`` (ShortGPT): ``1 - cos(block input, block output)`` over all tokens.
- ``random`` (seeded), ``last`` (the last k attention blocks), ``manual`` (explicit layers).

Each is one registered function in :mod:`shrink.selection.registry` (``@register_criterion``).

"Skipping" a layer makes its attention branch a pure identity (``x``, not ``2x``) on the untouched
model. Greedy variants re-measure with the already chosen layers skipped; one-shot variants rank
everything once on the full model.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from shrink.blocks.dilution import get_blocks, validate_layers
from shrink.errors import ShrinkError
from shrink.io import jsonable
from shrink.selection.criteria import PassStats, Runner, candidate_layers, check_model_api
from shrink.selection.registry import CRITERIA, CRITERION_REGISTRY, SCORED, Criterion, Scoring, get_criterion

_logger = logging.getLogger(__name__)

__all__ = ["CRITERIA", "LOG_BASE", "SCORED", "SelectionResult", "layer_table", "plot_selection", "ratio_to_k",
           "select_layers", "transfer_entropy"]

LOG_BASE = "e"  # every entropy is in nats


def ratio_to_k(ratio: float, depth: int) -> int:
    """Number of layers to remove: ``ratio * depth`` rounded half *up* (not Python's banker's rounding).

    0.375 * 12 = 4.5 gives 5 (``round`` would give 4) and 0.125 * 4 = 0.5 gives 1 (``round``: 0).
    A 1e-9 tolerance absorbs float error, so 0.58 * 25 (14.499999999999998 in floats) gives 15.
    """
    try:
        r = float(ratio)
    except (TypeError, ValueError):
        raise ShrinkError(f"removal ratio must be a number in [0, 1), got {ratio!r}") from None
    if math.isnan(r) or not 0.0 <= r < 1.0:
        raise ShrinkError(f"removal ratio must be in [0, 1), got {ratio!r}")
    if isinstance(depth, bool) or not isinstance(depth, int) or depth <= 0:
        raise ShrinkError(f"depth must be a positive integer, got {depth!r}")
    return min(depth, int(math.floor(r * depth + 0.5 + 1e-9)))


@dataclass
class SelectionResult:
    """The chosen layers (in selection order) and everything measured to choose them."""

    layers: list[int]
    criterion: str
    scores: dict[str, Any]
    forward_passes: int
    seconds: float
    k: int
    depth: int
    ratio: float | None = None
    greedy: bool = True
    seed: int = 0
    calib_images: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict (non-finite floats become the strings 'inf' / '-inf' / 'nan')."""
        return jsonable({
            "criterion": self.criterion,
            "layers": list(self.layers),
            "k": self.k,
            "depth": self.depth,
            "ratio": self.ratio,
            "greedy": self.greedy,
            "seed": self.seed,
            "calib_images": self.calib_images,
            "log_base": LOG_BASE,
            "forward_passes": self.forward_passes,
            "seconds": round(self.seconds, 3),
            "scores": self.scores,
            **self.extra,
        })


def _rank_key(scores: dict[int, float], te_abs: bool):
    def key(layer: int):
        s = scores[layer]
        if te_abs:
            s = abs(s)
        return (math.isnan(s), s, layer)  # NaN last, ties broken by the lower index
    return key


def _per_layer(stats: PassStats) -> dict[str, dict[int, float]]:
    return {
        "attn_entropy": stats.attn_entropy,
        "mlp_entropy": stats.mlp_entropy,
        "cosine": stats.cosine,
        "block_influence": stats.block_influence,
    }


def _resolve_amp(device: torch.device, amp_dtype: torch.dtype | None) -> torch.dtype | None:
    if amp_dtype is None:  # auto: bf16 (else fp16) on CUDA, full precision elsewhere
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return None
    if amp_dtype == torch.float32:
        return None
    return amp_dtype


def _is_te(name: str) -> bool:
    crit = CRITERION_REGISTRY.get(name)
    return crit is not None and crit.transfer_entropy


def _expected_passes(crit: Criterion, n: int, k: int, greedy: bool, measured: bool) -> int:
    if not measured:
        return 0
    base = 1
    if crit.transfer_entropy:
        extra = sum(n - s for s in range(k)) if greedy else n
        return base + extra + (0 if greedy or k == 0 else 1)
    if crit.scored:
        return base + (max(k - 1, 0) if greedy else 0) + (1 if k else 0)
    return base + (1 if k else 0)


def select_layers(
    model: nn.Module,
    loader: Iterable | None,
    ratio: float | None = None,
    k: int | None = None,
    criterion: str = "transfer_entropy",
    seed: int = 0,
    greedy: bool = True,
    device: str | torch.device | None = None,
    amp_dtype: torch.dtype | None = None,
    progress: bool = True,
    layers: Sequence[int] | None = None,
    te_abs: bool = False,
) -> SelectionResult:
    """Choose the attention layers to remove from ``model`` with ``criterion``.

    Give ``ratio`` (k = ``ratio_to_k(ratio, depth)``) or ``k``; ``manual`` takes ``layers``. The
    model is left as it was (weights, modes, device, no hooks). ``loader`` yields (images, labels)
    batches and may be None only for ``random`` / ``last`` / ``manual`` (then nothing is measured).
    ``amp_dtype`` None means bf16 autocast on CUDA and full precision on CPU; torch.float32 turns it off.
    """
    t0 = time.perf_counter()
    crit = get_criterion(criterion)
    depth = len(get_blocks(model))
    candidates = candidate_layers(model)
    k, layers = _resolve_k(model, loader, crit, criterion, depth, candidates, ratio, k, layers)
    chosen, scores, passes = _measure_and_select(model, loader, crit, criterion, candidates, k, greedy, seed,
                                                 te_abs, layers, device, amp_dtype, progress)
    seconds = time.perf_counter() - t0
    _logger.info("selected layers %s by %s (%d passes, %.1f s)", chosen, criterion, passes, seconds)
    return SelectionResult(
        layers=chosen, criterion=criterion, scores=scores, forward_passes=passes, seconds=seconds,
        k=k, depth=depth, ratio=None if ratio is None else float(ratio),
        greedy=greedy if crit.scored else False, seed=seed, calib_images=scores.get("calib_images", 0),
        extra={"te_mode": "abs" if te_abs else "signed"} if crit.transfer_entropy else {},
    )


def _resolve_k(model: nn.Module, loader: Iterable | None, crit: Criterion, criterion: str, depth: int,
               candidates: list[int], ratio: float | None, k: int | None,
               layers: Sequence[int] | None) -> tuple[int, list[int] | None]:
    """k (from ``ratio``, ``k`` or manual ``layers``, returned validated), checked for model and criterion."""
    if ratio is not None and k is not None:
        raise ShrinkError("give a removal ratio or a layer count k, not both")
    if ratio is not None:
        k = ratio_to_k(ratio, depth)
    if crit.takes_layers:
        if layers is None:
            raise ShrinkError(f"criterion {criterion!r} needs an explicit list of layers")
        layers = validate_layers(model, layers)
        if k is not None and k != len(layers):
            raise ShrinkError(f"ratio/k asks for {k} layers but {len(layers)} were given manually: {layers}")
        k = len(layers)
    elif layers is not None:
        manual = ", ".join(n for n in CRITERIA if get_criterion(n).takes_layers)
        raise ShrinkError(f"explicit layers are only used with criterion {manual!r}, not {criterion!r}")
    if k is None:
        raise ShrinkError("give a removal ratio or a layer count k")
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ShrinkError(f"layer count k must be a non-negative integer, got {k!r}")
    if k > len(candidates):
        raise ShrinkError(f"cannot remove {k} attention layers: the model has only {len(candidates)}")
    if loader is None and crit.scored:
        raise ShrinkError(f"criterion {criterion!r} needs calibration images (a loader)")
    check_model_api(model)
    return k, layers


def _home_and_target(model: nn.Module, device: str | torch.device | None) -> tuple[torch.device, torch.device]:
    """The device the model is on and the one to measure on (that one unless ``device`` is given)."""
    param = next(model.parameters(), None)
    home = param.device if param is not None else torch.device("cpu")
    return home, (torch.device(device) if device is not None else home)


def _measure_and_select(
    model: nn.Module, loader: Iterable | None, crit: Criterion, criterion: str, candidates: list[int], k: int,
    greedy: bool, seed: int, te_abs: bool, manual: list[int] | None,
    device: str | torch.device | None, amp_dtype: torch.dtype | None, progress: bool,
) -> tuple[list[int], dict[str, Any], int]:
    """Select on the target device in eval mode, then restore the model: (chosen, scores, passes)."""
    home, dev = _home_and_target(model, device)
    amp = _resolve_amp(dev, amp_dtype)
    modes = {m: m.training for m in model.modules()}
    measured = loader is not None
    total = _expected_passes(crit, len(candidates), k, greedy, measured)
    bar = tqdm(total=total, desc=f"select[{criterion}]", unit="pass", disable=not progress or total == 0)
    try:
        if dev != home:
            model.to(dev)
        model.eval()
        runner = Runner(model, loader, dev, amp) if measured else None
        if runner is not None:
            runner.bar = bar
        chosen, scores = _select(runner, crit, candidates, k, greedy, seed, te_abs, manual)
        if runner is not None and chosen and "te_of_selection" not in scores:
            scores["te_of_selection"] = scores["feature_entropy"] - runner.run(skip=chosen).feature_entropy
    finally:
        bar.close()
        for m, mode in modes.items():
            m.training = mode
        if dev != home:
            model.to(home)
    return chosen, scores, (runner.passes if runner is not None else 0)


def _select(
    runner: Runner | None,
    crit: Criterion,
    candidates: list[int],
    k: int,
    greedy: bool,
    seed: int,
    te_abs: bool,
    manual: list[int] | None,
) -> tuple[list[int], dict[str, Any]]:
    scores: dict[str, Any] = {}
    base: PassStats | None = None
    if runner is not None:
        base = runner.run(probe_layers=candidates)
        scores["feature_entropy"] = base.feature_entropy
        scores["calib_images"] = base.images
        scores["per_layer"] = _per_layer(base)
    if not crit.scored:
        return list(crit.fn(list(candidates), k, seed=seed, layers=manual)), scores
    assert runner is not None and base is not None
    h_full = base.feature_entropy

    def score_all(skipped: list[int], remaining: list[int], stats: PassStats | None) -> dict[int, float]:
        return crit.fn(Scoring(runner, h_full, stats), skipped, remaining)

    use_abs = te_abs and crit.transfer_entropy
    steps: list[dict[str, Any]] = []
    chosen: list[int] = []
    if not greedy:
        one = score_all([], list(candidates), base)
        chosen = sorted(candidates, key=_rank_key(one, use_abs))[:k]
        steps = [{"step": s, "layer": li, "score": one[li]} for s, li in enumerate(chosen)]
        scores["one_shot"] = one
    else:
        for s in range(k):
            remaining = [c for c in candidates if c not in chosen]
            step_scores = score_all(chosen, remaining, base if s == 0 else None)
            best = min(remaining, key=_rank_key(step_scores, use_abs))
            chosen.append(best)
            steps.append({"step": s, "layer": best, "score": step_scores[best], "candidates": step_scores})
            _logger.info("step %d: layer %d (%s = %.6g)", s, best, crit.name, step_scores[best])
        if crit.transfer_entropy and chosen:
            scores["te_of_selection"] = steps[-1]["score"]
    scores["steps"] = steps
    return chosen, scores


def transfer_entropy(
    model: nn.Module,
    loader: Iterable,
    layers: Sequence[int],
    device: str | torch.device | None = None,
    amp_dtype: torch.dtype | None = None,
) -> float:
    """``TE(S) = H(full) - H(attention of S skipped)`` of the head's input feature, in nats.

    Two honest passes even for the empty set (whose TE is then exactly 0: the passes are identical).
    """
    candidate_layers(model)
    check_model_api(model)
    layers = validate_layers(model, layers)
    _, dev = _home_and_target(model, device)
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        runner = Runner(model, loader, dev, _resolve_amp(dev, amp_dtype))
        return runner.run().feature_entropy - runner.run(skip=layers).feature_entropy
    finally:
        for m, mode in modes.items():
            m.training = mode


def layer_table(result: SelectionResult) -> str:
    """A plain-text per-layer table (entropies, cosine, block influence, step chosen) plus the steps."""
    per = result.scores.get("per_layer", {})
    order = {li: s for s, li in enumerate(result.layers)}
    rows = [f"{'layer':>5} {'H(attn)':>10} {'H(mlp)':>10} {'cosine':>10} {'BI':>10} {'chosen':>7}"]
    layers_seen = sorted({int(li) for d in per.values() for li in d} | set(result.layers))

    def fmt(d: dict, li: int) -> str:
        v = d.get(li, d.get(str(li)))
        return f"{v:>10.4g}" if isinstance(v, (int, float)) else f"{'-':>10}"

    for li in layers_seen:
        mark = f"#{order[li] + 1}" if li in order else ""
        rows.append(f"{li:>5} {fmt(per.get('attn_entropy', {}), li)} {fmt(per.get('mlp_entropy', {}), li)} "
                    f"{fmt(per.get('cosine', {}), li)} {fmt(per.get('block_influence', {}), li)} {mark:>7}")
    steps = result.scores.get("steps", [])
    if steps:
        label = "TE" if _is_te(result.criterion) else result.criterion
        rows.append("")
        rows.append(f"{'step':>5} {'layer':>5} {label + ' (nats)' if label == 'TE' else label:>14}")
        for st in steps:
            rows.append(f"{st['step'] + 1:>5} {st['layer']:>5} {st['score']:>14.6g}")
    extra = []
    if "feature_entropy" in result.scores:
        extra.append(f"H(full feature) = {result.scores['feature_entropy']:.6g} nats")
    if "te_of_selection" in result.scores:
        extra.append(f"TE(chosen set) = {result.scores['te_of_selection']:.6g} nats")
    rows.append("")
    rows.append(f"chosen ({result.criterion}, k={result.k} of {result.depth}): {result.layers}")
    rows.append(f"forward passes over the calibration set: {result.forward_passes} "
                f"({result.calib_images} images each), {result.seconds:.1f} s" + ("; " + "; ".join(extra) if extra else ""))
    return "\n".join(rows)


def plot_selection(result: SelectionResult, path) -> None:
    """Write a PNG: per-layer attention / MLP entropy with the chosen layers marked, and the step scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from shrink.io import atomic_write

    per = result.scores.get("per_layer", {})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ax = axes[0]
    for key, label in (("attn_entropy", "attention output"), ("mlp_entropy", "MLP output")):
        d = {int(li): v for li, v in per.get(key, {}).items() if isinstance(v, (int, float)) and math.isfinite(v)}
        if d:
            xs = sorted(d)
            ax.plot(xs, [d[x] for x in xs], marker="o", label=label)
    for s, li in enumerate(result.layers):
        ax.axvline(li, color="grey", alpha=0.3)
        ax.annotate(str(s + 1), (li, 1.0), xycoords=("data", "axes fraction"), ha="center", va="bottom", fontsize=8)
    ax.set_xlabel("block")
    ax.set_ylabel("entropy, sum log std (nats)")
    ax.set_title("per-layer entropy (numbers on top: selection order)", fontsize=9, pad=14)
    ax.legend(fontsize=8)
    ax = axes[1]
    steps = result.scores.get("steps", [])
    if steps:
        ax.plot([s["step"] + 1 for s in steps], [s["score"] for s in steps], marker="o")
        for s in steps:
            ax.annotate(str(s["layer"]), (s["step"] + 1, s["score"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("TE of chosen set (nats)" if _is_te(result.criterion) else result.criterion)
    else:
        ax.text(0.5, 0.5, f"criterion {result.criterion}: no scores", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(f"{result.criterion}: chosen {result.layers}", fontsize=9, pad=14)
    fig.tight_layout()
    try:
        atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110))
    finally:
        plt.close(fig)
