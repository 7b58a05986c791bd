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
    from shrink.training.trainer import Trainer

    report = {"model_checks": 0, "input_checks": 0, "loss_checks": 0, "teacher_checks": 0, "ema_checks": 0,
              "augment_seed": None, "lambdas": []}

    class Checked(Trainer):
        """The Trainer's seams: the loss, each epoch, each step of the lambda schedule."""

        def check_parts(self):
            parts = self.parts
            check_on_device("model", parts.raw)
            report["model_checks"] += 1
            if parts.ema is not None:
                check_on_device("EMA", parts.ema.module)
                report["ema_checks"] += 1
            if parts.teacher is not None:
                check_on_device("teacher", parts.teacher)

        def build_loss(self, mixup_active):
            loss_fn = super().build_loss(mixup_active)

            def checked_loss(logits, targets):
                check_on_device("loss inputs", (logits, targets))
                report["loss_checks"] += 1
                return loss_fn(logits, targets)
            return checked_loss

        def train_epoch(self, epoch):
            def on_input(module, args):
                check_on_device("model input", args)
                report["input_checks"] += 1

            def on_teacher_input(module, args):
                check_on_device("teacher input", args)
                report["teacher_checks"] += 1

            if report["augment_seed"] is None:
                report["augment_seed"] = torch.initial_seed()
            self.check_parts()
            hooks = [self.parts.raw.register_forward_pre_hook(on_input)]
            if self.parts.teacher is not None:
                hooks.append(self.parts.teacher.register_forward_pre_hook(on_teacher_input))
            try:
                return super().train_epoch(epoch)
            finally:
                for h in hooks:
                    h.remove()

        def dilution_step(self, epoch, update):
            lam = super().dilution_step(epoch, update)
            report["lambdas"].append(lam)
            self.check_parts()  # after a switch too (the model is exported in place: the same module)
            return lam

    with FakeDevice():
        code = main_lambda.main(argv, trainer=Checked)
    rank = int(os.environ.get("RANK", "0"))
    Path(f"{prefix}.{rank}.json").write_text(json.dumps(report))
    return code


if __name__ == "__main__":
    sys.exit(main())
