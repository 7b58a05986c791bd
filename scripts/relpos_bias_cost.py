"""What the mean relative-position bias between merged tokens costs (docs/tome.md, "Families").

1. One block's merged bias, scatter-add (``shrink.merging.relpos.merged_bias``, kept) against the dense
   S B S^T (``merged_bias_dense``), deit-small sized: batch 16, 6 heads, 197 input tokens.
2. A whole forward of a 12-block, 384-wide BEiT and RelPos ViT (random weights) at r = 0 and r = 13,
   and the part of it spent in ``merged_bias``.

    python scripts/relpos_bias_cost.py --threads 1
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import shrink  # noqa: E402
from shrink.merging import relpos as tome_relpos


def _ms(fn, warmup: int = 3, iters: int = 20) -> float:
    for _ in range(warmup):
        fn()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t) / iters * 1e3


def per_block(batch: int, heads: int, n0: int) -> None:
    torch.manual_seed(0)
    for n in (181, 101):
        bias = torch.randn(1, heads, n0, n0)
        where = torch.cat([torch.zeros(1, dtype=torch.long), torch.randint(1, n, (n0 - 1,))]).expand(batch, -1).clone()
        where[:, :n] = torch.arange(n)  # every token holds at least one input token
        size = torch.zeros(batch, n).scatter_add(1, where, torch.ones(batch, n0))
        members = torch.zeros(batch, n, n0).scatter(1, where.unsqueeze(1), 1.0) / size.unsqueeze(-1)
        diff = (tome_relpos.merged_bias(bias, where, size) - tome_relpos.merged_bias_dense(bias, members)).abs().max()
        scatter = _ms(lambda b=bias, w=where, s=size: tome_relpos.merged_bias(b, w, s))
        dense = _ms(lambda b=bias, m=members: tome_relpos.merged_bias_dense(b, m))
        print(f"tokens {n0} -> {n}, batch {batch}, {heads} heads: scatter-add {scatter:.1f} ms, dense {dense:.1f} ms "
              f"per block (max difference {float(diff):.1e})", flush=True)


@torch.inference_mode()
def whole_model(batch: int) -> None:
    torch.manual_seed(0)
    calls: list[float] = []
    orig = tome_relpos.merged_bias

    def timed(*a, **k):
        t = time.perf_counter()
        out = orig(*a, **k)
        calls.append(time.perf_counter() - t)
        return out

    tome_relpos.merged_bias = timed  # the kernels look it up in the module at each call
    try:
        for name in ("beit_base_patch16_224", "vit_relpos_small_patch16_224"):
            m = timm.create_model(name, embed_dim=384, depth=12, num_heads=6, num_classes=10).eval()
            x = torch.randn(batch, 3, 224, 224)
            for r in (0, 13):
                shrink.apply_tome(m, r)
                m(x[:2])
                calls.clear()
                t = time.perf_counter()
                m(x)
                dt = time.perf_counter() - t
                print(f"{name} (12 x 384) r={r} batch {batch}: forward {dt * 1e3:.0f} ms, merged bias "
                      f"{sum(calls) * 1e3:.0f} ms over {len(calls)} blocks", flush=True)
    finally:
        tome_relpos.merged_bias = orig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--batch", type=int, default=16, help="images per batch")
    args = p.parse_args(argv)
    if args.threads < 1 or args.batch < 1:
        p.error("--threads and --batch must be >= 1")
    torch.set_num_threads(args.threads)
    per_block(args.batch, 6, 197)
    whole_model(args.batch)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
