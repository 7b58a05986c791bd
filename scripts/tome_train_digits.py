#!/usr/bin/env python
"""Fine-tuning with and without token merging on the embedded digits model (issue 21 items 4 and 5).

vit_digits (12 blocks, 16 patches + a class token) goes through the README's main job
(``main_lambda.py --remove-ratio 0.4``: 5 attention layers chosen by transfer entropy, lambda 1 -> 0)
three ways per seed:

- ``none``: no merging while training (the plain run);
- ``tome r=1`` / ``tome r=2``: ``--tome-r R --tome-train``, merging in every forward of the run
  (r tokens per attention block of the deployable model, from the first one; policy none).

Every run's best/ is then evaluated by ``main_lambda.py --eval`` without merging and with r = 1 and
r = 2, so the table has "merging at evaluation only" (the plain run's best/ with r > 0) next to
"merging during training". The dense starting model (no fine-tuning) is evaluated the same way.
Top-1 on the val split (the fixed 360 images). Writes ``results.json`` and ``table.md`` into ``--out``
and the runs into ``--out``/runs.

    python scripts/tome_train_digits.py --seeds 2 --threads 1 --out out/tome_train_digits
"""
from __future__ import annotations

import argparse
import datetime
import math
import platform
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shrink.cli.runner import OneLineArgumentParser, add_threads_argument, apply_threads, cli_main  # noqa: E402
from shrink.errors import ShrinkError  # noqa: E402
from shrink.io import atomic_write_json, atomic_write_text  # noqa: E402

EVAL_R = (0, 1, 2)


def mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def evaluate_dir(checkpoint: Path, r: int, threads: int | None) -> dict:
    """``main_lambda.py --eval --checkpoint DIR [--tome-r r]`` in this process: its result dict."""
    from shrink.cli.run_flags import config_from_args
    from shrink.training.trainer import run

    argv = ["--eval", "--checkpoint", str(checkpoint), "--no-progress", "--num-workers", "0"]
    if r:
        argv += ["--tome-r", str(r)]
    if threads:
        argv += ["--threads", str(threads)]
    return run(config_from_args(argv))


def dense_row(out: Path, threads: int | None) -> dict:
    """The dense starting weights (models/weights), saved once so that --eval reads them like a run's best/."""
    import shrink

    path = out / "dense"
    if not (path / "config.json").is_file():
        shrink.save(shrink.create_model("vit_digits", pretrained=True), path)
    res = {}
    for r in EVAL_R:
        e = evaluate_dir(path, r, threads)
        res[str(r)] = e["acc_tome"] if r else e["acc"]
        if r:
            res[f"tokens_r{r}"] = e["tokens_per_block"]
    return res


def train_run(out: Path, name: str, seed: int, r: int, args) -> dict:
    from shrink.cli.run_flags import config_from_args
    from shrink.training.trainer import run

    argv = ["--remove-ratio", "0.4", "--seed", str(seed), "--epochs", str(args.epochs), "--dilution-epochs",
            f"{args.dilution_epochs:g}", "--num-workers", "0", "--no-progress", "--output-dir", str(out / name)]
    if r:
        argv += ["--tome-r", str(r), "--tome-train"]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    t0 = time.perf_counter()
    s = run(config_from_args(argv))
    seconds = time.perf_counter() - t0
    evals = {}
    for er in EVAL_R:
        e = evaluate_dir(out / name / "best", er, args.threads)
        evals[str(er)] = e["acc_tome"] if er else e["acc"]
        if er:
            evals[f"tokens_r{er}"] = e["tokens_per_block"]
    return {"name": name, "seed": seed, "train_r": r, "argv": argv, "removed_layers": s["removed_layers"],
            "dense_acc": s["dense_acc"], "deploy_acc_best": s["deploy_acc_best"], "best_epoch": s["best_epoch"],
            "tokens_per_block": s.get("tokens_per_block"), "eval": evals,
            "reproduced": (evals[str(r)] == s["deploy_acc_best"]) if r else (evals["0"] == s["deploy_acc_best"]),
            "seconds": seconds}


