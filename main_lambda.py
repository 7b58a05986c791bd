#!/usr/bin/env python
"""Prune attention layers of a ViT by lambda dilution (thin CLI over shrink.training.trainer.run).

    accelerate launch main_lambda.py --remove-ratio 0.4            # the embedded default, offline
    accelerate launch main_lambda.py --config configs/deit_base_40.yaml --data-path /imagenet
    python main_lambda.py --eval --checkpoint out/run/best --tome-r 8
"""
from __future__ import annotations

import logging
import sys

from shrink.cli.runner import cli_main


def _table(summary: dict) -> str:
    if summary["kind"] == "eval":
        rows = [("checkpoint", summary["checkpoint"]), ("parameters", f"{summary['params']:,}"),
                ("attention-free blocks", summary["attention_free_blocks"]), ("val images", summary.get("images", "-")),
                ("top-1 (%)", f"{summary['acc']:.2f}")]
        if "acc_tome" in summary:
            t = summary["tome"]
            rows += [(f"top-1 with ToMe {_tome_name(t)}", f"{summary['acc_tome']:.2f}"),
                     ("tokens after each block", summary["tokens_per_block"])]
    else:
        def pct(v):
            return "-" if v is None else f"{v:.2f}"
        rows = [("model", summary["model"]), ("removed layers", summary["removed_layers"] or "none"),
                ("criterion", summary["criterion"] or "-"),
                ("dense top-1 (%)", pct(summary["dense_acc"])),
                ("deployable top-1 at start (%)", pct(summary["deploy_acc_start"])),
                ("best deployable top-1 (%)", f"{pct(summary['deploy_acc_best'])} (epoch {summary['best_epoch']}, "
                                              f"{summary['best_source']})"),
                ("best reloaded from disk (%)", pct(summary["best_acc_reloaded"])),
                ("parameters dense -> deployable", f"{summary['params_dense']:,} -> "
                                                   f"{(summary['params_deploy'] or 0):,}"),
                *_tome_rows(summary, pct),
                ("training time (s)", summary["seconds_training"]),
                ("best model", summary["paths"]["best"]), ("summary", summary["paths"]["summary"])]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _tome_name(t: dict) -> str:
    ramp = f" inflection={t['inflection']:g}" if t.get("inflection") else ""
    return f"r={t['r']}{ramp} start_idx={t['start_idx']} ({t['policy']})"


def _tome_rows(summary: dict, pct) -> list[tuple[str, object]]:
    t = summary.get("tome")
    if not t:
        return []
    how = "in training and every evaluation" if t["train"] else "evaluation only"
    return [(f"token merging ({how})", _tome_name(t)), ("tokens after each block", summary["tokens_per_block"]),
            ("best with / without ToMe (%)", f"{pct(summary.get('best_acc_with_tome'))} / "
                                             f"{pct(summary.get('best_acc_without_tome'))}")]


def main(argv: list[str] | None = None, *, trainer=None) -> int:
    """The command line; ``trainer``: a subclass of :class:`shrink.training.trainer.Trainer` to run instead
    (its seams: see that class)."""
    from shrink.cli.run_flags import config_from_args
    from shrink.training.trainer import run

    def body(argv):
        cfg = config_from_args(argv, description=__doc__)
        summary = run(cfg, trainer=trainer)
        from accelerate import PartialState

        if PartialState().is_main_process:
            print(_table(summary))
        return 0

    return cli_main(body, argv)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())
