"""What a run leaves for people to read: metrics.jsonl rows and the metrics.png plot."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .io import atomic_write


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl (one per completed epoch)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_metrics(rows: list[dict[str, Any]], path: Path) -> None:
    """PNG of lambda, train loss and both accuracies per epoch."""
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(ep, [r["lambda"] if r.get("lambda") is not None else float("nan") for r in rows], color="C3")
    axes[0].set(title="lambda", xlabel="epoch", ylim=(-0.05, 1.05))
    axes[1].plot(ep, [r["train_loss"] for r in rows], color="C0")
    axes[1].set(title="train loss", xlabel="epoch")
    ev = [r for r in rows if "acc" in r]
    axes[2].plot([r["epoch"] for r in ev], [r["acc"] for r in ev], label="acc @ current lambda")
    axes[2].plot([r["epoch"] for r in ev], [r["acc_deploy"] for r in ev], label="acc deployable (lambda=0)")
    if any("ema_acc_deploy" in r for r in ev):
        axes[2].plot([r["epoch"] for r in ev], [r.get("ema_acc_deploy") for r in ev], label="EMA deployable")
    axes[2].set(title="val top-1 (%)", xlabel="epoch")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)
