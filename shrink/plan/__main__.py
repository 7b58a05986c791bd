"""``python -m shrink.plan``: which attention layers to remove and how to merge tokens for a target speed.

    python -m shrink.plan --target-speedup 1.5 --output-dir out/plan          # the embedded digits model
    python -m shrink.plan --model deit_small_patch16_224 --finetune deit_small.pth --data-path /imagenet \\
        --device cpu --batch-size 16 --threads 2 --target-speedup 1.5 --output-dir out/plan_small

Steps: build the model (as main_lambda.py does), read the calibration images (the training split's
deterministic subset), order the layers by the selection criterion, measure (or reuse) the cost table
for this device and batch, enumerate candidates, keep those predicted to meet the target, score the
ones closest to it with the training-free proxy and write plan.yaml (a ``main_lambda.py --config``
file), plan.json, pareto.json, pareto.md and pareto.png into --output-dir.
"""
from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

from shrink.cli.runner import (
    OneLineArgumentParser,
    add_threads_argument,
    apply_threads,
    check_output_dir,
    cli_main,
    parse_device,
    parse_layers,
)
from shrink.errors import ShrinkError

_logger = logging.getLogger("shrink.plan")

DEFAULT_MODEL = "vit_digits"


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Adds '(default: X)' to a flag's help unless the help already says its default or it is None."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "(default" in text or action.default is None or action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return v


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    from shrink.data.datasets import DATA_SETS
    from shrink.plan.cost import RUNTIMES
    from shrink.precision import DTYPES
    from shrink.selection import CRITERIA, get_criterion

    p = OneLineArgumentParser(
        prog="python -m shrink.plan",
        description="Plan a pruned + token-merged model for a target speed: enumerate removal sets (prefixes of "
                    "the selection criterion's order) x ToMe settings, predict each one's latency from a cost "
                    "table measured on this device, score those meeting the target with a training-free proxy "
                    "(KL of the unfine-tuned candidate's outputs from the dense model's on calibration images) "
                    "and write the Pareto front and the chosen plan (plan.yaml for main_lambda.py --config).",
        formatter_class=_Formatter)
    t = p.add_argument_group("target (give exactly one)")
    t.add_argument("--target-speedup", type=_positive_float, default=None,
                   help="predicted speed-up over the dense model, e.g. 1.5")
    t.add_argument("--target-ms", type=_positive_float, default=None,
                   help="predicted milliseconds per batch of --batch-size")
    t.add_argument("--target-gmacs", type=_positive_float, default=None,
                   help="fvcore GMACs per image (attention matmuls counted, as benchmark.py counts them)")
    m = p.add_argument_group("model")
    m.add_argument("--model", default=None, help=f"timm model name (default: the saved one for a --finetune folder, "
                                                 f"else {DEFAULT_MODEL})")
    m.add_argument("--finetune", "--checkpoint", dest="finetune", default=None,
                   help="starting weights: DeiT .pth, .safetensors or a shrink.save folder (written into plan.yaml as "
                        "finetune)")
    m.add_argument("--pretrained", action="store_true",
                   help="download timm's pretrained weights for a hub name (default: the model's local weights when it "
                        "has them, as vit_digits does, else random weights with a warning)")
    m.add_argument("--input-size", type=_positive_int, default=None, help="image side (default: the model's)")
    d = p.add_argument_group("calibration data (as main_lambda.py)")
    d.add_argument("--data-set", default=None, choices=DATA_SETS,
                   help="digits (default without --data-path) | folder (default with --data-path) | cifar10 | cifar100 "
                        "| synthetic")
    d.add_argument("--data-path", default=None, help="root of the data set (folder: DATA_PATH/train and DATA_PATH/val)")
    d.add_argument("--calib-images", type=_positive_int, default=256,
                   help="calibration images (a fixed subset of the train split) for the removal order and the proxy")
    d.add_argument("--num-workers", type=int, default=2, help="data-loader workers for reading the calibration images")
    d.add_argument("--seed", type=int, default=0, help="seed of the calibration subset")
    s = p.add_argument_group("search space")
    s.add_argument("--criterion", default="transfer_entropy", choices=[c for c in CRITERIA if not get_criterion(c).takes_layers],
                   help="selection criterion whose order the removal sets follow (prefixes of it)")
    s.add_argument("--order", default=None,
                   help="the removal order itself, e.g. 3,1,2 (skips the selection; prefixes of it are tried)")
    s.add_argument("--max-remove", type=int, default=None,
                   help="remove at most this many attention layers (default: all but one)")
    s.add_argument("--r-values", default=None,
                   help="ToMe r values to try, e.g. 0,2,4,8 (default: 0 and a grid up to ceil(patches / depth))")
    s.add_argument("--start-idxs", default="0,1,2", help="ToMe start blocks to try (counted among attention blocks)")
    s.add_argument("--policies", default="none,hidden",
                   help="ToMe policies for attention-free blocks to try: none (tokens pass) and/or hidden")
    s.add_argument("--no-merging", action="store_true", help="plan removal only (r = 0)")
    s.add_argument("--no-tome-train", action="store_true",
                   help="plan.yaml: train without merging (tome_train: false; the run still reports top-1 with the "
                        "plan's merging); default: train with it")
    s.add_argument("--max-candidates", type=_positive_int, default=64,
                   help="how many candidates meeting the target the proxy scores (those closest to the target)")
    c = p.add_argument_group("cost model (the device the plan is for)")
    c.add_argument("--device", default="cpu", help="cpu / cuda[:N]: where latency is measured and the proxy runs")
    c.add_argument("--batch-size", type=_positive_int, default=16, help="the batch whose latency is predicted")
    c.add_argument("--dtype", default="fp32", choices=tuple(DTYPES), help="precision of the timed parts")
    c.add_argument("--runtime", default="eager", choices=RUNTIMES, help="what runs the model")
    c.add_argument("--cache-dir", default="out/plan_cache",
                   help="where cost tables are kept, one per model / device / dtype / batch / threads / runtime; a "
                        "table made with other library versions or another CPU/GPU is rebuilt, never used")
    c.add_argument("--rebuild-cost", action="store_true", help="measure the cost table again even when cached")
    c.add_argument("--token-step", type=_positive_int, default=8,
                   help="cost table: time every this many tokens (interpolated between)")
    c.add_argument("--repeats", type=_positive_int, default=5, help="cost table: timed repeats per part (median)")
    add_threads_argument(c)
    o = p.add_argument_group("output")
    o.add_argument("--output-dir", default="out/plan", help="where plan.yaml, plan.json and pareto.* go")
    o.add_argument("--proxy-batch-size", type=_positive_int, default=64, help="images per forward of the proxy")
    o.add_argument("--no-plot", action="store_true", help="skip pareto.png")
    o.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _target(args: argparse.Namespace):
    from shrink.plan.search import Target

    given = [(k, getattr(args, f"target_{k}")) for k in ("speedup", "ms", "gmacs") if getattr(args, f"target_{k}")]
    if len(given) != 1:
        raise ShrinkError("give exactly one of --target-speedup, --target-ms, --target-gmacs"
                          + (f" (got {len(given)})" if given else ""))
    return Target(*given[0])


