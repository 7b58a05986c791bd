#!/usr/bin/env python
"""Compare shrink's token merging with the official ToMe code (facebookresearch/ToMe).

The official package is NOT part of this project and is never vendored: point ``--official-path``
at a checkout of it (the folder that holds ``tome/``), e.g. one extracted with
``git --git-dir=<mirror> archive HEAD | tar -x -C /tmp/tome_official``.

  logits  max |logit difference| and token counts, official vs project, per model and r, on
          random-initialised timm models (the project with unfused and with fused attention),
          plus the (r, inflection) ramp against the official ``parse_r``
  speed   images/s of plain timm, the project and the official code at each r, timed
          round-robin in one process (A, B, C, A, B, C, ...), medians over the repeats
  attention  proportional attention alone, four ways (no official code needed): the official
          explicit softmax, SDPA with log(size) as an additive mask (the project), SDPA with
          log(size) as an extra query/key channel (no mask; head dim padded to a multiple of 8),
          and SDPA without any size (the floor)

    python scripts/tome_vs_official.py --official-path /tmp/tome_official logits
    python scripts/tome_vs_official.py --official-path /tmp/tome_official speed \\
        --model deit_small_patch16_224 --r 0,8,13,16 --batch 16
    python scripts/tome_vs_official.py attention --device cuda --dtype bf16 --batch 256
"""
from __future__ import annotations

import argparse
import copy
import importlib
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import timm  # noqa: E402

from shrink.cli.runner import OneLineArgumentParser, add_threads_argument, apply_threads, cli_main  # noqa: E402
from shrink.errors import ShrinkError  # noqa: E402
from shrink.merging.merge import ramp  # noqa: E402
from shrink.merging.patch import apply_tome, tome_token_counts  # noqa: E402
from shrink.precision import DTYPES  # noqa: E402


def load_official(path: str | Path | None):
    """Import the official ``tome`` package from ``path`` (the folder that contains ``tome/``)."""
    if not path:
        raise ShrinkError("this command needs --official-path (the folder that holds the official tome/ package)")
    folder = Path(path).expanduser().resolve()
    if not (folder / "tome" / "patch" / "timm.py").is_file():
        raise ShrinkError(f"no official ToMe code at {folder} (expected {folder}/tome/patch/timm.py); fetch "
                          "facebookresearch/ToMe and pass the folder that holds tome/")
    sys.path.insert(0, str(folder))
    try:
        tome = importlib.import_module("tome")
        importlib.import_module("tome.patch.timm")
        importlib.import_module("tome.utils")
    except Exception as e:  # noqa: BLE001 - any import failure is the user's setup
        raise ShrinkError(f"cannot import the official ToMe code from {folder}: {type(e).__name__}: {e}") from None
    finally:
        sys.path.remove(str(folder))
    if not str(Path(tome.__file__).resolve()).startswith(str(folder)):
        raise ShrinkError(f"'tome' was imported from {tome.__file__}, not from {folder}")
    return tome


def parse_r_list(text: str) -> list[int]:
    """'0,8,13' or '1-13' (or a mix) -> list of ints."""
    out: list[int] = []
    try:
        for part in text.split(","):
            if "-" in part:
                lo, hi = part.split("-")
                out.extend(range(int(lo), int(hi) + 1))
            elif part:
                out.append(int(part))
    except ValueError:
        raise ShrinkError(f"expected integers or ranges like 0,8,13 or 1-13, got {text!r}") from None
    return out


def official_model(tome, base: torch.nn.Module, r) -> torch.nn.Module:
    m = copy.deepcopy(base)
    tome.patch.timm(m)
    m.r = r
    return m


def project_model(base: torch.nn.Module, r, fused: bool) -> torch.nn.Module:
    m = copy.deepcopy(base)
    apply_tome(m, r)
    for mod in m.modules():
        if hasattr(mod, "fused_attn"):
            mod.fused_attn = fused
    return m


def _logits(out) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


def _official_counts(tome, model: torch.nn.Module, x: torch.Tensor) -> list[int]:
    counts: list[int] = []
    hooks = [b.register_forward_hook(lambda _m, _i, o: counts.append(int(o.shape[1]))) for b in model.blocks]
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
    return counts


