#!/usr/bin/env python
"""Post-norm blocks: the reference dilution rule (s = 2) against the identity rule (s = 1), on digits.

A small post-norm ViT (timm's ``vit_base_patch16_rpn_224`` config: ``ResPostBlock``, no class
token, average pooling) is trained densely on scikit-learn's digits (the project's fixed, stratified
1,437 / 360 split). The same k attention layers are then removed under each rule

    s = 2 (reference):  x = (2 - lam) * x + lam * branch     (lam = 0: x -> 2x, then the MLP)
    s = 1 (identity):   x = x + lam * branch                 (lam = 0: x -> x,  then the MLP)

and, for every fine-tuning seed, the script reports (a) top-1 at lambda = 0 with no fine-tuning and
(b) the final deployable top-1 after fine-tuning with lambda going 1 -> 0 linearly over the first
half of the epochs (set per epoch), then 0; the exported (attention-free) model is checked to give
exactly the lambda = 0 model's outputs. A pre-norm control (timm's ``vit_tiny_patch16_224`` config
built the same small way, same pooling) runs the same comparison. Writes ``results.json`` and
``table.md`` into ``--out``.

    python scripts/postnorm_rule.py --threads 1 --out out/postnorm_rule
"""
from __future__ import annotations

import argparse
import copy
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
from shrink.introspect import num_params  # noqa: E402
from shrink.io import atomic_write_json, atomic_write_text  # noqa: E402

RULES = {"s2_reference": 2.0, "s1_identity": 1.0}
# timm model name -> what the block is. Both are built small with the same arguments (BUILD) so
# that the block type is the only difference; vit_base_patch16_rpn_224 itself sets ResPostBlock,
# qkv_bias=False, init_values=1e-5 (ResPostBlock's initial norm weights), no class token, 'avg' pool.
MODELS = {
    "postnorm": ("vit_base_patch16_rpn_224", "ResPostBlock (post-norm)"),
    "prenorm": ("vit_tiny_patch16_224", "Block (pre-norm)"),
}


def build_model(kind: str, dim: int, depth: int, heads: int):
    import timm

    import shrink  # noqa: F401  (registers the project's models with timm)

    name = MODELS[kind][0]
    kw = dict(img_size=8, patch_size=2, in_chans=1, embed_dim=dim, depth=depth, num_heads=heads, num_classes=10,
              class_token=False, global_pool="avg", qkv_bias=False)
    return timm.create_model(name, **kw)


def load_digits_tensors():
    from shrink.data.datasets import DigitsDataset

    train = DigitsDataset("train", augment=True)
    val = DigitsDataset("val")
    return train, (val.images, val.targets), (train.images, train.targets)


def batches(dataset, batch_size: int, gen):
    """Shuffled (images, labels) batches of ``dataset`` (its augmentation draws from torch's global RNG)."""
    import torch

    order = torch.randperm(len(dataset), generator=gen).tolist()
    for i in range(0, len(order), batch_size):
        items = [dataset[j] for j in order[i:i + batch_size]]
        yield torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


def accuracy(model, x, y, batch_size: int = 512) -> tuple[float, object]:
    """Top-1 (%) and the logits of ``model`` (eval mode, no grad) on the tensors ``x`` / ``y``."""
    import torch

    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
    return 100.0 * float((logits.argmax(1) == y).float().mean()), logits


