"""Train one tiny model of each given block family through the lambda = 0 switch, in one process
(imports paid once): ``python tests/train_families_main.py OUT KEY [KEY ...]``. Used by test_blocks."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _families import CASES, build  # noqa: E402

import main_lambda  # noqa: E402
import shrink  # noqa: E402


def main(out: Path, keys: list[str]) -> int:
    for key in keys:
        name, _, size, _ = CASES[key]
        dense = out / key / "dense"
        shrink.save(build(key, num_classes=4), dense)
        rc = main_lambda.main([
            "--model", name, "--finetune", str(dense), "--data-set", "synthetic", "--synthetic-images", "16",
            "--num-classes", "4", "--input-size", str(size), "--remove-layers", "0,2", "--epochs", "2",
            "--dilution-epochs", "1", "--warmup-epochs", "0", "--batch-size", "8", "--num-workers", "0",
            "--mixup", "0", "--cutmix", "0", "--aa", "none", "--reprob", "0", "--no-progress",
            "--output-dir", str(out / key / "run")])
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), sys.argv[2:]))
