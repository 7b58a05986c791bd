"""torch.compile with inductor (the default backend) of a merged model of every family: equal to
eager and no recompilation for a second batch of the same shape.

CI checks the same cases with the ``aot_eager`` backend (tests/merging/test_tome_families.py::COMPILED: no
C++ build); inductor's code generation costs tens of seconds a model on a CPU, so it runs here:

    python scripts/tome_compile_check.py            # every case, r = 2, policy hidden
    python scripts/tome_compile_check.py --cases dinov3-rope,beit

Exits 1 when a case differs by more than --tol or recompiles; prints one line per case.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.test_tome_families import COMPILED  # noqa: E402

import shrink  # noqa: E402
from tests._families import build, images  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default=",".join(COMPILED), help="tests/_families.py keys, comma-separated")
    p.add_argument("--r", type=int, default=2, help="tokens merged per block")
    p.add_argument("--tol", type=float, default=1e-5, help="largest allowed |compiled - eager|")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from torch._dynamo.utils import counters

    failed = 0
    for key in [k.strip() for k in args.cases.split(",") if k.strip()]:
        torch._dynamo.reset()
        counters.clear()
        model = build(key)
        if key == "cait":
            model.reset_classifier(5, "avg")
        shrink.apply_tome(model, args.r, policy="hidden")
        compiled = torch.compile(model)
        x1, x2 = images(key, seed=1), images(key, seed=2)
        t0 = time.perf_counter()
        with torch.no_grad():
            d1 = float((compiled(x1) - model(x1)).abs().max())
            graphs = counters["stats"]["unique_graphs"]
            d2 = float((compiled(x2) - model(x2)).abs().max())
            again = counters["stats"]["unique_graphs"] - graphs
        ok = max(d1, d2) <= args.tol and again == 0
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {key:24s} max |compiled - eager| {max(d1, d2):.1e}  graphs {graphs}, "
              f"new graphs for a second batch {again}  ({time.perf_counter() - t0:.0f} s)", flush=True)
    torch._dynamo.reset()
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