def _ints(text: str, flag: str) -> list[int]:
    vals = parse_layers(text, flag)
    if not vals or any(v < 0 for v in vals):
        raise ShrinkError(f"{flag}: expected non-negative integers, e.g. 0,1,2, got {text!r}")
    return vals


def check_args(args: argparse.Namespace) -> dict[str, Any]:
    """Every cheap check before a model is built or an image read; returns the parsed lists."""
    from shrink.data.datasets import check_data_path, resolve_data_set
    from shrink.merging.merge import POLICIES
    from shrink.plan.outputs import OUTPUT_FILES

    target = _target(args)
    parse_device(args.device)
    if args.num_workers < 0:
        raise ShrinkError(f"--num-workers must be >= 0, got {args.num_workers}")
    if not 0 <= args.seed < 2**32:
        raise ShrinkError(f"--seed must be an integer from 0 to {2**32 - 1}, got {args.seed}")
    if args.calib_images < 2:
        raise ShrinkError(f"--calib-images must be at least 2, got {args.calib_images}")
    if args.max_remove is not None and args.max_remove < 0:
        raise ShrinkError(f"--max-remove must be >= 0, got {args.max_remove}")
    policies = [x for x in args.policies.replace(" ", "").split(",") if x]
    bad = [x for x in policies if x not in POLICIES]
    if bad or not policies:
        raise ShrinkError(f"--policies: choose from {', '.join(POLICIES)}, got {args.policies!r}")
    parsed = {"target": target, "policies": policies, "start_idxs": _ints(args.start_idxs, "--start-idxs"),
              "r_values": None if args.r_values is None else _ints(args.r_values, "--r-values"),
              "order": None if args.order is None else _ints(args.order, "--order")}
    args.data_set = resolve_data_set(args.data_set, args.data_path)
    check_data_path(args.data_set, args.data_path)
    if args.finetune is not None and not Path(args.finetune).exists():
        raise ShrinkError(f"--finetune: not found: {args.finetune}")
    if args.finetune is not None and args.pretrained:
        raise ShrinkError("give --finetune or --pretrained, not both")
    check_output_dir(args.output_dir, "--output-dir", owned=OUTPUT_FILES)
    return parsed


