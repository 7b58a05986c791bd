"""shrink.training.metrics: metrics.jsonl rows and the metrics.png plot."""
from __future__ import annotations

import json

from matplotlib.lines import Line2D

from shrink.training.metrics import (
    BEST_LABEL,
    DENSE_LABEL,
    SWITCH_LABEL,
    best_deployable,
    metrics_figure,
    plot_metrics,
    read_metrics,
    switch_epoch,
)

ROWS = [{"epoch": 0, "lambda": 1.0, "train_loss": 2.0, "acc": 50.0, "acc_deploy": 40.0},
        {"epoch": 1, "lambda": 0.0, "train_loss": 1.5, "acc": 60.0, "acc_deploy": 60.0, "ema_acc_deploy": 61.0}]

# a run of 6 epochs: lambda reaches 0 in epoch 3, the best deployable model is epoch 4's
RUN = [{"epoch": e, "lambda": max(0.0, 1 - e / 3), "lr": 1e-3, "train_loss": 2.0 - 0.2 * e, "train_acc": 50.0 + e,
        "acc": 90.0 - e, "acc_deploy": [40.0, 60.0, 75.0, 85.0, 88.5, 88.0][e], "seconds": 1.0} for e in range(6)]
SUMMARY = {"model": "vit_digits", "removed_layers": [8, 6, 10], "dense_acc": 95.83, "best_epoch": 4,
           "deploy_acc_best": 88.5}


def test_read_metrics_skips_blank_lines_and_a_missing_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert read_metrics(path) == []
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1]) + "\n")
    assert read_metrics(path) == ROWS


def test_plot_writes_a_png_and_nothing_without_rows(tmp_path):
    plot_metrics([], tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()
    plot_metrics(ROWS, tmp_path / "metrics.png")
    assert (tmp_path / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plot_metrics(RUN, tmp_path / "metrics.png", SUMMARY)  # replaces it
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.png"]  # no temporary file left


def _labelled(ax, label: str) -> list[Line2D]:
    return [ln for ln in ax.get_lines() if ln.get_label().startswith(label)]


def test_the_plot_marks_dense_accuracy_best_epoch_and_the_switch():
    fig = metrics_figure(RUN, SUMMARY)
    lam_ax, loss_ax, acc_ax = fig.axes
    # titles and axis labels with their units on every panel
    for ax in fig.axes:
        assert ax.get_title() and ax.get_xlabel() == "epoch" and ax.get_ylabel()
        assert all(float(t).is_integer() for t in ax.get_xticks())  # whole epochs
    assert "%" in acc_ax.get_ylabel() and "λ" in lam_ax.get_ylabel() and "loss" in loss_ax.get_ylabel()
    assert "vit_digits" in fig._suptitle.get_text() and "8,6,10" in fig._suptitle.get_text()
    # the dense model's accuracy: a horizontal line across the accuracy panel
    (dense,) = _labelled(acc_ax, DENSE_LABEL)
    assert list(dense.get_ydata()) == [95.83, 95.83] and "95.83%" in dense.get_label()
    # the best deployable epoch: one marker at (best_epoch, deploy_acc_best)
    (best,) = _labelled(acc_ax, BEST_LABEL)
    assert list(best.get_xdata()) == [4] and list(best.get_ydata()) == [88.5] and best.get_marker() == "*"
    assert best.get_label().endswith("(epoch 4)")
    ema = metrics_figure(RUN, {**SUMMARY, "best_source": "ema"}).axes[2]
    assert _labelled(ema, BEST_LABEL)[0].get_label().endswith("(epoch 4, EMA)")
    # the switch to lambda = 0: a vertical line at epoch 3 on every panel
    for ax in fig.axes:
        (switch,) = _labelled(ax, SWITCH_LABEL)
        assert list(switch.get_xdata()) == [3, 3]
        assert any(t.get_text().startswith(SWITCH_LABEL) for t in ax.get_legend().get_texts())
    assert [t.get_text() for t in acc_ax.get_legend().get_texts()][:3] == [
        "at the current λ", "deployable (λ = 0)", "train (augmented batches)"]
    (train,) = _labelled(acc_ax, "train (")
    assert list(train.get_ydata()) == [50.0 + e for e in range(6)]


def test_without_a_summary_the_best_epoch_comes_from_the_rows_and_no_dense_line():
    assert best_deployable(ROWS) == (1, 61.0)  # the EMA's deployable accuracy counts, as for best/
    assert switch_epoch(ROWS) == 1 and switch_epoch(RUN) == 3
    fig = metrics_figure(ROWS)
    acc_ax = fig.axes[2]
    assert not _labelled(acc_ax, DENSE_LABEL) and fig._suptitle is None
    (best,) = _labelled(acc_ax, BEST_LABEL)
    assert (list(best.get_xdata()), list(best.get_ydata())) == ([1], [61.0])
    assert _labelled(acc_ax, "EMA deployable")


def test_a_run_without_removal_has_no_switch_marker():
    rows = [{"epoch": e, "lambda": None, "train_loss": 1.0, "acc": 90.0 + e, "acc_deploy": 90.0 + e} for e in range(3)]
    fig = metrics_figure(rows, {"dense_acc": 89.0, "best_epoch": 2, "deploy_acc_best": 92.0, "removed_layers": []})
    assert switch_epoch(rows) is None
    assert not any(_labelled(ax, SWITCH_LABEL) for ax in fig.axes)
    assert _labelled(fig.axes[2], DENSE_LABEL) and _labelled(fig.axes[2], BEST_LABEL)