@torch.inference_mode()
def cmd_logits(tome, args: argparse.Namespace) -> int:
    print(f"torch {torch.__version__}, timm {timm.__version__}, batch {args.batch}, {args.img_size} px, "
          f"seed {args.seed}, fp32")
    print("| model | r | tokens after the last block | same counts | max abs diff (unfused) | max abs diff (fused) |")
    print("|---|---|---|---|---|---|")
    for name in args.models.split(","):
        torch.manual_seed(args.seed)
        base = timm.create_model(name, img_size=args.img_size).eval()
        x = torch.randn(args.batch, 3, args.img_size, args.img_size, generator=torch.Generator().manual_seed(1))
        schedules: list = list(parse_r_list(args.r)) + [(13, -0.5), (8, 0.5)]
        for r in schedules:
            off = official_model(tome, base, r)
            ref = _logits(off(x))
            counts_off = _official_counts(tome, off, x)
            diffs = []
            for fused in (False, True):
                prj = project_model(base, r, fused)
                diffs.append(float((_logits(prj(x)) - ref).abs().max()))
            counts_prj = tome_token_counts(prj, input_size=args.img_size, batch=1)
            print(f"| {name} | {r} | {counts_prj[-1]} | {counts_prj == counts_off} | {diffs[0]:.2e} | {diffs[1]:.2e} |")
    bad = []
    for depth in (1, 2, 3, 7, 12, 24):
        for r in range(0, 33):
            for infl in (-1.0, -0.75, -0.5, -0.3, -0.1, 0.0, 0.1, 0.25, 0.5, 0.7, 1.0):
                try:
                    want = tome.utils.parse_r(depth, (r, infl))
                except ZeroDivisionError:  # the official formula divides by depth - 1
                    continue
                if ramp(r, infl, depth) != want:
                    bad.append((depth, r, infl))
    print(f"\nramp vs official parse_r: {len(bad)} mismatches over depths 2..24, r 0..32, 11 inflections"
          + (f": {bad[:5]}" if bad else ""))
    return 0 if not bad else 1


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], object], iters: int, clock: Callable[[], float], device: torch.device) -> float:
    _sync(device)
    t0 = clock()
    for _ in range(iters):
        fn()
    _sync(device)
    return clock() - t0


def _interleaved(runs: dict[str, Callable[[], object]], args: argparse.Namespace,
                 device: torch.device) -> dict[str, list[float]]:
    """Seconds per repeat of every run, timed round-robin after the warm-up."""
    for fn in runs.values():
        for _ in range(args.warmup):
            fn()
    # wall: time.perf_counter; cpu: this process's CPU time (less sensitive to other processes on a
    # shared machine; meaningful with --threads 1, where it counts the work of the one thread)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    secs: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.repeats):
        for k, fn in runs.items():
            secs[k].append(_time(fn, args.iters, clock, device))
    return secs


def _device(args: argparse.Namespace) -> torch.device:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ShrinkError("--device cuda but CUDA is not available")
    apply_threads(args.threads)
    return device


def _header(args: argparse.Namespace, device: torch.device) -> str:
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    return (f"batch {args.batch}, {args.dtype}, {where}, {args.repeats} interleaved repeats x {args.iters} iters "
            f"(warm-up {args.warmup}), {args.clock} clock; torch {torch.__version__}, timm {timm.__version__}")


@torch.inference_mode()
def cmd_speed(tome, args: argparse.Namespace) -> int:
    device = _device(args)
    dtype = DTYPES[args.dtype]
    torch.manual_seed(args.seed)
    base = timm.create_model(args.model, img_size=args.img_size).eval().to(device=device, dtype=dtype)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device, dtype=dtype)
    configs: dict[str, torch.nn.Module] = {"timm": base}
    for r in parse_r_list(args.r):
        configs[f"project r={r}"] = project_model(base, r, fused=True)
        configs[f"official r={r}"] = official_model(tome, base, r)
    runs = {k: (lambda m=m: m(x)) for k, m in configs.items()}
    secs = _interleaved(runs, args, device)
    ips = {k: [args.batch * args.iters / s for s in v] for k, v in secs.items()}
    med = {k: statistics.median(v) for k, v in ips.items()}

    def paired(a: str, b: str) -> float:  # median over repeats of the per-repeat ratio a/b
        return statistics.median(x / y for x, y in zip(ips[a], ips[b], strict=True))

    print(f"{args.model}, {args.img_size} px, " + _header(args, device))
    print("| configuration | img/s (median) | vs timm | project / official |")
    print("|---|---|---|---|")
    for k in runs:
        vs_off = ""
        if k.startswith("project"):
            vs_off = f"{paired(k, 'official' + k[len('project'):]):.2f}x"
        print(f"| {k} | {med[k]:.1f} | {paired(k, 'timm'):.2f}x | {vs_off} |")
    return 0


