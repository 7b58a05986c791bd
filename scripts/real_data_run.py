#!/usr/bin/env python
"""Real image files end to end, at a size CI does not run: the DeiT recipe in 1 and 2 processes,
a kill + resume, evaluation from best/ with and without ToMe.

1. Writes an ImageFolder (``OUT/images/{train,val}/CLASS``) of ``--images`` crops of scikit-learn's
   two sample photos (``china.jpg``, ``flower.jpg``): 10 classes, one per (photo, vertical fifth of
   the photo), so the label is learnable from what the crop shows. Each crop has a random box in its
   fifth, is resized to a random 24-96 x 24-96 px and flipped at random; PNG and JPEG alternate;
   one file in 50 is grayscale (L), one in 50 CMYK (JPEG), one train file in 500 a JPEG cut short.
   80% of each class is train, 20% val (val crops come from the same two photos: this measures
   whether the recipe learns, not how it generalises to new photos).
2. Saves a random-initialised DeiT-Tiny with 8-px patches at 32 px (17 tokens, 10 classes) and
   trains it through ``main_lambda.py --config configs/deit_tiny_25.yaml --finetune`` (the DeiT-T
   recipe: mixup 0.8, cutmix 1.0, RandAugment, colour jitter, random erasing, label smoothing,
   repeated augmentation, drop path, EMA, the DeiT lr rule; layers 0, 2, 4 diluted), changing only
   sizes, epochs, warm-up, workers and precision (fp32 on a CPU):
   - ``one``: 1 process;
   - ``two_ref``: 2 processes (``accelerate launch --multi_gpu``: torchrun + gloo on a CPU);
   - ``two``: 2 processes, killed (the launcher, both ranks and their workers, SIGKILL) once
     epoch 0's state is saved, then ``--resume`` in 2 processes; compared with ``two_ref``
     (metrics.jsonl without the seconds, last/ and state/ weights, the EMA).
3. Evaluates ``one/best`` and ``two/best`` with ``--eval --tome-r R`` (top-1 without and with ToMe)
   in 1 and in 2 processes.
4. Writes ``OUT/results.json`` and ``OUT/table.md`` (atomically); logs under ``OUT/logs``.

    python scripts/real_data_run.py --out out/real_data --threads 1

Not in CI (minutes); ``tests/training/test_real_data_e2e.py`` is its small version.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shrink.cli.runner import OneLineArgumentParser, add_threads_argument, apply_threads, cli_main  # noqa: E402
from shrink.errors import ShrinkError  # noqa: E402
from shrink.introspect import num_params  # noqa: E402
from shrink.io import atomic_write_json, atomic_write_text  # noqa: E402

PHOTOS = ("china", "flower")
REGIONS = 5  # vertical fifths of each photo: 2 x 5 = 10 classes
RECIPE = "configs/deit_tiny_25.yaml"


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------

def write_images(root: Path, n: int, seed: int = 0) -> dict:
    """The ImageFolder described in the module docstring; returns counts by split, format and mode."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images  # two 427 x 640 RGB arrays
    rng = np.random.default_rng(seed)
    classes = [f"{p}_{r}" for p in PHOTOS for r in range(REGIONS)]
    per_class = n // len(classes)
    n_val = max(1, per_class // 5)
    stats = {"classes": len(classes), "train": 0, "val": 0, "png": 0, "jpeg": 0, "L": 0, "CMYK": 0,
             "truncated": 0, "min_side": 10**9, "max_side": 0}
    for ci, cls in enumerate(classes):
        photo = photos[ci // REGIONS]
        strip = photo.shape[1] // REGIONS
        x_lo = (ci % REGIONS) * strip
        for split, count in (("train", per_class - n_val), ("val", n_val)):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(count):
                k = ci * per_class + i + (0 if split == "train" else per_class - n_val)  # index over the set
                cw, ch = int(rng.integers(24, strip + 1)), int(rng.integers(24, 161))
                x0 = x_lo + int(rng.integers(0, strip - cw + 1))
                y0 = int(rng.integers(0, photo.shape[0] - ch + 1))
                img = Image.fromarray(photo[y0:y0 + ch, x0:x0 + cw])
                w, h = int(rng.integers(24, 97)), int(rng.integers(24, 97))
                img = img.resize((w, h), Image.Resampling.BICUBIC)
                if rng.random() < 0.5:
                    img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                mode = "L" if k % 50 == 7 else "CMYK" if k % 50 == 17 else "RGB"
                img = img.convert(mode)
                cut = split == "train" and k % 500 == 3
                jpeg = cut or mode == "CMYK" or k % 2 == 1
                path = folder / f"{i:05d}.{'jpg' if jpeg else 'png'}"
                img.save(path, **({"quality": 90} if jpeg else {}))
                if cut:
                    data = path.read_bytes()
                    path.write_bytes(data[: len(data) * 2 // 3])
                stats[split] += 1
                stats["jpeg" if jpeg else "png"] += 1
                stats["truncated"] += cut
                if mode != "RGB":
                    stats[mode] += 1
                stats["min_side"] = min(stats["min_side"], w, h)
                stats["max_side"] = max(stats["max_side"], w, h)
    return stats


def save_start_model(path: Path, seed: int) -> int:
    """DeiT-Tiny (12 blocks, width 192, 3 heads) with 8-px patches at 32 px, 10 classes, random weights."""
    import torch

    import shrink

    torch.manual_seed(seed)
    model = shrink.create_model("deit_tiny_patch16_224", patch_size=8, img_size=32, num_classes=10)
    shrink.save(model, path)
    return num_params(model)


# ------------------------------------------------------------------------------------------------
# processes
# ------------------------------------------------------------------------------------------------

def launcher(n: int) -> list[str]:
    """``accelerate launch`` for n CPU processes (n > 1: --multi_gpu, i.e. torchrun + gloo on a CPU)."""
    mode = ["--multi_gpu"] if n > 1 else ["--cpu"]
    return [sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_processes", str(n),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def _env(threads: int | None) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_logged(cmd: list[str], log: Path, threads: int | None) -> tuple[float, str]:
    """Run ``cmd`` in the repository root, output to ``log``; (seconds, stdout+stderr); stop on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    print("$ " + shlex.join(cmd), flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        rc = subprocess.call(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=_env(threads))
    seconds = time.perf_counter() - t0
    text = log.read_text()
    if rc != 0:
        tail = " | ".join(text.strip().splitlines()[-3:])
        raise ShrinkError(f"command failed (exit {rc}), see {log}: {tail}")
    return seconds, text


def _process_tree(pid: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(stat.parent.name))
    todo, tree = [pid], []
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(kids.get(p, []))
    return tree


def kill_tree(pid: int) -> None:
    """SIGSTOP then SIGKILL the launcher and every descendant. Not by process group: torchrun starts each
    rank in a session of its own, and ranks outlive a killed launcher."""
    stopped: list[int] = []
    for _ in range(3):
        new = [p for p in _process_tree(pid) if p not in stopped]
        if not new:
            break
        for p in new:
            try:
                os.kill(p, signal.SIGSTOP)
                stopped.append(p)
            except ProcessLookupError:
                pass
    for p in stopped:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_killed_after_epoch_0(cmd: list[str], out: Path, log: Path, threads: int | None) -> float:
    """Start ``cmd``; kill it whole as soon as ``out/state`` holds epoch 0; seconds until the kill."""
    log.parent.mkdir(parents=True, exist_ok=True)
    print("$ " + shlex.join(cmd) + "   # killed after epoch 0", flush=True)
    state = out / "state" / "trainer_state.json"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write("$ " + shlex.join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=_env(threads))
        try:
            while True:
                try:
                    if json.loads(state.read_text())["epoch"] >= 0:
                        break
                except (OSError, ValueError, KeyError):
                    pass
                if proc.poll() is not None:
                    raise ShrinkError(f"the run to kill ended first (exit {proc.returncode}), see {log}")
                time.sleep(0.05)
        finally:
            kill_tree(proc.pid)
            proc.wait()
    if (out / "summary.json").exists():
        raise ShrinkError(f"the run finished before the kill landed, see {log}")
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------------------
# results
# ------------------------------------------------------------------------------------------------

def metrics_rows(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


def same_tensors(a: Path, b: Path) -> bool:
    from safetensors.torch import load_file

    if not a.exists() or not b.exists():
        return a.exists() == b.exists()
    x, y = load_file(str(a)), load_file(str(b))
    import torch

    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def eval_table(text: str) -> dict[str, str]:
    rows = {}
    for line in text.splitlines():
        key, sep, value = line.partition("  ")
        if sep and not line.startswith(("$", "WARNING", "error")):
            rows[key.strip()] = value.strip()
    return rows


def images_per_epoch(n_train: int, batch: int, processes: int) -> int:
    """Train images one epoch steps through: timm's RepeatAugSampler for one replica (3 repeats,
    len(train) rounded down to 256 when it is at least 256), batches of ``batch`` with the last partial
    one dropped, dealt to the processes in whole rounds (Accelerate's even batches)."""
    selected = n_train // 256 * 256 if n_train >= 256 else n_train
    return selected // batch // processes * processes * batch


def main(argv: list[str] | None = None) -> int:
    return cli_main(_main, argv)


def _main(argv: list[str] | None) -> int:
    p = OneLineArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="out/real_data", help="output folder (must not exist)")
    p.add_argument("--images", type=int, default=3000, help="image files in all (train 80%%, val 20%%, 10 classes)")
    p.add_argument("--epochs", type=int, default=5, help="training epochs (lambda reaches 0 at half of them)")
    p.add_argument("--batch-size", type=int, default=32, help="images per process per step")
    p.add_argument("--num-workers", type=int, default=2, help="data-loader workers per process")
    p.add_argument("--tome-r", type=int, default=2, help="ToMe tokens merged per attention block in the evaluation")
    p.add_argument("--seed", type=int, default=0, help="seed of the image folder and the start model")
    add_threads_argument(p)
    args = p.parse_args(argv)
    apply_threads(args.threads)
    if args.images < 100:
        raise ShrinkError(f"--images must be at least 100 (10 classes, 20% val), got {args.images}")
    if args.epochs < 2:
        raise ShrinkError(f"--epochs must be at least 2 (a kill after epoch 0 and a resume), got {args.epochs}")
    out = Path(args.out) if Path(args.out).is_absolute() else ROOT / args.out
    if out.exists():
        raise ShrinkError(f"--out {out} exists; give a new folder")
    threads = [] if args.threads is None else ["--threads", str(args.threads)]
    logs = out / "logs"
    t_start = time.perf_counter()

    t0 = time.perf_counter()
    stats = write_images(out / "images", args.images, args.seed)
    stats["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"images: {stats}", flush=True)
    start = out / "start_model"
    params = save_start_model(start, args.seed)

    dilution = max(1, args.epochs // 2)
    common = ["main_lambda.py", "--config", RECIPE, "--model", "deit_tiny_patch16_224", "--finetune", str(start),
              "--data-path", str(out / "images"), "--input-size", "32", "--epochs", str(args.epochs),
              "--dilution-epochs", str(dilution), "--warmup-epochs", "1", "--batch-size", str(args.batch_size),
              "--num-workers", str(args.num_workers), "--mixed-precision", "no", "--no-progress", *threads]

    runs: dict[str, dict] = {}

    def train(name: str, n: int) -> None:
        seconds, _ = run_logged([*launcher(n), *common, "--output-dir", str(out / name)], logs / f"{name}.log",
                                args.threads)
        runs[name] = {"processes": n, "wall_s": round(seconds, 1)}

    train("one", 1)
    train("two_ref", 2)
    killed_s = run_killed_after_epoch_0([*launcher(2), *common, "--output-dir", str(out / "two")], out / "two",
                                        logs / "two_killed.log", args.threads)
    epochs_before = len(metrics_rows(out / "two"))
    resume_s, text = run_logged([*launcher(2), "main_lambda.py", "--resume", "--no-progress", *threads,
                                 "--output-dir", str(out / "two")], logs / "two_resume.log", args.threads)
    runs["two"] = {"processes": 2, "wall_s": round(killed_s + resume_s, 1), "killed_after_s": round(killed_s, 1),
                   "epochs_on_disk_at_kill": epochs_before, "resume_wall_s": round(resume_s, 1),
                   "resume_line": next((x for x in text.splitlines() if x.startswith("resumed after")), None)}

    ref, res = out / "two_ref", out / "two"
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in metrics_rows(ref)]
    resume = {"metrics_equal": strip == [{k: v for k, v in r.items() if k != "seconds"} for r in metrics_rows(res)],
              "last_weights_equal": same_tensors(ref / "last" / "model.safetensors", res / "last" / "model.safetensors"),
              "state_weights_equal": same_tensors(ref / "state" / "model.safetensors",
                                                  res / "state" / "model.safetensors"),
              "ema_equal": same_tensors(ref / "state" / "ema.safetensors", res / "state" / "ema.safetensors")}

    for name, info in runs.items():
        s = json.loads((out / name / "summary.json").read_text())
        seen = images_per_epoch(stats["train"], args.batch_size, info["processes"]) * args.epochs
        info.update({k: s[k] for k in ("dense_acc", "deploy_acc_start", "deploy_acc_best", "best_epoch", "best_source",
                                       "best_acc_reloaded", "params_dense", "params_deploy", "removed_layers",
                                       "seconds_training", "warnings")})
        info["metrics"] = metrics_rows(out / name)
        # the epochs' own training seconds (metrics.jsonl), so a resumed run counts its first epoch too
        info["train_s"] = round(sum(r["seconds"] for r in info["metrics"]), 1)
        info["train_images_seen"] = seen
        info["train_images_per_s"] = round(seen / info["train_s"], 1)
        if name == "two_ref":
            continue
        info["eval"] = {}
        for n in (1, 2):
            seconds, text = run_logged([*launcher(n), "main_lambda.py", "--eval", "--checkpoint", str(out / name / "best"),
                                        "--data-path", str(out / "images"), "--tome-r", str(args.tome_r), *threads,
                                        "--no-progress"], logs / f"{name}_eval_{n}.log", args.threads)
            table = eval_table(text)
            tome = next((k for k in table if k.startswith("top-1 with ToMe")), None)
            info["eval"][str(n)] = {"wall_s": round(seconds, 1), "val_images": int(table["val images"]),
                                    "top1": float(table["top-1 (%)"]), "tome": tome,
                                    "top1_tome": float(table[tome]) if tome else None,
                                    "tokens": table.get("tokens after each block")}

    import accelerate
    import PIL
    import timm
    import torch

    results = {
        "command": shlex.join([sys.executable, "scripts/real_data_run.py", *(argv if argv is not None else sys.argv[1:])]),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "machine": platform.platform(),
        "cpus": os.cpu_count(), "versions": {"torch": torch.__version__, "timm": timm.__version__,
                                             "accelerate": accelerate.__version__, "pillow": PIL.__version__},
        "recipe": RECIPE, "images": stats, "start_model": {"params": params, "patch_size": 8, "input_size": 32},
        "epochs": args.epochs, "dilution_epochs": dilution, "batch_size": args.batch_size,
        "num_workers": args.num_workers, "resume": resume, "runs": runs,
        "wall_s_total": round(time.perf_counter() - t_start, 1),
    }
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "table.md", table_md(results))
    print(table_md(results), flush=True)
    ok = all(resume.values()) and all(abs(e["top1"] - runs[name]["best_acc_reloaded"]) < 0.006  # printed to 0.01
                                      for name in ("one", "two") for e in runs[name]["eval"].values())
    print(f"results: {out / 'results.json'}, {out / 'table.md'}; {'all checks hold' if ok else 'A CHECK FAILED'}")
    return 0 if ok else 1


def table_md(r: dict) -> str:
    im = r["images"]
    lines = [f"Images: {im['train']} train + {im['val']} val files, {im['classes']} classes, {im['png']} PNG / "
             f"{im['jpeg']} JPEG, {im['L']} grayscale, {im['CMYK']} CMYK, {im['truncated']} truncated, sides "
             f"{im['min_side']}-{im['max_side']} px. Recipe {r['recipe']}, {r['epochs']} epochs (lambda 0 from epoch "
             f"{r['dilution_epochs']}), {r['batch_size']} images per process per step, {r['num_workers']} workers.",
             "",
             "| run | processes | wall s | train s (epochs) | train images/s | dense top-1 | deployable at start | "
             "best deployable (epoch) | eval top-1, 1 / 2 processes | with ToMe, 1 / 2 processes |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, x in r["runs"].items():
        ev = x.get("eval")
        ev_s = f"{ev['1']['top1']:.2f} / {ev['2']['top1']:.2f}" if ev else "-"
        tome = f"{ev['1']['top1_tome']:.2f} / {ev['2']['top1_tome']:.2f}" if ev and ev["1"]["tome"] else "-"
        lines.append(f"| {name} | {x['processes']} | {x['wall_s']} | {x['train_s']} | "
                     f"{x['train_images_per_s']} | {x['dense_acc']:.2f} | {x['deploy_acc_start']:.2f} | "
                     f"{x['deploy_acc_best']:.2f} ({x['best_epoch']}) | {ev_s} | {tome} |")
    rs = r["resume"]
    two = r["runs"]["two"]
    lines += ["", f"Kill + resume (`two`, killed {two['killed_after_s']} s after its start with "
                  f"{two['epochs_on_disk_at_kill']} epoch(s) on disk; \"{two['resume_line']}\") against the "
                  f"uninterrupted `two_ref`: metrics equal {rs['metrics_equal']}, last/ weights equal "
                  f"{rs['last_weights_equal']}, state weights equal {rs['state_weights_equal']}, EMA equal "
                  f"{rs['ema_equal']}.", ""]
    tome_name = next((x["eval"]["1"]["tome"] for x in r["runs"].values() if x.get("eval")), None)
    if tome_name:
        lines += [f"ToMe column: `{tome_name}`.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
