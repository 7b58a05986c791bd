#!/usr/bin/env python
"""Draw which patches token merging (ToMe) merges for one image, as a PNG.

Example:
    python scripts/tome_visualize.py --checkpoint out/best --image cat.jpg --r 16 --out merges.png
    python scripts/tome_visualize.py --model deit_small_patch16_224 --checkpoint deit_small.pth \
        --image cat.jpg --r 13 --out merges.png
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import shrink  # noqa: E402
from shrink.tome import POLICIES, apply_tome  # noqa: E402
from shrink.tome_vis import save_merge_png  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Run one image through a ViT with token merging and draw which patches ended up in "
        "the same token (input crop | patch groups filled with their mean colour).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--image", required=True, help="input image file (any format PIL reads)")
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
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if not str(args.out).lower().endswith(".png"):
            raise shrink.ShrinkError(f"--out must be a .png file, got {args.out}")
        if not Path(args.image).is_file():
            raise shrink.ShrinkError(f"image not found: {args.image}")
        import torch

        torch.manual_seed(args.seed)
        kwargs = {"img_size": args.img_size} if args.img_size else {}
        if args.checkpoint is not None and Path(args.checkpoint).is_dir():
            model, name = shrink.load(args.checkpoint), str(args.checkpoint)
        else:
            model, name = shrink.create_model(args.model, checkpoint=args.checkpoint, **kwargs), args.model
        model.eval()
        apply_tome(model, args.r, start_idx=args.start_idx, policy=args.policy)
        title = f"{name}  r={args.r} start_idx={args.start_idx} policy={args.policy}"
        out = save_merge_png(model, args.image, args.out, title=title)
    except shrink.ShrinkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