def train(model, train_set, epochs: int, lr: float, wd: float, batch_size: int, seed: int, smoothing: float,
          on_epoch=None) -> list[float]:
    """AdamW (no decay on 1-D parameters), cosine lr per step, label smoothing; returns mean loss per epoch.

    ``on_epoch(epoch)`` runs before each epoch (it sets lambda)."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    steps = max(1, epochs * math.ceil(len(train_set) / batch_size))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    losses = []
    for epoch in range(epochs):
        if on_epoch is not None:
            on_epoch(epoch)
        model.train()
        total, n = 0.0, 0
        for x, y in batches(train_set, batch_size, gen):
            loss = F.cross_entropy(model(x), y, label_smoothing=smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(y)
            n += len(y)
        losses.append(total / n)
    return losses


def lambda_for(epoch: int, epochs: int) -> float:
    """1 -> 0 linearly over the first half of the epochs (per epoch), then 0."""
    from shrink.blocks.dilution import lambda_reference

    return lambda_reference(epoch, dilution_epochs=max(epochs / 2, 1e-9)) if epochs > 1 else 0.0


def mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def run_model(kind: str, args, train_set, val, calib, log) -> dict:
    import torch

    import shrink

    t0 = time.perf_counter()
    torch.manual_seed(args.dense_seed)
    model = build_model(kind, args.dim, args.depth, args.heads)
    block_types = sorted({type(b).__name__ for b in model.blocks})
    dense_losses = train(model, train_set, args.dense_epochs, args.dense_lr, args.wd, args.batch_size,
                         args.dense_seed, args.smoothing)
    dense_acc, dense_logits = accuracy(model, *val)
    dense_seconds = time.perf_counter() - t0
    log(f"[{kind}] {MODELS[kind][0]} ({', '.join(block_types)}): dense top-1 {dense_acc:.2f}% "
        f"after {args.dense_epochs} epochs ({dense_seconds:.0f} s)")

    if args.layers is not None:
        layers, how = args.layers, "manual"
        te = None
    else:
        cx, cy = calib
        n = min(args.calib_images, len(cx))
        loader = [(cx[i:i + 128], cy[i:i + 128]) for i in range(0, n, 128)]
        sel = shrink.select_layers(model, loader, k=args.k, criterion="transfer_entropy", progress=False)
        layers, how = list(sel.layers), f"transfer_entropy (greedy, {n} train images)"
        te = sel.scores.get("te_of_selection")
    log(f"[{kind}] layers removed: {layers} ({how})")

    rules = {}
    for rule, s in RULES.items():
        probe = shrink.dilute(copy.deepcopy(model), layers, lam=1.0, residual_scale=s)
        _, logits1 = accuracy(probe, *val)
        lam1_diff = float((logits1 - dense_logits).abs().max())
        shrink.set_lambda(probe, 0.0)
        acc0, _ = accuracy(probe, *val)
        runs = []
        for seed in range(args.seeds):
            t1 = time.perf_counter()
            m = shrink.dilute(copy.deepcopy(model), layers, lam=1.0, residual_scale=s)
            curve = []

            def on_epoch(epoch, m=m, curve=curve):
                lam = lambda_for(epoch, args.epochs)
                shrink.set_lambda(m, lam)
                curve.append({"epoch": epoch, "lambda": lam})

            losses = train(m, train_set, args.epochs, args.lr, args.wd, args.batch_size, 1000 + seed,
                           args.smoothing, on_epoch)
            for c, loss in zip(curve, losses, strict=True):
                c["train_loss"] = loss
            shrink.set_lambda(m, 0.0)
            final_acc, logits0 = accuracy(m, *val)
            exported = shrink.export(m)
            exp_acc, logits_exp = accuracy(exported, *val)
            runs.append({
                "seed": seed, "final_deploy_acc": final_acc, "export_acc": exp_acc,
                "export_equal": bool(torch.equal(logits0, logits_exp)),
                "export_max_abs_diff": float((logits0 - logits_exp).abs().max()),
                "export_params": num_params(exported),
                "curve": curve, "seconds": time.perf_counter() - t1,
            })
            log(f"[{kind}] {rule} seed {seed}: lambda=0 untrained {acc0:.2f}% -> fine-tuned deployable "
                f"{final_acc:.2f}% (export equal: {runs[-1]['export_equal']}, {runs[-1]['seconds']:.0f} s)")
        finals = [r["final_deploy_acc"] for r in runs]
        mean, std = mean_std(finals)
        rules[rule] = {"residual_scale": s, "lam1_max_abs_diff_vs_dense": lam1_diff,
                       "acc_lam0_no_finetune": acc0, "final_deploy_acc_mean": mean, "final_deploy_acc_std": std,
                       "runs": runs}
    return {"timm_model": MODELS[kind][0], "block": MODELS[kind][1], "block_types": block_types,
            "dense_acc": dense_acc, "dense_final_train_loss": dense_losses[-1] if dense_losses else None,
            "dense_seconds": dense_seconds, "dense_params": num_params(model),
            "layers": layers, "selection": how, "te_of_selection": te,
            "default_residual_scale": _default_scale(model, layers), "rules": rules,
            "seconds": time.perf_counter() - t0}


def _default_scale(model, layers) -> float:
    """The residual scale shrink.dilute picks for these blocks when none is given."""
    import shrink

    m = shrink.dilute(copy.deepcopy(model), layers)
    scales = {b.residual_scale for b in shrink.diluted_blocks(m).values()}
    return scales.pop() if len(scales) == 1 else sorted(scales)


def markdown_table(results: dict) -> str:
    seeds = results["args"]["seeds"]
    std_note = "sample std (n - 1)" if seeds > 1 else "one seed, no std"
    lines = [
        f"Digits, {results['data']['train']} train / {results['data']['val']} val; top-1 (%) on val. "
        f"Fine-tuning: {results['args']['epochs']} epochs, lambda 1 -> 0 over the first half; "
        f"mean ± {std_note} over {seeds} seed(s).",
        "",
        "| model (block) | layers removed | dense | rule | s | lambda = 0, no fine-tuning | fine-tuned deployable "
        "(mean ± std) | per seed | export == lambda = 0 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, r in results["models"].items():
        for rule, v in r["rules"].items():
            default = " (default)" if v["residual_scale"] == r["default_residual_scale"] else ""
            per_seed = ", ".join(f"{x['final_deploy_acc']:.2f}" for x in v["runs"])
            eq = all(x["export_equal"] for x in v["runs"])
            lines.append(f"| {kind} ({r['block_types'][0]}) | {r['layers']} | {r['dense_acc']:.2f} | {rule}{default} "
                         f"| {v['residual_scale']:g} | {v['acc_lam0_no_finetune']:.2f} "
                         f"| {v['final_deploy_acc_mean']:.2f} ± {v['final_deploy_acc_std']:.2f} | {per_seed} "
                         f"| {'yes' if eq else 'NO'} |")
    lines += ["", f"Command: `{results['command']}`; {results['seconds']:.0f} s wall; {results['date']}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    return cli_main(_main, argv)


def _layers(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices, got {text!r}") from None


def _main(argv: list[str] | None) -> int:
    p = OneLineArgumentParser(description=__doc__.split("\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="out/postnorm_rule", help="output folder")
    p.add_argument("--models", default="postnorm,prenorm", help="comma-separated: postnorm, prenorm (the control)")
    p.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds per rule (0 .. N-1)")
    p.add_argument("--epochs", type=int, default=20, help="fine-tuning epochs (lambda reaches 0 at half of them)")
    p.add_argument("--dense-epochs", type=int, default=60, help="dense training epochs")
    p.add_argument("--dense-seed", type=int, default=0, help="seed of the dense model (init and data order)")
    p.add_argument("--dense-lr", type=float, default=3e-3, help="dense lr (AdamW, cosine to 0)")
    p.add_argument("--lr", type=float, default=1e-3, help="fine-tuning lr (AdamW, cosine to 0)")
    p.add_argument("--wd", type=float, default=0.05)
    p.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--k", type=int, default=2, help="attention layers removed (chosen by transfer entropy)")
    p.add_argument("--layers", type=_layers, default=None, help="remove these layers instead, e.g. 0,1")
    p.add_argument("--calib-images", type=int, default=512, help="train images for the transfer-entropy selection")
    add_threads_argument(p)
    args = p.parse_args(argv)
    apply_threads(args.threads)
    kinds = [k.strip() for k in args.models.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in MODELS]
    if unknown or not kinds:
        raise ShrinkError(f"--models: unknown {unknown or args.models!r}; choose from {', '.join(MODELS)}")
    if args.seeds < 1 or args.epochs < 1 or args.dense_epochs < 0:
        raise ShrinkError("--seeds and --epochs must be >= 1, --dense-epochs >= 0")

    import torch

    out = Path(args.out) if Path(args.out).is_absolute() else Path.cwd() / args.out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train_set, val, calib = load_digits_tensors()
    cmd = shlex.join(["python", *([sys.argv[0]] if argv is None else ["scripts/postnorm_rule.py"]),
                      *(sys.argv[1:] if argv is None else argv)])

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", flush=True)

    results = {
        "command": cmd,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": {"platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
        "args": {k: v for k, v in vars(args).items()},
        "data": {"set": "sklearn digits", "train": len(train_set), "val": len(val[1]),
                 "split": "stratified, seed 0 (shrink.data.datasets.DigitsDataset)", "augment": "random 1-pixel shift"},
        "rules": {k: f"x = ({v:g} - {v - 1:g} * lam) * x + lam * branch" for k, v in RULES.items()},
        "schedule": "lambda = max(0, 1 - epoch / (epochs / 2)), set per epoch; deployable = lambda 0 / export",
        "models": {},
    }
    import timm

    results["machine"]["timm"] = timm.__version__
    for kind in kinds:
        results["models"][kind] = run_model(kind, args, train_set, val, calib, log)
        results["seconds"] = time.perf_counter() - t0
        atomic_write_json(out / "results.json", results)
    table = markdown_table(results)
    atomic_write_text(out / "table.md", table)
    print(table, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
