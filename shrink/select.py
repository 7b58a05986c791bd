"""``python -m shrink.select``: choose the attention layers to remove and show why.

Prints a per-layer table (entropy of each attention and MLP output, cosine importance, block
influence, TE at each greedy step, the chosen order) and writes ``selection.json`` and
``selection.png`` into ``--output-dir``.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from shrink.cli.runner import (
    OneLineArgumentParser,
    add_threads_argument,
    apply_threads,
    check_output_dir,
    cli_main,
    parse_device,
    parse_layers,
)
from shrink.data.datasets import DATA_SETS, get_data_set
from shrink.errors import ShrinkError
from shrink.io import atomic_write_json
from shrink.models.vit_digits import DENSE_WEIGHTS
from shrink.precision import dtype_of
from shrink.selection.layers import layer_table, plot_selection, select_layers
from shrink.selection.registry import CRITERIA, get_criterion

DEFAULT_MODEL = "vit_digits"
DEFAULT_CHECKPOINT = DENSE_WEIGHTS  # the embedded demo's dense weights, shipped with shrink.models
AMP_CHOICES = ("auto", "bf16", "fp16", "off")


def add_data_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The data flags (main_lambda.py takes the same ones from RunConfig's fields)."""
    g = parser.add_argument_group("data")
    g.add_argument("--data-set", default=None, choices=DATA_SETS,
                   help="digits: scikit-learn's 8x8 digits, shipped offline (default without --data-path); folder: "
                        "ImageNet-style DATA_PATH/train and DATA_PATH/val (default with --data-path); "
                        "cifar10/cifar100: torchvision (downloads into DATA_PATH where the network allows); "
                        "synthetic: random images (smoke tests, benchmarks)")
    g.add_argument("--data-path", default=None, help="root of the data set (folder / cifar)")
    g.add_argument("--input-size", type=int, default=None,
                   help="image side in pixels (default: the model's pretrained_cfg input size)")
    g.add_argument("--num-workers", type=int, default=2, help="data-loader worker processes")
    return g


def build_parser() -> argparse.ArgumentParser:
    p = OneLineArgumentParser(
        prog="python -m shrink.select",
        description="Choose which attention layers of a ViT to remove (transfer entropy, entropy, cosine, "
                    "block influence, random, last, manual) on a deterministic calibration subset of the "
                    "training data. Entropies are Gaussian (sum of log std per channel), in nats.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default=None,
                   help=f"timm model name (default: the saved one for a --checkpoint folder, else {DEFAULT_MODEL})")
    p.add_argument("--checkpoint", default=None,
                   help=f"weights file (.pth/.safetensors) or saved model directory; default for {DEFAULT_MODEL}: "
                        "the shipped dense weights")
    p.add_argument("--random-init", action="store_true",
                   help="use random weights (smoke tests and timing only: the choice is then meaningless)")
    p.add_argument("--ratio", type=float, default=None,
                   help="fraction of blocks whose attention is removed; k = ratio * depth rounded half up "
                        "(default 0.4 unless --layers is given)")
    p.add_argument("--criterion", default="transfer_entropy", choices=CRITERIA)
    p.add_argument("--layers", default=None, help="comma-separated layers for --criterion manual, e.g. 0,1,3")
    p.add_argument("--one-shot", action="store_true",
                   help="rank all layers once on the full model instead of greedily re-measuring after each pick")
    p.add_argument("--te-abs", action="store_true",
                   help="transfer entropy: pick the minimum |TE| instead of the minimum signed TE")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration subset and of --criterion random")
    p.add_argument("--calib-images", type=int, default=512,
                   help="calibration images drawn from the training split (same default and seed as main_lambda.py)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--device", default=None, help="cuda / cpu (default: cuda when available)")
    p.add_argument("--amp", default="auto", choices=AMP_CHOICES,
                   help="autocast dtype; auto = bf16 on CUDA, full precision on CPU")
    p.add_argument("--output-dir", default="out/select", help="where selection.json and selection.png go")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_threads_argument(p)
    add_data_args(p)
    return p


OUTPUT_FILES = ("selection.json", "selection.png")


