"""shrink.report: metrics.jsonl rows and the metrics.png plot."""
from __future__ import annotations

import json

from shrink.report import plot_metrics, read_metrics

ROWS = [{"epoch": 0, "lambda": 1.0, "train_loss": 2.0, "acc": 50.0, "acc_deploy": 40.0},
        {"epoch": 1, "lambda": 0.0, "train_loss": 1.5, "acc": 60.0, "acc_deploy": 60.0, "ema_acc_deploy": 61.0}]


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
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.png"]  # no temporary file left
