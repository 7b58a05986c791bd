#!/usr/bin/env python
"""Re-create the dense starting checkpoint of the embedded default.

Trains ``vit_digits`` from scratch on the digits train split (seeded) and writes its weights to
``models/weights/vit_digits_dense.safetensors`` (what ``pretrained=True`` loads). About two
minutes on a 2-core CPU:

    python scripts/make_dense_digits.py [--epochs 100] [--out models/weights/vit_digits_dense.safetensors]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from safetensors.torch import load_file, save_file

from shrink.cli.runner import OneLineArgumentParser, add_threads_argument, check_output_file, cli_main
from shrink.io import atomic_write
from shrink.models.vit_digits import DENSE_WEIGHTS
from shrink.training.config import RunConfig
from shrink.training.trainer import run


def main(argv: list[str] | None = None) -> int:
    return cli_main(_main, argv)


def _main(argv: list[str] | None) -> int:
    p = OneLineArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(DENSE_WEIGHTS))
    add_threads_argument(p)
    args = p.parse_args(argv)
    check_output_file(args.out, "--out", suffixes=(".safetensors",))
    with tempfile.TemporaryDirectory() as tmp:
        cfg = RunConfig(model="vit_digits", pretrained=False, remove_ratio=0.0, epochs=args.epochs, lr=args.lr,
                        warmup_epochs=5, mixup=0.0, cutmix=0.0, smoothing=0.1, seed=args.seed,
                        output_dir=str(Path(tmp) / "run"), threads=args.threads).validate()
        summary = run(cfg)
        state = load_file(str(Path(tmp) / "run" / "best" / "model.safetensors"))
    atomic_write(args.out, lambda path: save_file(state, str(path), metadata={"format": "pt"}))
    print(f"dense vit_digits: best val top-1 {summary['deploy_acc_best']:.2f}% (epoch {summary['best_epoch']}) "
          f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