def _build_model(args: argparse.Namespace, num_classes: int):
    """The dense model as main_lambda.py builds it; (model, name, base config keys for plan.yaml, warnings)."""
    from shrink.modelio.create import create_model, model_skeleton

    warnings: list[str] = []
    is_dir = args.finetune is not None and Path(args.finetune).is_dir()
    name = args.model or (None if is_dir else DEFAULT_MODEL)
    kwargs: dict[str, Any] = {"num_classes": num_classes}
    if args.input_size:
        kwargs["img_size"] = args.input_size
    skeleton = model_skeleton(name, checkpoint=args.finetune if is_dir else None, **kwargs)
    name = skeleton.shrink_arch["name"]
    local = (getattr(skeleton, "pretrained_cfg", None) or {}).get("file")
    base: dict[str, Any] = {"model": name}
    if args.finetune is not None:
        model = create_model(name, checkpoint=args.finetune, **kwargs)
        base["finetune"] = str(Path(args.finetune).resolve())
    elif args.pretrained or (local and Path(local).is_file()):
        model = create_model(name, pretrained=True, **kwargs)
    else:
        import torch

        torch.manual_seed(args.seed)
        model = create_model(name, **kwargs)
        base["pretrained"] = False
        warnings.append(f"{name} has no local weights and neither --finetune nor --pretrained was given: the plan is "
                        f"made for a RANDOM-INIT model (the cost model holds; the proxy's ranking means little)")
    base["data_set"] = args.data_set
    if args.data_path is not None:
        base["data_path"] = str(Path(args.data_path).resolve())
    if args.input_size:
        base["input_size"] = args.input_size
    base["seed"] = args.seed
    return model.eval(), name, base, warnings


def run(args: argparse.Namespace, argv: list[str] | None = None) -> dict[str, Any]:
    """Plan from parsed ``args``: the search result, the written paths, the cost table, warnings, the order."""
    from shrink.blocks.dilution import get_blocks
    from shrink.data.datasets import count_classes
    from shrink.plan.outputs import write_outputs

    t0 = time.perf_counter()
    parsed = check_args(args)
    device = parse_device(args.device)
    progress = not args.quiet
    num_classes = count_classes(args.data_set, args.data_path, default=10)
    model, name, base, warnings = _build_model(args, num_classes)
    for w in warnings:
        _logger.warning(w)
    depth = len(get_blocks(model))
    merging = not args.no_merging and _merging_available(model, name, warnings)
    table, t_cost = _cost_table(model, name, args, device, progress)  # first, on the untouched dense model
    images, labels = _calibration(model, args, num_classes)
    order, criterion, t_sel = _removal_order(model, images, labels, depth, args, parsed, device, progress)
    res, t_search, t_proxy = _search(model, images, labels, order, table, depth, merging, args, parsed, device,
                                     progress)
    record = {"model": name, "argv": list(argv) if argv is not None else sys.argv[1:], "criterion": criterion,
              "calib_images": len(images), "data_set": args.data_set, "warnings": warnings,
              "seconds": {"cost_table": round(t_cost, 2), "selection": round(t_sel, 2), "proxy": round(t_proxy, 2),
                          "search_without_proxy": round(t_search - t_proxy, 3)}, "device": str(device)}
    record["seconds"]["total"] = round(time.perf_counter() - t0, 2)
    key = table.key
    title = f"{name}, {key.device} {key.dtype} batch {key.batch_size}, {key.runtime}"
    paths = write_outputs(res, args.output_dir, table=table, base_config=base, record=record,
                          plot=not args.no_plot, title=title, tome_train=not args.no_tome_train)
    return {"result": res, "paths": paths, "table": table, "warnings": warnings, "order": order}


def _merging_available(model, name: str, warnings: list[str]) -> bool:
    """Whether ToMe can patch ``model``; a warning (logged, added to ``warnings``) when it cannot."""
    from shrink.merging.patch import apply_tome, remove_tome

    try:  # apply_tome checks everything before it changes the model: a cheap probe
        remove_tome(apply_tome(model, 1))
    except ShrinkError as e:
        warnings.append(f"token merging is not available for {name} ({e}); planning layer removal only")
        _logger.warning(warnings[-1])
        return False
    return True


def _cost_table(model, name: str, args: argparse.Namespace, device, progress: bool):
    """The cost table for this device and batch (measured or reused; it copies what it times) and its seconds."""
    from shrink.plan.cost import cached_cost_table

    t_cost = time.perf_counter()
    table = cached_cost_table(model, name, cache_dir=args.cache_dir, device=str(device), dtype=args.dtype,
                              batch_size=args.batch_size, threads=args.threads, runtime=args.runtime,
                              img_size=args.input_size, rebuild=args.rebuild_cost, token_step=args.token_step,
                              repeats=args.repeats, progress=progress)
    return table, time.perf_counter() - t_cost


