"""Run ``main_lambda.py`` and die (like SIGKILL: no clean-up, no finally) at the K-th rename.

    python tests/die_at_main.py K [main_lambda.py flags ...]

Every atomic write of the toolkit ends in ``os.replace`` (a file, or the two renames that swap a
directory), so the K-th call of it is a precise "worst moment": half of a directory swap done, a
finished temporary file not yet in place, ... With K = 0 nothing dies and the number of renames
is printed on stderr as ``renames: N``; with K = -1 the process dies when layer selection starts.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    k, argv = int(sys.argv[1]), sys.argv[2:]
    import main_lambda
    import shrink.io
    import shrink.training.run_folder

    real = os.replace
    calls = {"n": 0}

    def replace(src, dst):
        calls["n"] += 1
        if calls["n"] == k:
            os._exit(137)
        return real(src, dst)

    class _Os:  # os with a deadly replace, for the two modules that rename
        def __getattr__(self, name):
            return replace if name == "replace" else getattr(os, name)

    shrink.io.os = _Os()
    shrink.training.run_folder.os = _Os()
    if k == -1:
        import shrink.selection.layers

        shrink.selection.layers.select_layers = lambda *a, **kw: os._exit(137)
    code = main_lambda.main(argv)
    print(f"renames: {calls['n']}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