def check_args(args: argparse.Namespace) -> tuple[list[int] | None, float, Path | None, dict]:
    """Every cheap check before a model is built or data read: values, files, output folder, model skeleton.

    Returns (layers, ratio, checkpoint, model kwargs).
    """
    from shrink.blocks.dilution import has_attention_layers, validate_layers
    from shrink.data.datasets import check_data_path, resolve_data_set
    from shrink.modelio.create import model_skeleton

    layers = None if args.layers is None else parse_layers(args.layers, "--layers")
    takes_layers = get_criterion(args.criterion).takes_layers
    if takes_layers and layers is None:
        raise ShrinkError(f"--criterion {args.criterion} needs --layers, e.g. --layers 0,1,3")
    if not takes_layers and layers is not None:
        manual = ", ".join(n for n in CRITERIA if get_criterion(n).takes_layers)
        raise ShrinkError(f"--layers is only used with --criterion {manual}")
    if args.ratio is not None and not (math.isfinite(args.ratio) and 0.0 <= args.ratio < 1.0):
        raise ShrinkError(f"--ratio must be in [0, 1), got {args.ratio}")
    ratio = args.ratio if args.ratio is not None or layers is not None else 0.4
    if args.calib_images <= 1:
        raise ShrinkError(f"--calib-images must be at least 2, got {args.calib_images}")
    if args.batch_size <= 0:
        raise ShrinkError(f"--batch-size must be positive, got {args.batch_size}")
    if not 0 <= args.seed < 2**32:
        raise ShrinkError(f"--seed must be an integer from 0 to {2**32 - 1}, got {args.seed}")
    if args.num_workers < 0:
        raise ShrinkError(f"--num-workers must be >= 0, got {args.num_workers}")
    if args.input_size is not None and args.input_size <= 0:
        raise ShrinkError(f"--input-size must be positive, got {args.input_size}")
    if args.device is not None:
        parse_device(args.device)
    args.data_set = resolve_data_set(args.data_set, args.data_path)
    if get_data_set(args.data_set).path is None and args.data_path is not None:
        raise ShrinkError(f"--data-path is not used by --data-set {args.data_set}")
    check_data_path(args.data_set, args.data_path)
    check_output_dir(args.output_dir, "--output-dir", owned=OUTPUT_FILES)
    checkpoint = None if args.checkpoint is None else Path(args.checkpoint)
    if checkpoint is not None and not checkpoint.exists():
        raise ShrinkError(f"--checkpoint: not found: {checkpoint}")
    if checkpoint is not None and args.random_init:
        raise ShrinkError("give --checkpoint or --random-init, not both")
    is_dir = checkpoint is not None and checkpoint.is_dir()
    if args.model is None and not is_dir:
        args.model = DEFAULT_MODEL
    if checkpoint is None and not args.random_init and args.model == DEFAULT_MODEL:
        checkpoint = DEFAULT_CHECKPOINT
        if not checkpoint.is_file():
            raise ShrinkError(f"{checkpoint} is missing: run scripts/make_dense_digits.py, or pass --checkpoint")
    if checkpoint is None and not args.random_init:
        raise ShrinkError(f"give --checkpoint for {args.model} (or --random-init for a smoke test)")
    kwargs = {"img_size": args.input_size} if args.input_size else {}
    skeleton = model_skeleton(args.model, checkpoint=checkpoint if is_dir else None, **kwargs)
    args.model = skeleton.shrink_arch["name"]
    if not has_attention_layers(skeleton):
        raise ShrinkError(f"{args.model} has no attention layers to select from")
    if layers is not None:
        validate_layers(skeleton, layers)
    return layers, ratio, checkpoint, kwargs


def run(args: argparse.Namespace):
    """Build model and calibration data from parsed ``args``, select, print and write the results."""
    from shrink.data.datasets import build_dataset, calibration_subset
    from shrink.modelio.create import create_model

    layers, ratio, checkpoint, kwargs = check_args(args)
    torch.manual_seed(args.seed)  # random-init weights are reproducible too
    model = create_model(args.model, checkpoint=None if args.random_init else checkpoint, **kwargs)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)

    dataset = build_dataset(args.data_set, "train", data_path=args.data_path, input_size=args.input_size,
                            model=model, train_transform=False, synthetic_size=args.calib_images)
    calib = calibration_subset(dataset, args.calib_images, seed=args.seed)
    loader = torch.utils.data.DataLoader(calib, batch_size=args.batch_size, shuffle=False,
                                         num_workers=args.num_workers, pin_memory=device.type == "cuda")
    result = select_layers(model, loader, ratio=ratio, criterion=args.criterion, seed=args.seed,
                           greedy=not args.one_shot, device=device, amp_dtype=None if args.amp == "auto" else dtype_of(args.amp),
                           progress=not args.quiet, layers=layers, te_abs=args.te_abs)
    print(layer_table(result))
    out = Path(args.output_dir)
    doc = result.to_json()
    doc["model"] = args.model
    doc["checkpoint"] = None if args.random_init else str(checkpoint)
    doc["data_set"] = args.data_set
    doc["device"] = str(device)
    doc["amp"] = args.amp
    if not args.no_plot:
        plot_selection(result, out / "selection.png")
    atomic_write_json(out / "selection.json", doc)
    print(f"wrote {out / 'selection.json'}" + ("" if args.no_plot else f" and {out / 'selection.png'}"))
    return result


def main(argv: list[str] | None = None) -> int:
    """The CLI: one line and exit code 2 for any input error, checked before the model is built."""
    def body(argv: list[str] | None) -> int:
        args = build_parser().parse_args(argv)
        apply_threads(args.threads)
        run(args)
        return 0

    return cli_main(body, argv)


if __name__ == "__main__":
    sys.exit(main())
