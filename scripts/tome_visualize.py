#!/usr/bin/env python
"""Draw which patches token merging (ToMe) merges for one image, as a PNG.

Example:
    python scripts/tome_visualize.py --checkpoint out/run/best --digit 0 --r 1 --out out/merges.png   # the embedded run
    python scripts/tome_visualize.py --checkpoint RUN/best --image cat.jpg --r 16 --out merges.png
    python scripts/tome_visualize.py --model deit_small_patch16_224 --checkpoint deit_small.pth \
        --image cat.jpg --r 13 --out merges.png
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import shrink  # noqa: E402
from shrink.cli.runner import (  # noqa: E402
    OneLineArgumentParser,
    add_threads_argument,
    apply_threads,
    check_input_file,
    check_output_file,
    cli_main,
)
from shrink.merging.patch import POLICIES, apply_tome  # noqa: E402
from shrink.merging.vis import save_merge_png  # noqa: E402

N_DIGITS = 1797  # images in scikit-learn's digits set


def digit_image(n: int):
    """Image ``n`` of scikit-learn's digits as an 8x8 grayscale PIL image (pixels 0-16 scaled to 0-255)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    pixels = load_digits().images[n]
    return Image.fromarray(np.round(pixels * 255.0 / 16.0).astype(np.uint8), mode="L")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineArgumentParser(
        prog="tome_visualize.py",
        description="Run one image through a ViT with token merging and draw which patches ended up in "
        "the same token (input crop | patch groups filled with their mean colour).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--image", help="input image file (any format PIL reads)")
    src.add_argument("--digit", type=int, metavar="N",
                     help=f"image N (0-{N_DIGITS - 1}) of scikit-learn's 8x8 digits, the embedded data set, "
                          "instead of --image (for the vit_digits models of the embedded run)")
    p.add_argument("--out", required=True, help="output PNG path (written atomically)")
    p.add_argument("--model", default="deit_small_patch16_224",
                   help="timm model name (ignored when --checkpoint is a saved shrink model directory)")
    p.add_argument("--checkpoint", default=None,
                   help="weights: a DeiT .pth / .safetensors file, or a directory written by shrink.save; "
                   "without it the model is randomly initialised (merges then show no meaning)")
    p.add_argument("--img-size", type=int, default=None, help="input resolution (default: the model's)")
    p.add_argument("--r", type=int, default=16, help="tokens merged per merging block")
    p.add_argument("--start-idx", type=int, default=0,
                   help="first merging block, counted among the blocks that still have attention")
    p.add_argument("--policy", choices=POLICIES, default="none",
                   help="attention-free blocks: 'none' passes tokens through (reference), "
                   "'hidden' merges before the MLP on norm2(x)")
    p.add_argument("--seed", type=int, default=0, help="seed for the random initialisation")
    add_threads_argument(p)
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Cheap checks before the model is built: values, the image, the checkpoint and the output path."""
    if args.r < 0:
        raise shrink.ShrinkError(f"--r must be >= 0, got {args.r}")
    if args.start_idx < 0:
        raise shrink.ShrinkError(f"--start-idx must be >= 0, got {args.start_idx}")
    if args.img_size is not None and not 0 < args.img_size <= 16384:
        raise shrink.ShrinkError(f"--img-size must be a positive integer, got {args.img_size}")
    if not 0 <= args.seed < 2**32:
        raise shrink.ShrinkError(f"--seed must be an integer from 0 to {2**32 - 1}, got {args.seed}")
    check_output_file(args.out, "--out", suffixes=(".png",))
    if args.digit is not None:
        if not 0 <= args.digit < N_DIGITS:
            raise shrink.ShrinkError(f"--digit must be from 0 to {N_DIGITS - 1}, got {args.digit}")
    else:
        check_image(args.image)
    if args.checkpoint is not None:
        if not Path(args.checkpoint).exists():
            raise shrink.ShrinkError(f"--checkpoint: not found: {args.checkpoint}")
        if not Path(args.checkpoint).is_dir():
            check_input_file(args.checkpoint, "--checkpoint")


def check_image(path: str) -> None:
    """--image: a file PIL can open, of a sane size."""
    check_input_file(path, "--image")
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            w, h = im.size
            if not math.prod(im.size) <= 100_000_000:
                raise shrink.ShrinkError(f"--image {path} is {w}x{h} pixels; too large")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise shrink.ShrinkError(f"--image {path} is not an image PIL can read ({type(e).__name__})") from None


def main(argv: list[str] | None = None) -> int:
    def body(argv: list[str] | None) -> int:
        args = parse_args(argv)
        check_args(args)
        apply_threads(args.threads)
        import torch

        torch.manual_seed(args.seed)
        kwargs = {"img_size": args.img_size} if args.img_size else {}
        if args.checkpoint is not None and Path(args.checkpoint).is_dir():
            model, name = shrink.create_model(None, checkpoint=args.checkpoint, **kwargs), str(args.checkpoint)
        else:
            model, name = shrink.create_model(args.model, checkpoint=args.checkpoint, **kwargs), args.model
        model.eval()
        apply_tome(model, args.r, start_idx=args.start_idx, policy=args.policy)
        title = f"{name}  r={args.r} start_idx={args.start_idx} policy={args.policy}"
        image = digit_image(args.digit) if args.digit is not None else args.image
        print(save_merge_png(model, image, args.out, title=title))
        return 0

    return cli_main(body, argv)


if __name__ == "__main__":
    sys.exit(main())
