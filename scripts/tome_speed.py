"""Token-merging speed-ups per model and runtime, measured in one process with interleaved repeats.

For each model (random weights, no download) and each r, the configurations "r = 0" (exactly timm)
and "r" are timed in three runtimes: torch eager, ``torch.compile`` (inductor) and ONNX Runtime.
Every repeat times one batch of every (model, r, runtime) in turn, so a slow moment of a shared
machine hits all of them; the speed-up is the median over repeats of the paired ratio to r = 0 in
the same runtime. Writes a JSON record and prints a markdown table (docs/tome.md).

    python scripts/tome_speed.py --models deit_small_patch16_224,eva02_small_patch14_224 --r 8,13 \
        --batch 16 --threads 2 --repeats 7 --out out/tome_speed
"""
from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shrink.bench.measure import prepare_inference  # noqa: E402
from shrink.bench.ort import build_session, prepare_session  # noqa: E402
from shrink.errors import ShrinkError  # noqa: E402
from shrink.io import atomic_write_json, atomic_write_text  # noqa: E402
from shrink.merging.patch import apply_tome, tome_token_counts  # noqa: E402

RUNTIMES = ("eager", "compile", "onnxruntime")


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected non-negative integers, got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="deit_small_patch16_224,eva02_small_patch14_224",
                   help="timm model names, comma-separated (random weights)")
    p.add_argument("--r", type=_ints, default=[8, 13], help="tokens merged per block, comma-separated")
    p.add_argument("--runtimes", default=",".join(RUNTIMES), help=f"comma-separated from {', '.join(RUNTIMES)}")
    p.add_argument("--batch", type=int, default=16, help="images per batch")
    p.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime intra-op threads")
    p.add_argument("--warmup", type=int, default=2, help="warm-up calls per configuration")
    p.add_argument("--repeats", type=int, default=7, help="interleaved timed repeats (one call each)")
    p.add_argument("--out", default="out/tome_speed", help="folder for speed.json and speed.md")
    args = p.parse_args(argv)
    args.runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    bad = [r for r in args.runtimes if r not in RUNTIMES]
    if bad or not args.runtimes:
        p.error(f"unknown runtime(s) {bad}; choose from {', '.join(RUNTIMES)}")
    if args.batch < 1 or args.threads < 1 or args.repeats < 1 or args.warmup < 0:
        p.error("--batch, --threads and --repeats must be >= 1, --warmup >= 0")
    return args


def _variant(name: str, r: int) -> torch.nn.Module:
    model = timm.create_model(name, pretrained=False).eval()
    apply_tome(model, r)
    return model


@torch.inference_mode()
def _max_diff_vs_eager(run: torch.nn.Module, model: torch.nn.Module, size: tuple[int, ...]) -> float:
    """Max |run(x) - model(x)| on one random batch of 2 (0.0 for the eager model itself)."""
    if run is model:
        return 0.0
    x = torch.randn(2, *size, generator=torch.Generator().manual_seed(0))
    return float((run(x) - model(x)).abs().max())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    configs: dict[tuple[str, int, str], object] = {}  # (model, r, runtime) -> TimedModel
    tokens: dict[str, dict[int, list[int]]] = {}
    diffs: dict[tuple[str, int, str], float] = {}  # max |output - eager output| on one batch
    started = datetime.datetime.now(datetime.timezone.utc)
    for name in args.models.split(","):
        probe = timm.create_model(name, pretrained=False)
        size = tuple(probe.pretrained_cfg.get("input_size", (3, 224, 224)))
        tokens[name] = {}
        for r in [0, *args.r]:
            model = _variant(name, r)
            tokens[name][r] = tome_token_counts(model, input_size=size)
            for rt in args.runtimes:
                t0 = time.perf_counter()
                if rt == "onnxruntime":
                    session, info = build_session(model, size, device, threads=args.threads)
                    timed = prepare_session(session, size, args.batch, device, args.warmup, track_memory=False)
                    diffs[(name, r, rt)] = info["max_abs_diff_vs_torch"]
                else:
                    run = torch.compile(model) if rt == "compile" else model
                    timed = prepare_inference(run, size, args.batch, device, torch.float32, max(args.warmup, 1),
                                              track_memory=False)
                    diffs[(name, r, rt)] = _max_diff_vs_eager(run, model, size)
                configs[(name, r, rt)] = timed
                print(f"prepared {name} r={r} {rt} in {time.perf_counter() - t0:.1f} s", flush=True)
    for i in range(args.repeats):  # interleaved: one call of every configuration per repeat
        for timed in configs.values():
            timed.time(1, 1, lambda: None)
        print(f"repeat {i + 1}/{args.repeats} done", flush=True)
    rows = []
    for (name, r, rt), timed in configs.items():
        base = configs[(name, 0, rt)]
        ratios = [b / t for b, t in zip(base.per_call, timed.per_call, strict=True)]
        rows.append({"model": name, "r": r, "runtime": rt, "tokens_out": tokens[name][r][-1],
                     "images_per_s": statistics.median(args.batch / t for t in timed.per_call),
                     "speedup_vs_r0": statistics.median(ratios), "speedup_min": min(ratios),
                     "speedup_max": max(ratios), "max_abs_diff_vs_eager": diffs[(name, r, rt)],
                     "seconds_per_batch": timed.per_call})
    record = {"started_utc": started.isoformat(timespec="seconds"), "batch": args.batch, "threads": args.threads,
              "repeats": args.repeats, "torch": torch.__version__, "timm": timm.__version__,
              "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
              "command": "python scripts/tome_speed.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "rows": rows}
    lines = ["| model | r | tokens after the last block | runtime | img/s (median) | speed-up vs r = 0 (min-max) "
             "| max abs diff vs eager |", "|---|---|---|---|---|---|---|"]
    for row in sorted(rows, key=lambda x: (x["model"], x["runtime"], x["r"])):
        lines.append(f"| {row['model']} | {row['r']} | {row['tokens_out']} | {row['runtime']} | "
                     f"{row['images_per_s']:.1f} | {row['speedup_vs_r0']:.2f}x "
                     f"({row['speedup_min']:.2f}-{row['speedup_max']:.2f}) | {row['max_abs_diff_vs_eager']:.1e} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "speed.json", record)
    atomic_write_text(out / "speed.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except ShrinkError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
