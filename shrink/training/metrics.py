"""What a run leaves for people to read: metrics.jsonl rows and the metrics.png plot."""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from shrink.io import atomic_write

# labels of the reference artists of the plot (tests find them by these)
DENSE_LABEL = "dense model"
BEST_LABEL = "best deployable"
SWITCH_LABEL = "λ = 0: attention removed"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl (one per completed epoch)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def switch_epoch(rows: list[dict[str, Any]]) -> int | None:
    """The first epoch that ended with lambda = 0 (the run switched to the attention-free model in it);
    None without dilution or before the switch."""
    for r in rows:
        if _number(r.get("lambda")) == 0.0:
            return int(r["epoch"])
    return None


def best_deployable(rows: list[dict[str, Any]]) -> tuple[int, float] | None:
    """(epoch, top-1) of the best deployable evaluation in ``rows`` (model or EMA; the first of ties),
    as the run chooses ``best/``."""
    best: tuple[int, float] | None = None
    for r in rows:
        for key in ("acc_deploy", "ema_acc_deploy"):
            acc = _number(r.get(key))
            if acc is not None and (best is None or acc > best[1]):
                best = (int(r["epoch"]), acc)
    return best


def _y(v: Any) -> float:
    n = _number(v)
    return float("nan") if n is None else n


def metrics_figure(rows: list[dict[str, Any]], summary: Mapping[str, Any] | None = None):
    """The figure of metrics.png: lambda, train loss and top-1 (validation; train where recorded) per epoch.

    With ``summary`` (the run's summary.json) the accuracy panel also gets the dense model's accuracy
    as a horizontal line (``dense_acc``) and the best deployable epoch from ``best_epoch`` /
    ``deploy_acc_best``; without it the best epoch is found in ``rows``. The epoch where lambda
    reached 0 is marked on every panel.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    summary = summary or {}
    fig = Figure(figsize=(14, 4.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    ep = [r["epoch"] for r in rows]

    axes[0].plot(ep, [_y(r.get("lambda")) for r in rows], color="C3", marker=".", label="λ at the epoch's end")
    axes[0].set(title="dilution strength λ", xlabel="epoch", ylabel="λ (1 = dense, 0 = attention gone)",
                ylim=(-0.05, 1.05))
    axes[1].plot(ep, [_y(r.get("train_loss")) for r in rows], color="C0",
                 marker=".", label="train loss")
    axes[1].set(title="training loss (mean over the epoch)", xlabel="epoch", ylabel="loss (cross-entropy)")

    ax = axes[2]
    ev = [r for r in rows if _number(r.get("acc")) is not None]
    ax.plot([r["epoch"] for r in ev], [r["acc"] for r in ev], marker=".", label="at the current λ")
    ax.plot([r["epoch"] for r in ev], [_y(r.get("acc_deploy")) for r in ev],
            marker=".", label="deployable (λ = 0)")
    if any("ema_acc_deploy" in r for r in ev):
        ax.plot([r["epoch"] for r in ev], [_y(r.get("ema_acc_deploy")) for r in ev], marker=".",
                label="EMA deployable (λ = 0)")
    train = [r for r in rows if _number(r.get("train_acc")) is not None]
    if train:
        ax.plot([r["epoch"] for r in train], [r["train_acc"] for r in train], color="0.6", linestyle="-.",
                linewidth=1, label="train (augmented batches)")
    dense = _number(summary.get("dense_acc"))
    if dense is not None:
        ax.axhline(dense, color="0.35", linestyle="--", linewidth=1.2, label=f"{DENSE_LABEL}: {dense:.2f}%")
    best = None
    if _number(summary.get("best_epoch")) is not None and summary["best_epoch"] >= 0 \
            and _number(summary.get("deploy_acc_best")) is not None:
        best = (int(summary["best_epoch"]), float(summary["deploy_acc_best"]))
    else:
        best = best_deployable(rows)
    if best is not None:
        ax.plot([best[0]], [best[1]], linestyle="none", marker="*", markersize=14, color="gold",
                markeredgecolor="black", zorder=5, label=f"{BEST_LABEL}: {best[1]:.2f}% (epoch {best[0]}{', EMA' if summary.get('best_source') == 'ema' else ''})")
    ax.set(title="top-1 accuracy (validation unless noted)", xlabel="epoch", ylabel="top-1 accuracy (%)")

    switch = switch_epoch(rows)
    for a in axes:
        if switch is not None:
            a.axvline(switch, color="C4", linestyle=":", linewidth=1.8, label=f"{SWITCH_LABEL} (epoch {switch})")
        a.xaxis.set_major_locator(MaxNLocator(integer=True))
        a.grid(alpha=0.3)
    for a in axes:
        a.legend(fontsize=7, loc="best")
    head = [str(summary["model"])] if summary.get("model") else []
    if summary.get("removed_layers"):
        head.append("attention removed in blocks " + ",".join(map(str, summary["removed_layers"])))
    if head:
        fig.suptitle(" · ".join(head), fontsize=10)
    fig.tight_layout()
    return fig


def plot_metrics(rows: list[dict[str, Any]], path: Path, summary: Mapping[str, Any] | None = None) -> None:
    """Write :func:`metrics_figure` as a PNG at ``path`` (atomically); nothing without rows."""
    if not rows:
        return
    fig = metrics_figure(rows, summary)
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110))
