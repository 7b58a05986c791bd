"""How well the cost model's calibration predicts whole models: one common factor vs per-kind coefficients.

Builds the cost table of a model (without its own calibration), measures 16 plans as whole models
(interleaved, in one process, ``--passes`` times), and reports for each way of calibrating how far
the predicted speed-ups are from the measured ones:

- ``sum``: the raw table sum (every coefficient 1);
- ``common``: one factor (the dense model's measured / summed ratio): speed-ups are the sums' ratios;
- ``per-kind (4 plans)``: :func:`shrink.plan.cost.fit_coefficients` on the four plans
  ``build_cost_table`` fits on (the other 12 are not seen by the fit).

``--allocator default`` measures with glibc's malloc as it is (``steady``, the default, is what
``benchmark.py`` and the cost model use); the spread between passes shows what the allocator's history
does to timings.

    python scripts/cost_fit_check.py --out out/cost_fit_check                       # deit_small, eager
    python scripts/cost_fit_check.py --runtime onnxruntime --passes 1 --out out/cost_fit_check_ort
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shrink.bench.measure import ALLOCATORS, set_allocator  # noqa: E402
from shrink.cli.runner import add_threads_argument, cli_main  # noqa: E402
from shrink.errors import ShrinkError  # noqa: E402
from shrink.io import atomic_write_json, atomic_write_text  # noqa: E402
from shrink.modelio.create import create_model  # noqa: E402
from shrink.plan.candidate import Candidate  # noqa: E402
from shrink.plan.cost import (  # noqa: E402
    RUNTIMES,
    build_cost_table,
    cost_key_for,
    default_validation,
    fit_coefficients,
    measure_models,
)


def plans(depth: int, fit: list[Candidate]) -> list[Candidate]:
    """The fit plans first, then 12 more: removals, merging, both, policy hidden."""
    third, half = depth // 3, depth // 2
    more = [Candidate(removed=tuple(range(half))), Candidate(removed=tuple(range(depth - 2))),
            Candidate(tome_r=4), Candidate(tome_r=13), Candidate(tome_r=16),
            Candidate(removed=tuple(range(5 * depth // 12)), tome_r=4),
            Candidate(removed=tuple(range(2 * depth // 3)), tome_r=8),
            Candidate(removed=tuple(range(half)), tome_r=8, tome_policy="hidden"),
            Candidate(removed=tuple(range(depth // 4)), tome_r=16), Candidate(removed=tuple(range(depth - 2)), tome_r=13),
            Candidate(removed=tuple(range(third // 2)), tome_r=20), Candidate(removed=tuple(range(3 * depth // 4)), tome_r=4)]
    out = list(fit)
    for c in more:
        if c not in out:
            out.append(c)
    return out


def errors(pred: list[float], meas: list[float]) -> list[float]:
    """Relative error of each predicted speed-up (plan 0 = dense)."""
    return [(pred[0] / p) / (meas[0] / m) - 1.0 for p, m in zip(pred, meas, strict=True)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--img-size", type=int)
    p.add_argument("--batch-size", type=int, default=16)
    add_threads_argument(p, default=2)  # the acceptance setting
    p.add_argument("--runtime", default="eager", choices=RUNTIMES)
    p.add_argument("--allocator", default="steady", choices=ALLOCATORS)
    p.add_argument("--passes", type=int, default=2, help="interleaved passes over the 16 whole models")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default="out/cost_fit_check")
    args = p.parse_args(argv)
    if args.passes < 1 or args.repeats < 1:
        raise ShrinkError("--passes and --repeats must be >= 1")
    allocator = set_allocator(args.allocator)  # before the key: the key would otherwise set it to steady
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    kwargs = {"img_size": args.img_size} if args.img_size else {}
    model = create_model(args.model, **kwargs).eval()
    load_before = os.getloadavg()
    key = cost_key_for(model, args.model, device="cpu", dtype="fp32", batch_size=args.batch_size, threads=args.threads,
                       runtime=args.runtime, img_size=args.img_size)
    t0 = time.perf_counter()
    table = build_cost_table(model, key, validate=([], []), repeats=args.repeats, progress=False)
    build_s = time.perf_counter() - t0
    fit, _ = default_validation(key)
    cands = plans(key.depth, fit)
    passes = [measure_models(model, key, cands, repeats=args.repeats, progress=False) for _ in range(args.passes)]
    meas = [statistics.median(v) for v in zip(*passes, strict=True)]
    sums = [table.kind_sums(c) for c in cands]
    total = [sum(s.values()) for s in sums]
    coef = fit_coefficients(sums[:len(fit)], meas[:len(fit)])
    per_kind = [sum(coef[k] * v for k, v in s.items()) for s in sums]
    ways = {"sum / common factor": errors(total, meas), "per-kind (4 plans)": errors(per_kind, meas)}
    spread = [max(v) / min(v) - 1.0 for v in zip(*passes, strict=True)] if args.passes > 1 else None
    sp_spread = ([max(sp) / min(sp) - 1.0 for sp in zip(*[[ps[0] / m for m in ps] for ps in passes], strict=True)]
                 if args.passes > 1 else None)
    rows = [{"candidate": c.as_dict(), "fit": i < len(fit), "sum_ms": total[i], "per_kind_ms": per_kind[i],
             "measured_ms": meas[i], "passes_ms": [ps[i] for ps in passes], "measured_speedup": meas[0] / meas[i],
             **{w: e[i] for w, e in ways.items()}} for i, c in enumerate(cands)]
    res = {"model": args.model, "cpu": key.versions.get("cpu"), "runtime": args.runtime, "batch_size": args.batch_size, "threads": args.threads,
           "allocator": allocator, "load_average_before": load_before, "load_average_after": os.getloadavg(),
           "table_build_s": round(build_s, 1), "coef": coef, "rows": rows,
           "max_abs_error": {w: max(abs(x) for x in e) for w, e in ways.items()},
           "max_abs_error_unseen": {w: max(abs(x) for x in e[len(fit):]) for w, e in ways.items()},
           "pass_spread_ms": None if spread is None else max(spread),
           "pass_spread_speedup": None if sp_spread is None else max(sp_spread),
           "command": " ".join(["python", "scripts/cost_fit_check.py", *(argv if argv is not None else sys.argv[1:])])}
    atomic_write_json(out / "results.json", res)
    text = markdown(res)
    atomic_write_text(out / "table.md", text)
    sys.stdout.write(text)
    return 0


def markdown(res: dict) -> str:
    lines = [f"{res['model']} on {res['cpu']}, {res['runtime']}, batch {res['batch_size']}, {res['threads']} threads, allocator "
             f"{res['allocator']}; load {res['load_average_before'][0]:.2f} -> {res['load_average_after'][0]:.2f}", "",
             "| plan (removed, r, policy) | fit | measured ms | measured speed-up | error: common factor | error: per kind |",
             "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        c = r["candidate"]
        pol = "" if c["tome_policy"] == "none" else f", {c['tome_policy']}"
        removed = c["removed"] if len(c["removed"]) < 4 else f"[0..{c['removed'][-1]}]"
        lines.append(f"| {removed}, r={c['tome_r']}{pol} | {'yes' if r['fit'] else ''} | {r['measured_ms']:.1f} | "
                     f"{r['measured_speedup']:.3f} | {100 * r['sum / common factor']:+.1f}% | "
                     f"{100 * r['per-kind (4 plans)']:+.1f}% |")
    m, u = res["max_abs_error"], res["max_abs_error_unseen"]
    lines += ["", f"max |error| of the speed-ups: common factor {100 * m['sum / common factor']:.1f}%, per kind "
                  f"{100 * m['per-kind (4 plans)']:.1f}% ({100 * u['per-kind (4 plans)']:.1f}% on the 12 plans not fitted)",
              "coefficients: " + ", ".join(f"{k} {v:.3f}" for k, v in res["coef"].items())]
    if res["pass_spread_ms"] is not None:
        lines.append(f"largest spread between passes: {100 * res['pass_spread_ms']:.1f}% in ms, "
                     f"{100 * res['pass_spread_speedup']:.1f}% in a speed-up")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(cli_main(main, prefix="cost_fit_check.py: error: ", verbose=False))
