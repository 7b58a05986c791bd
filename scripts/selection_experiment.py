#!/usr/bin/env python
"""Does the selection criterion matter? Choose layers with each criterion, train, compare deployable accuracy.

For every criterion (transfer entropy, cosine, block influence, random with 3 seeds, the last k
layers; optionally more), this runs ``python -m shrink.select`` on the embedded digits model and
then ``main_lambda.py --remove-layers ...`` with the embedded defaults, collects each run's
``summary.json`` and writes ``results.json`` and a markdown table (``table.md``) into ``--out``.
Runs are sequential; finished ones are reused (``--fresh`` redoes them).

    python scripts/selection_experiment.py --out out/selection_experiment
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shrink.io import atomic_write_json, atomic_write_text  # noqa: E402

# name -> extra flags for `python -m shrink.select`
REQUIRED = {
    "transfer_entropy": ["--criterion", "transfer_entropy"],
    "cosine": ["--criterion", "cosine"],
    "block_influence": ["--criterion", "block_influence"],
    "random_s0": ["--criterion", "random", "--seed", "0"],
    "random_s1": ["--criterion", "random", "--seed", "1"],
    "random_s2": ["--criterion", "random", "--seed", "2"],
    "last": ["--criterion", "last"],
}
EXTRAS = {
    "transfer_entropy_abs": ["--criterion", "transfer_entropy", "--te-abs"],
    "transfer_entropy_one_shot": ["--criterion", "transfer_entropy", "--one-shot"],
    "entropy": ["--criterion", "entropy"],
    "cosine_one_shot": ["--criterion", "cosine", "--one-shot"],
}


def run_logged(cmd: list[str], log: Path) -> float:
    """Run ``cmd`` in the repo root with output to ``log``; return seconds; exit on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    print("$ " + shlex.join(cmd), flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        rc = subprocess.call(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    if rc != 0:
        tail = log.read_text().strip().splitlines()[-5:]
        sys.exit(f"command failed (exit {rc}), see {log}:\n" + "\n".join(tail))
    return seconds


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="out/selection_experiment", help="output folder")
    p.add_argument("--ratio", type=float, default=0.4, help="removal ratio (0.4 of 12 blocks = 5 layers)")
    p.add_argument("--calib-images", type=int, default=512, help="calibration images for the scored criteria")
    p.add_argument("--extras", action="store_true", help="also |TE|, one-shot TE, entropy, one-shot cosine")
    p.add_argument("--only", default=None, help="comma-separated subset of run names")
    p.add_argument("--train-seeds", default=None,
                   help="comma-separated training seeds (passed as --seed to main_lambda.py); default: its own default")
    p.add_argument("--train-args", default="", help="extra arguments for main_lambda.py, one quoted string")
    p.add_argument("--fresh", action="store_true", help="redo runs whose results already exist")
    p.add_argument("--select-only", action="store_true", help="run the selections only (no training)")
    args = p.parse_args()

    out = (ROOT / args.out) if not Path(args.out).is_absolute() else Path(args.out)
    runs = dict(REQUIRED, **(EXTRAS if args.extras else {}))
    if args.only:
        wanted = args.only.split(",")
        unknown = [w for w in wanted if w not in REQUIRED and w not in EXTRAS]
        if unknown:
            sys.exit(f"unknown run names {unknown}; known: {', '.join([*REQUIRED, *EXTRAS])}")
        runs = {w: {**REQUIRED, **EXTRAS}[w] for w in wanted}
    train_seeds = [None] if args.train_seeds is None else [int(s) for s in args.train_seeds.split(",")]
    py = sys.executable
    results = []
    for name, flags in runs.items():
        sel_dir = out / "select" / name
        sel_json = sel_dir / "selection.json"
        if args.fresh or not sel_json.is_file():
            run_logged([py, "-m", "shrink.select", "--ratio", str(args.ratio), "--calib-images", str(args.calib_images),
                        "--quiet", "--output-dir", str(sel_dir), *flags], out / "logs" / f"select_{name}.log")
        sel = json.loads(sel_json.read_text())
        layers = ",".join(str(i) for i in sel["layers"])
        print(f"{name}: layers {sel['layers']} (TE of set {sel['scores'].get('te_of_selection')})", flush=True)
        if args.select_only:
            continue
        for ts in train_seeds:
            tag = name if ts is None else f"{name}_ts{ts}"
            train_dir = out / "train" / tag
            summary_path = train_dir / "summary.json"
            train_seconds = None
            if args.fresh or not summary_path.is_file():
                cmd = [py, "main_lambda.py", "--remove-layers", layers, "--output-dir", str(train_dir)]
                if ts is not None:
                    cmd += ["--seed", str(ts)]
                cmd += shlex.split(args.train_args)
                train_seconds = run_logged(cmd, out / "logs" / f"train_{tag}.log")
            summary = json.loads(summary_path.read_text())
            results.append({
                "run": tag, "selection": name, "train_seed": ts, "criterion": sel["criterion"],
                "select_flags": flags, "layers": sel["layers"],
                "te_of_selection": sel["scores"].get("te_of_selection"),
                "select_seconds": sel["seconds"], "forward_passes": sel["forward_passes"],
                "dense_acc": summary.get("dense_acc"), "deploy_acc_best": summary.get("deploy_acc_best"),
                "removed_layers": summary.get("removed_layers"), "train_seconds": train_seconds,
                "summary": str(summary_path.relative_to(ROOT)) if summary_path.is_relative_to(ROOT) else str(summary_path),
            })
            print(f"{tag}: layers {sel['layers']} -> deploy_acc_best {summary.get('deploy_acc_best')}", flush=True)
            atomic_write_json(out / "results.json", {"ratio": args.ratio, "calib_images": args.calib_images,
                                                     "train_args": args.train_args, "runs": results})
    table = markdown_table(results)
    atomic_write_text(out / "table.md", table)
    print(table)
    return 0


def _fmt(v, spec: str) -> str:
    return format(v, spec) if isinstance(v, (int, float)) else ("-" if v is None else str(v))


def markdown_table(results: list[dict]) -> str:
    """One row per run, and a mean +- spread line for runs sharing a selection (seeds)."""
    lines = ["| run | criterion | layers (selection order) | TE of set (nats) | selection s | passes "
             "| dense acc | deploy acc (best) |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        flags = " ".join(r["select_flags"][2:])
        crit = r["criterion"] + (f" `{flags}`" if flags else "")
        lines.append(f"| {r['run']} | {crit} | {r['layers']} | {_fmt(r['te_of_selection'], '.3f')} "
                     f"| {_fmt(r['select_seconds'], '.1f')} | {r['forward_passes']} | {_fmt(r['dense_acc'], '.4f')} "
                     f"| {_fmt(r['deploy_acc_best'], '.4f')} |")
    groups: dict[str, list[float]] = {}
    for r in results:
        key = "random" if r["criterion"] == "random" else r["selection"]
        if isinstance(r["deploy_acc_best"], (int, float)):
            groups.setdefault(key, []).append(r["deploy_acc_best"])
    multi = {k: v for k, v in groups.items() if len(v) > 1}
    if multi:
        lines += ["", "| group | runs | mean deploy acc | min | max |", "|---|---|---|---|---|"]
        for k, v in multi.items():
            lines.append(f"| {k} | {len(v)} | {sum(v) / len(v):.4f} | {min(v):.4f} | {max(v):.4f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
