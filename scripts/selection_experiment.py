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

from shrink.cli.runner import OneLineArgumentParser, add_threads_argument, apply_threads, cli_main  # noqa: E402
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


def skip_accuracy(layers: list[int], cache: dict) -> float:
    """Val top-1 (%) of the dense embedded model with the attention of ``layers`` skipped (x + 0), untrained.

    This is the model transfer entropy measures (identity skip), not the deployable ``2x`` block.
    """
    import torch

    from shrink import create_model
    from shrink.data.datasets import build_dataset
    from shrink.selection.criteria import skip_attention

    if "model" not in cache:
        cache["model"] = create_model("vit_digits", pretrained=True).eval()
        val = build_dataset("digits", "val")
        cache["val"] = (torch.stack([val[i][0] for i in range(len(val))]), torch.tensor([val[i][1] for i in range(len(val))]))
    model, (x, y) = cache["model"], cache["val"]
    with torch.no_grad(), skip_attention(model, layers):
        pred = model(x).argmax(dim=1)
    return 100.0 * int((pred == y).sum()) / len(y)


def main(argv: list[str] | None = None) -> int:
    return cli_main(_main, argv)


def _main(argv: list[str] | None) -> int:
    p = OneLineArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="out/selection_experiment", help="output folder")
    p.add_argument("--ratio", type=float, default=0.4, help="removal ratio (0.4 of 12 blocks = 5 layers)")
    p.add_argument("--calib-images", type=int, default=512, help="calibration images for the scored criteria")
    p.add_argument("--extras", action="store_true", help="also |TE|, one-shot TE, entropy, one-shot cosine")
    p.add_argument("--only", default=None, help="comma-separated subset of run names")
    p.add_argument("--train-seeds", default=None,
                   help="comma-separated training seeds passed as --seed to main_lambda.py; 'default' = no --seed "
                        "flag (its default, 0), e.g. default,1,2")
    p.add_argument("--train-args", default="", help="extra arguments for main_lambda.py, one quoted string; write it as --train-args=\"--epochs 10\"")
    p.add_argument("--fresh", action="store_true", help="redo runs whose results already exist")
    p.add_argument("--select-only", action="store_true", help="run the selections only (no training)")
    add_threads_argument(p)  # this process and every selection / training it starts
    args = p.parse_args(argv)
    apply_threads(args.threads)
    threads = [] if args.threads is None else ["--threads", str(args.threads)]

    out = (ROOT / args.out) if not Path(args.out).is_absolute() else Path(args.out)
    runs = dict(REQUIRED, **(EXTRAS if args.extras else {}))
    if args.only:
        wanted = args.only.split(",")
        unknown = [w for w in wanted if w not in REQUIRED and w not in EXTRAS]
        if unknown:
            sys.exit(f"unknown run names {unknown}; known: {', '.join([*REQUIRED, *EXTRAS])}")
        runs = {w: {**REQUIRED, **EXTRAS}[w] for w in wanted}
    train_seeds = [None] if args.train_seeds is None else [
        None if s == "default" else int(s) for s in args.train_seeds.split(",")]
    py = sys.executable
    results = []
    eval_cache: dict = {}
    for name, flags in runs.items():
        sel_dir = out / "select" / name
        sel_json = sel_dir / "selection.json"
        if args.fresh or not sel_json.is_file():
            run_logged([py, "-m", "shrink.select", "--ratio", str(args.ratio), "--calib-images", str(args.calib_images),
                        *threads, "--quiet", "--output-dir", str(sel_dir), *flags], out / "logs" / f"select_{name}.log")
        sel = json.loads(sel_json.read_text())
        layers = ",".join(str(i) for i in sel["layers"])
        skip_acc = skip_accuracy(sel["layers"], eval_cache)
        print(f"{name}: layers {sel['layers']} (TE of set {sel['scores'].get('te_of_selection')})", flush=True)
        if args.select_only:
            continue
        for ts in train_seeds:
            tag = name if ts is None else f"{name}_ts{ts}"
            train_dir = out / "train" / tag
            summary_path = train_dir / "summary.json"
            train_seconds = None
            if args.fresh or not summary_path.is_file():
                cmd = [py, "main_lambda.py", "--remove-layers", layers, "--output-dir", str(train_dir), *threads]
                if ts is not None:
                    cmd += ["--seed", str(ts)]
                cmd += shlex.split(args.train_args)
                train_seconds = run_logged(cmd, out / "logs" / f"train_{tag}.log")
            summary = json.loads(summary_path.read_text())
            results.append({
                "run": tag, "selection": name, "train_seed": ts, "criterion": sel["criterion"],
                "select_flags": flags, "layers": sel["layers"],
                "te_of_selection": sel["scores"].get("te_of_selection"), "skip_acc_untrained": skip_acc,
                "select_seconds": sel["seconds"], "forward_passes": sel["forward_passes"],
                "dense_acc": summary.get("dense_acc"), "deploy_acc_start": summary.get("deploy_acc_start"),
                "deploy_acc_best": summary.get("deploy_acc_best"),
                "removed_layers": summary.get("removed_layers"), "train_seconds": train_seconds,
                "summary": str(summary_path.relative_to(ROOT)) if summary_path.is_relative_to(ROOT) else str(summary_path),
            })
            print(f"{tag}: layers {sel['layers']} -> deploy_acc_best {summary.get('deploy_acc_best')}", flush=True)
            atomic_write_json(out / "results.json", {"ratio": args.ratio, "calib_images": args.calib_images,
                                                     "train_args": args.train_args, "runs": results})
    if args.select_only:
        return 0
    table = markdown_table(results)
    atomic_write_text(out / "table.md", table)
    print(table)
    return 0