def _attention_variants(q, k, v, size, scale):
    """name -> callable computing softmax(q k^T * scale + log(size)) v over (B, H, N, D) heads."""
    bias = size.log().to(q.dtype).squeeze(-1)[:, None, None, :]
    d = q.shape[-1]
    pad = (-(d + 1)) % 8 + 1  # one extra channel, then up to a multiple of 8
    b, h, n, _ = q.shape
    q_extra = q.new_zeros(b, h, n, pad)
    q_extra[..., 0] = 1.0
    k_extra = k.new_zeros(b, h, n, pad)
    k_extra[..., 0] = (size.log().squeeze(-1) / scale).to(k.dtype)[:, None, :]
    v_extra = v.new_zeros(b, h, n, pad)

    def explicit():  # the official ToMe attention
        return ((q @ k.transpose(-2, -1)) * scale + bias).softmax(dim=-1) @ v

    def sdpa_mask():  # the project: log(size) as an additive float mask
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)

    def sdpa_channel():  # log(size) as an extra q/k channel: no mask (built per call, as a block would)
        q2 = torch.cat([q, q_extra], dim=-1)
        k2 = torch.cat([k, k_extra], dim=-1)
        v2 = torch.cat([v, v_extra], dim=-1)
        return F.scaled_dot_product_attention(q2, k2, v2, scale=scale)[..., :d]

    def sdpa_plain():  # no sizes at all: the floor
        return F.scaled_dot_product_attention(q, k, v, scale=scale)

    return {"official explicit": explicit, "SDPA + mask": sdpa_mask, "SDPA + channel": sdpa_channel,
            "SDPA, no sizes": sdpa_plain}


@torch.inference_mode()
def cmd_attention(args: argparse.Namespace) -> int:
    device = _device(args)
    dtype = DTYPES[args.dtype]
    gen = torch.Generator(device="cpu").manual_seed(args.seed)
    print(f"heads {args.heads} x {args.head_dim}, " + _header(args, device))
    print("| tokens | implementation | ms per call (median) | vs SDPA + mask | max abs diff vs explicit |")
    print("|---|---|---|---|---|")
    for n in parse_r_list(args.tokens):
        q, k, v = (torch.randn(args.batch, args.heads, n, args.head_dim, generator=gen).to(device, dtype)
                   for _ in range(3))
        size = torch.randint(1, 6, (args.batch, n, 1), generator=gen).float().to(device)
        fns = _attention_variants(q, k, v, size, args.head_dim ** -0.5)
        ref = fns["official explicit"]().float()
        secs = _interleaved(fns, args, device)
        ms = {name: statistics.median(s) / args.iters * 1e3 for name, s in secs.items()}
        for name, fn in fns.items():
            diff = float((fn().float() - ref).abs().max())
            print(f"| {n} | {name} | {ms[name]:.3f} | {ms['SDPA + mask'] / ms[name]:.2f}x | {diff:.1e} |")
    return 0


def _timing_args(p: argparse.ArgumentParser, batch: int, iters: int, repeats: int) -> None:
    p.add_argument("--batch", type=int, default=batch)
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=iters)
    p.add_argument("--repeats", type=int, default=repeats)
    add_threads_argument(p)
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall time, or this process's CPU time (CPU only; use with --threads 1 on a shared machine)")


def main(argv: Sequence[str] | None = None) -> int:
    ap = OneLineArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official-path", help="folder that holds the official tome/ package (logits, speed)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--img-size", type=int, default=224)
    sub = ap.add_subparsers(dest="cmd", required=True)
    lg = sub.add_parser("logits", help="max |logit diff| official vs project; ramp vs parse_r")
    lg.add_argument("--models", default="deit_tiny_patch16_224,deit_small_patch16_224,deit_tiny_distilled_patch16_224")
    lg.add_argument("--r", default="1-13", help="e.g. 1-13 or 0,8,13 (two ramps are always added)")
    lg.add_argument("--batch", type=int, default=4)
    sp = sub.add_parser("speed", help="interleaved images/s: timm, project and official at each r")
    sp.add_argument("--model", default="deit_small_patch16_224")
    sp.add_argument("--r", default="0,8,13,16")
    _timing_args(sp, batch=16, iters=2, repeats=11)
    at = sub.add_parser("attention", help="proportional attention alone: explicit, SDPA + mask, SDPA + channel")
    at.add_argument("--tokens", default="197,120,60")
    at.add_argument("--heads", type=int, default=6)
    at.add_argument("--head-dim", type=int, default=64)
    _timing_args(at, batch=16, iters=5, repeats=9)

    def body(argv: Sequence[str] | None) -> int:
        args = ap.parse_args(argv)
        if args.cmd == "attention":
            return cmd_attention(args)
        tome = load_official(args.official_path)
        return cmd_logits(tome, args) if args.cmd == "logits" else cmd_speed(tome, args)

    return cli_main(body, argv)


if __name__ == "__main__":
    sys.exit(main())
