"""Run ``main_lambda.py`` and die (like SIGKILL: no clean-up) at the N-th rename onto a given name.

    python tests/die_at_rename.py NAME N [main_lambda.py flags ...]

Like ``die_at_main.py``, but the moment is named by what is being renamed (``.best.old``: a ``best/``
swap half done; ``.last.old``: a ``last/`` swap half done), so it does not shift when another write is
added to the run. Only the process that renames (the main one) dies; under a multi-process launch the
launcher then stops the others.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    name, n, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    import main_lambda
    import shrink.io
    import shrink.training.run_folder

    real = os.replace
    seen = {"n": 0}

    def replace(src, dst):
        if Path(dst).name == name:
            seen["n"] += 1
            if seen["n"] == n:
                os._exit(137)
        return real(src, dst)

    class _Os:  # os with a deadly replace, for the two modules that rename
        def __getattr__(self, attr):
            return replace if attr == "replace" else getattr(os, attr)

    shrink.io.os = _Os()
    shrink.training.run_folder.os = _Os()
    return main_lambda.main(argv)


if __name__ == "__main__":
    sys.exit(main())