def _fmt(v, spec: str) -> str:
    return format(v, spec) if isinstance(v, (int, float)) else ("-" if v is None else str(v))


def markdown_table(results: list[dict]) -> str:
    """One row per selection (training seeds side by side), then the mean over all random selections."""
    by_sel: dict[str, list[dict]] = {}
    for r in results:
        by_sel.setdefault(r["selection"], []).append(r)
    seeds = sorted({r["train_seed"] if r["train_seed"] is not None else 0 for r in results})
    head = " | ".join(f"deploy acc, train seed {s}" for s in seeds)
    lines = [f"| selection | layers (selection order) | TE of set (nats) | passes | selection s | skipped, untrained "
             f"| deployable (2x), untrained | {head} | mean |",
             "|---|---|---|---|---|---|---|" + "---|" * len(seeds) + "---|"]
    for rows in by_sel.values():
        r0 = rows[0]
        flags = " ".join(r0["select_flags"][2:])
        label = r0["criterion"] + (f" `{flags}`" if flags else "")
        accs = {(r["train_seed"] if r["train_seed"] is not None else 0): r["deploy_acc_best"] for r in rows}
        vals = [a for a in accs.values() if isinstance(a, (int, float))]
        mean = sum(vals) / len(vals) if vals else None
        cells = " | ".join(_fmt(accs.get(s), ".2f") for s in seeds)
        lines.append(f"| {label} | {r0['layers']} | {_fmt(r0['te_of_selection'], '.3f')} | {r0['forward_passes']} "
                     f"| {_fmt(r0['select_seconds'], '.1f')} | {_fmt(r0['skip_acc_untrained'], '.2f')} "
                     f"| {_fmt(r0['deploy_acc_start'], '.2f')} | {cells} | {_fmt(mean, '.2f')} |")
    rand = [r["deploy_acc_best"] for r in results if r["criterion"] == "random"
            and isinstance(r["deploy_acc_best"], (int, float))]
    dense = {r["dense_acc"] for r in results if isinstance(r["dense_acc"], (int, float))}
    lines.append("")
    if dense:
        lines.append(f"Dense starting model: {', '.join(f'{d:.2f}' for d in sorted(dense))}% top-1.")
    if len(rand) > 1:
        lines.append(f"All random runs ({len(rand)}): mean {sum(rand) / len(rand):.2f}, "
                     f"min {min(rand):.2f}, max {max(rand):.2f}.")
    lines += correlations(by_sel)
    return "\n".join(lines) + "\n"


def correlations(by_sel: dict[str, list[dict]]) -> list[str]:
    """Spearman rank correlations across the distinct selections (scipy.stats.spearmanr)."""
    try:
        from scipy.stats import spearmanr
    except ImportError:
        return []
    cols = {"TE of set": [], "skipped, untrained": [], "deployable (2x), untrained": [], "mean deploy acc": []}
    for rows in by_sel.values():
        accs = [r["deploy_acc_best"] for r in rows if isinstance(r["deploy_acc_best"], (int, float))]
        if not accs or not isinstance(rows[0]["te_of_selection"], (int, float)):
            continue
        cols["TE of set"].append(rows[0]["te_of_selection"])
        cols["skipped, untrained"].append(rows[0]["skip_acc_untrained"])
        cols["deployable (2x), untrained"].append(rows[0]["deploy_acc_start"])
        cols["mean deploy acc"].append(sum(accs) / len(accs))
    n = len(cols["TE of set"])
    if n < 4:
        return []
    out = [f"Spearman rank correlation over the {n} distinct selections (p-value):"]
    for a, b in (("TE of set", "skipped, untrained"), ("TE of set", "mean deploy acc"),
                 ("skipped, untrained", "mean deploy acc"), ("deployable (2x), untrained", "mean deploy acc")):
        res = spearmanr(cols[a], cols[b])
        out.append(f"- {a} vs {b}: rho = {res.statistic:+.2f} (p = {res.pvalue:.3f})")
    return out


if __name__ == "__main__":
    sys.exit(main())
