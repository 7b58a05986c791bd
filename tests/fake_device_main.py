"""Run ``main_lambda.py`` under :class:`fake_device.FakeDevice` (alone or under ``accelerate launch``).

    python tests/fake_device_main.py REPORT_PREFIX [main_lambda.py flags ...]

Besides the fake device's own rule (no op may mix host and device tensors), every epoch checks
that the model, the EMA and the teacher live on the device, and every step that the tensors
reaching the model, the loss and the teacher do. Each process writes ``REPORT_PREFIX.<rank>.json``:
how many checks ran, the seed its augmentations drew from, and the lambda of each update.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

from fake_device import FakeDevice, check_on_device  # noqa: E402


def main() -> int:
    prefix, argv = sys.argv[1], sys.argv[2:]
    import torch

    import main_lambda
    import shrink.training.trainer as train

    report = {"model_checks": 0, "input_checks": 0, "loss_checks": 0, "teacher_checks": 0, "ema_checks": 0,
              "augment_seed": None, "lambdas": []}
    original = train.train_one_epoch

    def checked_epoch(parts, loader, accelerator, **kw):
        def check_parts():
            check_on_device("model", parts.raw)
            report["model_checks"] += 1
            if parts.ema is not None:
                check_on_device("EMA", parts.ema.module)
                report["ema_checks"] += 1
            if parts.teacher is not None:
                check_on_device("teacher", parts.teacher)

        def on_input(module, args):
            check_on_device("model input", args)
            report["input_checks"] += 1

        def on_teacher_input(module, args):
            check_on_device("teacher input", args)
            report["teacher_checks"] += 1

        loss_fn = parts.loss_fn

        def checked_loss(logits, targets):
            check_on_device("loss inputs", (logits, targets))
            report["loss_checks"] += 1
            return loss_fn(logits, targets)

        if report["augment_seed"] is None:
            report["augment_seed"] = torch.initial_seed()
        before = kw.get("before_step")

        def before_step(update):
            lam = before(update)
            report["lambdas"].append(lam)
            check_parts()  # after a switch too (the model is exported in place: the same module)
            return lam

        check_parts()
        parts.loss_fn = checked_loss
        hooks = [parts.raw.register_forward_pre_hook(on_input)]
        if parts.teacher is not None:
            hooks.append(parts.teacher.register_forward_pre_hook(on_teacher_input))
        try:
            return original(parts, loader, accelerator, **{**kw, "before_step": before_step if before else None})
        finally:
            parts.loss_fn = loss_fn
            for h in hooks:
                h.remove()

    train.train_one_epoch = checked_epoch
    with FakeDevice():
        code = main_lambda.main(argv)
    rank = int(os.environ.get("RANK", "0"))
    Path(f"{prefix}.{rank}.json").write_text(json.dumps(report))
    return code


if __name__ == "__main__":
    sys.exit(main())
