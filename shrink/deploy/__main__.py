"""``python -m shrink.deploy``: export a saved or named model to ONNX or a torch.export program (.pt2).

The command-line face of :mod:`shrink.deploy`: flags checked (and the output path) before any
model is built, one-line errors through :func:`shrink.cli.runner.cli_main`.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from torch import nn

from shrink.blocks.attention_free import export
from shrink.blocks.dilution import dilute, validate_layers
from shrink.cli.runner import (
    OneLineArgumentParser,
    add_threads_argument,
    apply_threads,
    cli_main,
    parse_layers,
)
from shrink.deploy import FORMATS, MIN_OPSET, deploy, get_format, require_deploy_extra, sidecar_path
from shrink.errors import ShrinkError
from shrink.modelio.create import create_model, load
from shrink.training.run_folder import DEPLOY, check_outside_run


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(
        prog="python -m shrink.deploy",
        description="Export a dense, pruned (attention-free) or token-merged ViT to ONNX or a torch.export "
                    "program (.pt2), check it against eager PyTorch, and write it with its metadata.",
        epilog="Details and measured ONNX Runtime speed: docs/deploy.md",
    )
    p.add_argument("--checkpoint", help="a directory written by shrink.save (e.g. out/run/best), or with --model "
                                        "a weights file (.pth/.safetensors)")
    p.add_argument("--model", help="timm model name (random init unless --checkpoint FILE); for a saved "
                                   "directory it is read from config.json")
    p.add_argument("--remove-layers", help="with --model: remove these attention layers first (dilute at "
                                           "lambda 0 + export), e.g. 0,2,4")
    p.add_argument("--format", default="onnx", choices=FORMATS, help="onnx (default) or pt2 (torch.export)")
    p.add_argument("--output", help="output file (default: for a saved directory DIR/NAME, DIR/deploy/NAME.<format>, "
                                    "e.g. out/run/deploy/best.onnx; for a weights file, its name with the format's "
                                    "suffix); a sidecar <output>.json is written beside it")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--batch-size", type=int, default=1,
                   help="example batch (default 1); the exact batch with --static-batch")
    p.add_argument("--static-batch", action="store_true", help="fix the batch dimension (default: dynamic)")
    p.add_argument("--img-size", type=int, help="input resolution (default: the model's own)")
    p.add_argument("--fold", action="store_true", help="fold the factor 2 of attention-free blocks into later weights")
    p.add_argument("--tome-r", type=int, help="apply ToMe: tokens merged per block (fixed r: static shapes)")
    p.add_argument("--tome-start-idx", type=int, default=0, help="first attention block that merges (default 0)")
    p.add_argument("--tome-policy", default="none", choices=("none", "hidden"),
                   help="ToMe in attention-free blocks (default none)")
    p.add_argument("--opset", type=int, help=f"ONNX opset (>= {MIN_OPSET}; default: the exporter's)")
    p.add_argument("--no-verify", action="store_true", help="skip the comparison with eager PyTorch")
    p.add_argument("-q", "--quiet", action="store_true", help="no summary line")
    add_threads_argument(p)
    return p


def _validate_args(args: argparse.Namespace) -> Path:
    if args.checkpoint is None and args.model is None:
        raise ShrinkError("give --checkpoint (a saved model directory) or --model NAME")
    ckpt = Path(args.checkpoint) if args.checkpoint else None
    if ckpt is not None and not ckpt.exists():
        raise ShrinkError(f"checkpoint not found: {ckpt}")
    if ckpt is not None and ckpt.is_file() and args.model is None:
        raise ShrinkError(f"{ckpt} is a weights file: give --model NAME as well (or pass a shrink.save directory)")
    if args.remove_layers and args.model is None:
        raise ShrinkError("--remove-layers needs --model (a saved directory already records its removed layers)")
    if args.batch_size < 1:
        raise ShrinkError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.img_size is not None and args.img_size < 1:
        raise ShrinkError(f"--img-size must be >= 1, got {args.img_size}")
    if args.tome_r is not None and args.tome_r < 0:
        raise ShrinkError(f"--tome-r must be >= 0, got {args.tome_r}")
    if args.tome_start_idx < 0:
        raise ShrinkError(f"--tome-start-idx must be >= 0, got {args.tome_start_idx}")
    if args.tome_r is None and (args.tome_start_idx != 0 or args.tome_policy != "none"):
        raise ShrinkError("--tome-start-idx / --tome-policy need --tome-r")
    fmt = get_format(args.format)
    if args.opset is not None and "opset" not in fmt.options:
        with_opset = ", ".join(n for n in FORMATS if "opset" in get_format(n).options)
        raise ShrinkError(f"--opset applies to --format {with_opset} only")
    if args.opset is not None and args.opset < MIN_OPSET:
        raise ShrinkError(f"--opset must be >= {MIN_OPSET}, got {args.opset}")
    require_deploy_extra(fmt.needs)
    if args.output:
        out = Path(args.output)
    elif ckpt is not None:  # RUN/best -> RUN/deploy/best.onnx: a run's folder keeps deploy/ for this
        c = ckpt.resolve()
        out = c.parent / DEPLOY / (c.name + "." + args.format) if c.is_dir() else c.with_suffix("." + args.format)
    else:
        raise ShrinkError("--model without --checkpoint needs --output")
    if out.suffix != "." + args.format:
        raise ShrinkError(f"--output must end in .{args.format} for --format {args.format}, got {out}")
    if out.is_dir():
        raise ShrinkError(f"--output {out} is a directory")
    check_outside_run(out, "--output")
    for f in (out, sidecar_path(out)):
        if f.exists() and not args.overwrite:
            raise ShrinkError(f"{f} exists; pass --overwrite to replace it")
    parent = out.parent if str(out.parent) else Path(".")
    existing = parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ShrinkError(f"cannot write to {parent}: not a writable directory")
    return out


def _load_model(args: argparse.Namespace) -> nn.Module:
    ckpt = Path(args.checkpoint) if args.checkpoint else None
    if ckpt is not None and ckpt.is_dir():
        if args.img_size is not None:
            raise ShrinkError("--img-size cannot change a saved model's input size")
        model = load(ckpt)
        arch = getattr(model, "shrink_arch", {}).get("name")
        if args.model is not None and arch != args.model:
            raise ShrinkError(f"{ckpt} holds a {arch}, not a {args.model}")
        return model.eval()
    kwargs = {"img_size": args.img_size} if args.img_size is not None else {}
    model = create_model(args.model, checkpoint=ckpt, **kwargs).eval()
    if args.remove_layers:
        layers = validate_layers(model, parse_layers(args.remove_layers, "--remove-layers"))
        dilute(model, layers, lam=0.0)
        export(model, inplace=True)
    return model


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    out = _validate_args(args)  # every flag and the output path, before any model is built
    missing = [p for p in out.parents if not p.exists()]  # folders the write will make (deepest first)
    apply_threads(args.threads)
    try:
        model = _load_model(args)
        meta = deploy(model, out, args.format, fold=args.fold, tome_r=args.tome_r,
                      tome_start_idx=args.tome_start_idx, tome_policy=args.tome_policy, batch_size=args.batch_size,
                      dynamic_batch=not args.static_batch, opset=args.opset, verify=not args.no_verify)
    except BaseException:
        for p in missing:  # a failed export leaves nothing behind, not even an empty deploy/
            try:
                p.rmdir()
            except OSError:
                break
        raise
    if not args.quiet:
        v = meta.get("verified")
        check = f"; max |exported - eager| = {v['max_abs_diff']:.2e} at batch {v['batches']}" if v else ""
        batch = "dynamic batch" if meta["batch"]["dynamic"] else f"batch {meta['batch']['size']}"
        print(f"wrote {out} ({args.format}, {out.stat().st_size / 2**20:.1f} MiB, {batch}, removed attention "
              f"{meta['removed_attention_layers']}, ToMe {'r=' + str(meta['tome']['r']) if meta['tome'] else 'off'})"
              f"{check} and {sidecar_path(out)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m shrink.deploy``: one-line errors, exit code 2."""
    return cli_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
