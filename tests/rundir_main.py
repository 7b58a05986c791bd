"""One process of a multi-machine launch that checks its output folder (shrink.training.run_folder.check_shared_output_dir).

    torchrun --nnodes 2 --nproc_per_node 1 --node_rank R ... tests/rundir_main.py OUT

Rank 0 creates OUT (as a run's main process does) and every process takes part in the check. Exit 0
when every process sees OUT; else the check's one line on stderr and exit 2. tests/training/test_rundir.py
starts two such "machines" in different working folders, so that a relative OUT is a different folder
on each, as on machines that do not share a file system.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from accelerate import Accelerator  # noqa: E402

from shrink.errors import ShrinkError  # noqa: E402
from shrink.training.run_folder import check_shared_output_dir  # noqa: E402


def main() -> int:
    out = Path(sys.argv[1])
    accelerator = Accelerator(cpu=True)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    try:
        check_shared_output_dir(out, accelerator)
    except ShrinkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        accelerator.wait_for_everyone()
        accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(main())
