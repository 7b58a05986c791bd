"""Check the cost model's predictions against benchmark.py --plan measurements (issue 22, point 5).

For each runtime: build the cost table of the model (timed), pick for each target speed-up the plan
with the smallest predicted speed-up >= the target from a simple accuracy-agnostic enumeration
(the first k blocks' attention removed x constant r x policy), write it as PLAN.yaml + PLAN.json, and
measure it with exactly what ``benchmark.py --plan`` runs (dense and plan interleaved in one
process). Writes ``results.json`` and ``table.md`` (predicted vs measured) under ``--out``.

    python scripts/plan_check.py --out out/plan_check                      # deit_small, batch 16, 2 threads
    python scripts/plan_check.py --model deit_tiny_patch16_224 --img-size 64 --batch-size 4 --quick

Timings are only meaningful on a quiet machine: the load average before and after is recorded.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shrink.bench import BenchConfig, read_plan, run  # noqa: E402
from shrink.cli.runner import add_threads_argument, cli_main  # noqa: E402
from shrink.io import atomic_write_json, atomic_write_text  # noqa: E402
from shrink.modelio.create import create_model  # noqa: E402
from shrink.plan.candidate import Candidate  # noqa: E402
from shrink.plan.cost import CostTable, cached_cost_table  # noqa: E402

R_VALUES = (0, 4, 8, 13, 16, 20, 24)
BENCH_RUNTIME = {"eager": "torch", "compile": "torch", "onnxruntime": "onnxruntime"}


def candidates(depth: int, r_values=R_VALUES) -> list[Candidate]:
    """The first k blocks' attention removed (k = 0 .. depth - 1) x a constant r x policy none / hidden
    (hidden: attention-free blocks merge too; only with a removal and r > 0)."""
    return [Candidate(removed=tuple(range(k)), tome_r=r, tome_policy=pol) for k in range(depth) for r in r_values
            for pol in ("none", "hidden") if pol == "none" or (k and r)]


def pick(table: CostTable, target: float, cands: list[Candidate]) -> tuple[Candidate, float] | None:
    """The plan with the smallest predicted speed-up >= target (ties: fewer removed blocks, smaller r)."""
    scored = [(table.predict_speedup(c), len(c.removed), c.tome_r, c) for c in cands]
    ok = sorted((s for s in scored if s[0] >= target), key=lambda s: (s[0], s[1], s[2]))
    return (ok[0][3], ok[0][0]) if ok else None


def write_plan(folder: Path, stem: str, model: str, table: CostTable, cand: Candidate) -> Path:
    yaml_path = folder / f"{stem}.yaml"
    atomic_write_text(yaml_path, yaml.safe_dump({"model": model, **cand.config()}, sort_keys=False))
    atomic_write_json(folder / f"{stem}.json", {
        "predicted_speedup": table.predict_speedup(cand), "predicted_ms": table.predict_ms(cand),
        "dense_predicted_ms": table.dense_ms(), "cost_key": table.key.to_dict(), "candidate": cand.as_dict()})
    return yaml_path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--img-size", type=int)
    p.add_argument("--batch-size", type=int, default=16)
    add_threads_argument(p, default=2)  # the acceptance setting
    p.add_argument("--runtimes", default="eager,onnxruntime")
    p.add_argument("--targets", default="1.3,1.5,2.0")
    p.add_argument("--token-step", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5, help="cost table repeats")
    p.add_argument("--iters", type=int, default=5, help="benchmark timed iterations per repeat")
    p.add_argument("--bench-repeats", type=int, default=5, help="benchmark repeats (interleaved)")
    p.add_argument("--cache-dir", help="cost table cache (default: OUT/cache); an existing table is reused")
    p.add_argument("--rebuild", action="store_true", help="rebuild the cost tables even if cached")
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke run")
    p.add_argument("--out", default="out/plan_check")
    args = p.parse_args(argv)
    if args.quick:
        args.token_step, args.repeats, args.iters, args.bench_repeats = 32, 1, 1, 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    kwargs = {"img_size": args.img_size} if args.img_size else {}
    model = create_model(args.model, **kwargs).eval()
    targets = [float(t) for t in args.targets.split(",")]
    rows, tables, built = [], {}, []
    load_before = os.getloadavg()
    for runtime in [r.strip() for r in args.runtimes.split(",") if r.strip()]:
        t0 = time.perf_counter()
        table = cached_cost_table(model, args.model, cache_dir=args.cache_dir or out / "cache", device="cpu",
                                  dtype="fp32", batch_size=args.batch_size, threads=args.threads, runtime=runtime,
                                  img_size=args.img_size, rebuild=args.rebuild, token_step=args.token_step,
                                  repeats=args.repeats, progress=False)
        load_s = time.perf_counter() - t0
        built.append(table)
        tables[runtime] = {"key": str(table.key), "build_s": table.info.get("build_s"), "parts_s": table.info.get("parts_s"),
                           "this_run_s": round(load_s, 1), "coef": table.coef, "validation": table.validation}
        t1 = time.perf_counter()
        cands = candidates(table.key.depth)
        picks = {t: pick(table, t, cands) for t in targets}
        tables[runtime]["plan_s"] = round(time.perf_counter() - t1, 2)
        for target, chosen in picks.items():
            if chosen is None:
                rows.append({"runtime": runtime, "target": target, "plan": None, "note": "no enumerated plan reaches it"})
                continue
            cand, pred = chosen
            stem = f"plan_{runtime}_{target:g}"
            plan_yaml = write_plan(out / "plans", stem, args.model, table, cand)
            spec, info = read_plan(plan_yaml)  # what benchmark.py --plan does
            cfg = BenchConfig(models=[spec], device="cpu", batch_size=args.batch_size, img_size=args.img_size,
                              warmup=2, iters=args.iters, repeats=args.bench_repeats, latency=False,
                              threads=args.threads, interleave=True, runtimes=[BENCH_RUNTIME[runtime]],
                              json_path=str(out / f"{stem}.bench.json"), progress=False, plan=info,
                              command=f"python benchmark.py --plan {plan_yaml} --batch-size {args.batch_size} "
                                      f"--threads {args.threads} --runtime {BENCH_RUNTIME[runtime]} --warmup 2 "
                                      f"--iters {args.iters} --repeats {args.bench_repeats} --no-latency")
            report = run(cfg)
            measured = report["plan"]["speedup"]
            rows.append({"runtime": runtime, "target": target, "plan": cand.as_dict(), "predicted_speedup": pred,
                         "measured_speedup": measured, "error": (pred - measured) / measured,
                         "reaches_target": measured >= target - 0.05, "within_10pct": abs(pred - measured) <= 0.10 * measured,
                         "plan_file": str(plan_yaml)})
            logging.info("%s target %.2f: %s predicted %.3f measured %.3f", runtime, target, cand.as_dict(), pred, measured)
    cpus = {t.key.versions.get("cpu") for t in built}
    result = {"model": args.model, "cpu": ", ".join(sorted(c for c in cpus if c)) or None, "batch_size": args.batch_size, "threads": args.threads, "img_size": args.img_size,
              "load_average_before": load_before, "load_average_after": os.getloadavg(), "tables": tables,
              "rows": rows, "command": " ".join(["python", "scripts/plan_check.py", *(argv or sys.argv[1:])])}
    atomic_write_json(out / "results.json", result)
    atomic_write_text(out / "table.md", markdown(result))
    sys.stdout.write(markdown(result))
    return 0


def markdown(res: dict) -> str:
    lines = [f"{res['model']}, batch {res['batch_size']}, {res['threads']} threads, fp32, CPU {res.get('cpu')}; load average "
             f"{res['load_average_before'][0]:.2f} before, {res['load_average_after'][0]:.2f} after", ""]
    lines += ["| runtime | table build (s) | fit plans: predicted / measured speed-up | check plan (not fitted) |",
              "|---|---|---|---|"]
    for rt, t in res["tables"].items():
        def pairs(fit, t=t):
            return "; ".join(f"{v['predicted_speedup']:.2f} / {v['measured_speedup']:.2f}"
                             for v in t["validation"][1:] if v.get("fit", True) == fit) or "-"
        lines.append(f"| {rt} | {t['build_s']} | {pairs(True)} | {pairs(False)} |")
    lines += ["", "| runtime | target | plan (removed, r, policy) | predicted | measured | error | >= target - 0.05 | within 10% |",
              "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        if r["plan"] is None:
            lines.append(f"| {r['runtime']} | {r['target']:g} | {r['note']} | - | - | - | - | - |")
            continue
        pl = r["plan"]
        pol = "" if pl["tome_policy"] == "none" else f", {pl['tome_policy']}"
        lines.append(f"| {r['runtime']} | {r['target']:g} | {pl['removed']}, r={pl['tome_r']}{pol} | "
                     f"{r['predicted_speedup']:.2f}x | {r['measured_speedup']:.2f}x | {100 * r['error']:+.1f}% | "
                     f"{'yes' if r['reaches_target'] else 'NO'} | {'yes' if r['within_10pct'] else 'NO'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(cli_main(main, prefix="plan_check.py: error: "))