def markdown_table(results: dict) -> str:
    a = results["args"]
    seeds = a["seeds"]
    std = "sample std (n - 1)" if seeds > 1 else "one seed, no std"
    lines = [
        f"vit_digits on digits (1,437 train / 360 val), `--remove-ratio 0.4`, {a['epochs']} epochs, lambda 1 -> 0 "
        f"over {a['dilution_epochs']:g}; top-1 (%) of best/ on val, mean ± {std} over {seeds} seed(s) "
        f"(per seed in brackets). Evaluation with ToMe: `--eval --tome-r R` (start block 0, policy none).",
        "",
        "| fine-tuning | eval without merging | eval ToMe r = 1 | eval ToMe r = 2 |",
        "|---|---|---|---|",
    ]
    d = results["dense"]
    lines.append("| none: the dense starting model (12 attention blocks) | "
                 + " | ".join(f"{d[str(r)]:.2f}" for r in EVAL_R) + " |")
    labels = {0: "remove 5, no merging", 1: "remove 5, merging r = 1 while training",
              2: "remove 5, merging r = 2 while training"}
    for r, label in labels.items():
        runs = [x for x in results["runs"] if x["train_r"] == r]
        if not runs:
            continue
        cells = []
        for er in EVAL_R:
            vals = [x["eval"][str(er)] for x in runs]
            m, s = mean_std(vals)
            mark = "**" if er == r else ""
            cells.append(f"{mark}{m:.2f} ± {s:.2f}{mark} [{', '.join(f'{v:.2f}' for v in vals)}]")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    tok = results["runs"][0]["eval"] if results["runs"] else {}
    layers = sorted({tuple(x["removed_layers"]) for x in results["runs"]})
    lines += ["", "Bold: evaluated as trained. Tokens after each block of the deployable model: "
                  f"r = 1 {tok.get('tokens_r1')}, r = 2 {tok.get('tokens_r2')}. Layers removed: "
                  f"{', '.join(str(list(x)) for x in layers)}.",
              "", f"Command: `{results['command']}`; {results['seconds']:.0f} s wall; {results['date']}; "
                  f"{results['machine']['platform']}, torch {results['machine']['torch']}, "
                  f"{results['machine']['threads']} thread(s)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    return cli_main(_main, argv)


def _main(argv: list[str] | None) -> int:
    p = OneLineArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="out/tome_train_digits", help="output folder (results.json, table.md, runs/)")
    p.add_argument("--seeds", type=int, default=2, help="seeds 0 .. N-1 of every configuration")
    p.add_argument("--epochs", type=int, default=40, help="epochs per run (the README's main job: 40)")
    p.add_argument("--dilution-epochs", type=float, default=25, help="lambda 1 -> 0 over these (main job: 25)")
    p.add_argument("--train-r", default="0,1,2", help="merging while training: 0 (none) and the r values to train with")
    add_threads_argument(p)
    args = p.parse_args(argv)
    apply_threads(args.threads)
    try:
        train_rs = sorted({int(t) for t in args.train_r.split(",") if t.strip()})
    except ValueError:
        raise ShrinkError(f"--train-r: expected comma-separated integers, got {args.train_r!r}") from None
    if not train_rs or any(r not in EVAL_R for r in train_rs):
        raise ShrinkError(f"--train-r: values among {', '.join(map(str, EVAL_R))}, got {args.train_r!r}")
    if args.seeds < 1 or args.epochs < 1 or not 0 <= args.dilution_epochs:
        raise ShrinkError("--seeds and --epochs must be >= 1 and --dilution-epochs >= 0")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ShrinkError(f"--out {out} is a file")
    if (out / "runs").is_dir() and any((out / "runs").iterdir()):
        raise ShrinkError(f"--out {out} already holds runs; give another folder")

    import timm
    import torch

    import shrink  # noqa: F401  (registers vit_digits)

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    cmd = shlex.join(["python", "scripts/tome_train_digits.py", *(sys.argv[1:] if argv is None else argv)])
    results = {
        "command": cmd,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "timm": timm.__version__, "threads": torch.get_num_threads()},
        "args": vars(args),
        "dense": dense_row(out, args.threads),
        "runs": [],
    }
    for seed in range(args.seeds):
        for r in train_rs:
            name = f"{'none' if r == 0 else f'tome_r{r}'}_seed{seed}"
            res = train_run(out / "runs", name, seed, r, args)
            results["runs"].append(res)
            results["seconds"] = time.perf_counter() - t0
            atomic_write_json(out / "results.json", results)
            print(f"[{results['seconds']:5.0f} s] {name}: layers {res['removed_layers']}, best {res['deploy_acc_best']:.2f} "
                  f"(epoch {res['best_epoch']}), eval r=0/1/2 {res['eval']['0']:.2f} / {res['eval']['1']:.2f} / "
                  f"{res['eval']['2']:.2f}, {res['seconds']:.0f} s", flush=True)
    results["seconds"] = time.perf_counter() - t0
    atomic_write_json(out / "results.json", results)
    table = markdown_table(results)
    atomic_write_text(out / "table.md", table)
    print(table, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