def _calibration(model, args: argparse.Namespace, num_classes: int):
    """(images, labels): the training split's deterministic calibration subset."""
    from shrink.data.datasets import build_dataset, calibration_subset, reads_files
    from shrink.plan.proxy import load_calibration

    dataset = build_dataset(args.data_set, "train", data_path=args.data_path, input_size=args.input_size, model=model,
                            train_transform=False, synthetic_size=args.calib_images, num_classes=num_classes)
    return load_calibration(calibration_subset(dataset, args.calib_images, seed=args.seed),
                            num_workers=args.num_workers if reads_files(args.data_set) else 0)


def _removal_order(model, images, labels, depth: int, args: argparse.Namespace, parsed: dict[str, Any], device,
                   progress: bool) -> tuple[list[int], str, float]:
    """(the layers in removal order, at most --max-remove of them; the criterion's name; seconds)."""
    from shrink.plan.proxy import removal_order
    from shrink.selection.criteria import candidate_layers

    k = min(depth - 1 if args.max_remove is None else args.max_remove, depth - 1, len(candidate_layers(model)))
    t_sel = time.perf_counter()
    if parsed["order"] is not None:
        from shrink.blocks.dilution import validate_layers

        order = validate_layers(model, parsed["order"])[:k]  # in the given order; repeats refused
        criterion = "manual"
    else:
        order = removal_order(model, images, labels, k=k, criterion=args.criterion, seed=args.seed,
                              batch_size=args.proxy_batch_size, device=device, progress=progress) if k else []
        criterion = args.criterion
    return order, criterion, time.perf_counter() - t_sel


def _search(model, images, labels, order: list[int], table, depth: int, merging: bool, args: argparse.Namespace,
            parsed: dict[str, Any], device, progress: bool):
    """Enumerate the candidates, search them with the proxy: (the result, its seconds, the proxy's seconds)."""
    from shrink.introspect import input_size as model_input_size
    from shrink.plan.proxy import Proxy
    from shrink.plan.search import MacCounter, enumerate_candidates, search

    key = table.key
    n_tok, n_prot = key.num_tokens, key.num_protected
    cands = enumerate_candidates(order, depth, n_tok, n_prot, r_values=parsed["r_values"],
                                 start_idxs=parsed["start_idxs"], policies=parsed["policies"],
                                 merging=merging)
    proxy = Proxy(model, images, labels, batch_size=args.proxy_batch_size, device=device)
    macs = None
    if parsed["target"].kind == "gmacs":
        size = model_input_size(model, args.input_size)
        macs = MacCounter(proxy.built, proxy.model, size, n_tok, n_prot, depth).gmacs
    proxy_s: list[float] = []  # seconds of each proxy call, for the record

    def score(cs):
        t = time.perf_counter()
        try:
            return proxy.score_all(cs, progress=progress)
        finally:
            proxy_s.append(time.perf_counter() - t)

    t_search = time.perf_counter()
    res = search(cands, table, parsed["target"], depth=depth, num_tokens=n_tok, num_protected=n_prot, score=score,
                 gmacs=macs, max_candidates=args.max_candidates, device=str(key.device))
    t_search = time.perf_counter() - t_search
    res.order = list(order)
    return res, t_search, sum(proxy_s)


def _summary(out: dict[str, Any]) -> str:
    from shrink.plan.search import describe

    res = out["result"]
    c = res.chosen
    lines = [f"removal order ({len(out['order'])}): {out['order']}",
             f"candidates: {len(res.entries)} distinct, {res.meeting} meet {res.target.flag} {res.target.value:g}, "
             f"{len(res.scored)} scored, {len(res.front)} on the Pareto front",
             f"chosen: {describe(c.candidate)}",
             f"  predicted {c.predicted_ms:.3f} ms vs dense {res.dense_ms:.3f} ms = {c.predicted_speedup:.3f}x"
             + (f", {c.gmacs:.4g} GMACs" if c.gmacs is not None else ""),
             f"  proxy: KL {c.score.kl:.4g} nats, top-1 agreement {c.score.top1_agreement:.3f}"
             + (f", calibration top-1 {c.score.top1_acc:.3f}" if c.score.top1_acc is not None else "")]
    lines += [f"wrote {', '.join(str(p) for p in out['paths'].values())}"]
    lines.append(f"train it: accelerate launch main_lambda.py --config {out['paths']['plan.yaml']} "
                 f"--output-dir out/planned")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """The CLI: one line and exit code 2 for any input error, checked before the model is built."""
    def body(argv: list[str] | None) -> int:
        args = build_parser().parse_args(argv)
        apply_threads(args.threads)
        out = run(args, argv)
        print(_summary(out))
        return 0

    return cli_main(body, argv)


if __name__ == "__main__":
    sys.exit(main())
