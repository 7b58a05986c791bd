"""Benchmark dense, attention-removed and token-merged models: params, GMACs, speed, memory.

    python benchmark.py --model deit_tiny_patch16_224 --remove-layers 0,2,4 --device cpu

Thin CLI over :func:`shrink.bench.run`; the report schema is documented in docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import logging
import shlex
import sys

from shrink.bench import (
    ALLOCATORS,
    VARIANTS,
    BenchConfig,
    ModelSpec,
    format_markdown,
    parse_compare,
    parse_models,
    parse_runtimes,
    read_plan,
    run,
)
from shrink.cli.runner import (
    OneLineArgumentParser,
    add_threads_argument,
    check_distinct,
    check_output_file,
    cli_main,
    parse_layers,
)
from shrink.errors import ShrinkError


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(
        prog="benchmark.py",
        description="Measure parameters, GMACs (fvcore, attention matmuls included), inference images/s, "
                    "batch-1 latency and peak memory of dense / pruned / ToMe configurations, all in one "
                    "process, and print a markdown table.",
        epilog="JSON schema, metrics and measured numbers: docs/benchmarks.md",
    )
    g = p.add_argument_group("models")
    g.add_argument("--plan", metavar="PLAN.yaml",
                   help="measure the dense model and this plan (a main_lambda.py config written by python -m "
                        "shrink.plan: model, remove_layers, tome_r, tome_inflection, tome_start_idx, tome_policy) "
                        "side by side, interleaved; the table and JSON get the measured 'speedup' and the "
                        "planner's 'predicted_speedup' from PLAN.json beside it (null without it). Instead of "
                        "--model and the configuration flags")
    g.add_argument("--model",
                   help="timm model name(s), comma-separated, or a list file with one "
                        "'name [checkpoint=PATH remove=0,2,4 selection=F ratio=R tome_r=R tome_start=S "
                        "tome_policy=P compare=dense,pruned]' per line (# comments); the flags below are the defaults")
    g.add_argument("--checkpoint", help="a directory written by shrink.save, or a weights file "
                                        "(.pth/.safetensors); one model only (use a list file for several)")
    g.add_argument("--img-size", type=int, help="input resolution (default: the model's own)")
    g.add_argument("--baseline", metavar="MODEL",
                   help="also compare every row with MODEL's dense row (column 'vs MODEL', JSON "
                        "speedup_vs_baseline); MODEL is measured first if no listed model gives its dense row. "
                        "Without it each model is compared only with its own dense row ('speedup')")
    r = p.add_argument_group("configurations")
    rm = r.add_mutually_exclusive_group()
    rm.add_argument("--remove-layers", help="attention layers to remove, e.g. 0,2,4")
    rm.add_argument("--selection", help="selection JSON with a 'layers' list (written by the selection CLI)")
    r.add_argument("--remove-ratio", type=float,
                   help="with --selection: remove its first ratio * depth layers (rounded half up); without "
                        "--selection this is an error (choosing layers needs data)")
    r.add_argument("--tome-r", type=int, help="tokens merged per block for the +tome configurations")
    r.add_argument("--tome-start-idx", type=int, default=0,
                   help="first attention-bearing block that merges tokens (counts attention blocks only; "
                        "default 0)")
    r.add_argument("--tome-policy", default="none", choices=("none", "hidden"),
                   help="ToMe in attention-free blocks: none (default, the reference: no merging) or "
                        "hidden (merge before their MLP)")
    r.add_argument("--compare", help=f"configurations, comma-separated, from {', '.join(VARIANTS)} "
                                     "(default: dense, + pruned with a removal, + ToMe with --tome-r)")
    m = p.add_argument_group("measurement")
    m.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    m.add_argument("--runtime", default="torch",
                   help="torch (default), onnxruntime (alias ort), or both: torch,onnxruntime; onnxruntime "
                        "exports each configuration to ONNX (needs pip install -e '.[deploy]'; fp32 only; "
                        "CUDA execution provider with --device cuda, via onnxruntime-gpu). Speed-ups are "
                        "against dense in the same runtime. See docs/deploy.md")
    m.add_argument("--batch-size", type=int, default=32, help="inference (and training) batch, default 32; halved on out of memory")
    m.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"),
                   help="inference weights and inputs in this dtype (default fp32); training uses autocast")
    m.add_argument("--compile", action="store_true", help="torch.compile(dynamic=False) every configuration")
    m.add_argument("--channels-last", action="store_true", help="channels-last input and weights")
    m.add_argument("--warmup", type=int, help="warm-up iterations (default: 2 on cpu, 10 on cuda)")
    m.add_argument("--iters", type=int, help="timed iterations per repeat (default: 5 on cpu, 40 on cuda)")
    m.add_argument("--repeats", type=int, help="timed repeats; img/s is their median (default: 3)")
    m.add_argument("--no-latency", action="store_true", help="skip the batch-1 latency measurement")
    m.add_argument("--train", action="store_true", help="also measure training-step images/s")
    add_threads_argument(m)  # the one --threads of every command (shrink.cli.runner)
    m.add_argument("--interleave", action="store_true",
                   help="set every configuration up first, then time them round-robin, repeat by repeat, "
                        "so load from other processes hits all alike (not with --compile)")
    m.add_argument("--allocator", default="steady", choices=ALLOCATORS,
                   help="steady (default): keep freed memory in the process (glibc malloc thresholds), so "
                        "CPU timings do not depend on the allocator's history (up to 12%% apart otherwise); "
                        "default: leave malloc as it is. Recorded in the report's environment")
    o = p.add_argument_group("output")
    o.add_argument("--json", help="write the full report (schema shrink.bench/1) here")
    o.add_argument("--csv", help="write one row per configuration here")
    o.add_argument("--plot", help="write a PNG of images/s against GMACs here")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def check_outputs(args: argparse.Namespace) -> None:
    """--json / --csv / --plot are checked before anything is measured (not after the whole benchmark)."""
    check_distinct({"--json": args.json, "--csv": args.csv, "--plot": args.plot})
    for flag, path, suffix in (("--json", args.json, ".json"), ("--csv", args.csv, ".csv"), ("--plot", args.plot, ".png")):
        if path is not None:
            check_output_file(path, flag, suffixes=(suffix,))


def main(argv: list[str] | None = None) -> int:
    return cli_main(_main, argv, prefix="benchmark.py: error: ")


def _main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.getLogger("shrink").setLevel(logging.WARNING)
    try:
        check_outputs(args)
        plan_info = None
        if args.plan is not None:
            specs, plan_info = _plan_specs(args)
        elif args.model is None:
            raise ShrinkError("give --model (or --plan PLAN.yaml)")
        else:
            specs = _model_specs(args)
        cfg = BenchConfig(
            models=specs, device=args.device, batch_size=args.batch_size, precision=args.precision,
            compile=args.compile, channels_last=args.channels_last, img_size=args.img_size, warmup=args.warmup,
            iters=args.iters, repeats=args.repeats, latency=not args.no_latency, train=args.train,
            threads=args.threads, interleave=args.interleave or (plan_info is not None and not args.compile),
            runtimes=parse_runtimes(args.runtime), baseline=args.baseline,
            json_path=args.json, csv_path=args.csv, plot_path=args.plot,
            progress=not args.no_progress, plan=plan_info, allocator=args.allocator,
            command=shlex.join(["python", "benchmark.py", *(sys.argv[1:] if argv is None else argv)]),
        )
        report = run(cfg)
    except ShrinkError as e:
        print(f"benchmark.py: error: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(format_markdown(report))
    return 0


_PLAN_CONFLICTS = ("model", "checkpoint", "remove_layers", "selection", "remove_ratio", "tome_r", "compare", "baseline")


def _plan_specs(args: argparse.Namespace) -> tuple[list[ModelSpec], dict]:
    """--plan: the dense model and the plan of PLAN.yaml (the configuration flags must not be given)."""
    given = [f"--{k.replace('_', '-')}" for k in _PLAN_CONFLICTS if getattr(args, k) is not None]
    given += [f for f, v, d in (("--tome-start-idx", args.tome_start_idx, 0), ("--tome-policy", args.tome_policy, "none"))
              if v != d]
    if given:
        raise ShrinkError(f"--plan takes the model and its configuration from the plan file; drop {', '.join(given)}")
    spec, info = read_plan(args.plan)
    return [spec], info


def _model_specs(args: argparse.Namespace) -> list[ModelSpec]:
    defaults = ModelSpec(
        name="",
        remove_layers=parse_layers(args.remove_layers, "--remove-layers") if args.remove_layers else None,
        selection=args.selection, remove_ratio=args.remove_ratio, tome_r=args.tome_r,
        tome_start_idx=args.tome_start_idx, tome_policy=args.tome_policy, compare=parse_compare(args.compare) if args.compare else None,
    )
    specs = parse_models(args.model, defaults)
    if args.checkpoint is not None:
        if len(specs) != 1:
            raise ShrinkError("--checkpoint needs exactly one model; use a list file with checkpoint=PATH per line")
        specs[0].checkpoint = args.checkpoint
    return specs


if __name__ == "__main__":
    sys.exit(main())
