"""``python -m shrink.convert MODEL CHECKPOINT OUT_DIR``: a public checkpoint, converted once.

Reads a checkpoint of an MLP family's original repository (Scaling MLPs, MS-MLP, FF-only ViT) or of
timm with :func:`shrink.load_checkpoint` and writes a ``shrink.save`` directory (safetensors +
config.json) that loads without unpickling from then on.
"""
from __future__ import annotations

import sys

from shrink.cli.runner import (
    OneLineArgumentParser,
    add_threads_argument,
    apply_threads,
    check_input_file,
    check_output_dir,
    cli_main,
)
from shrink.errors import ShrinkError
from shrink.modelio.checkpoint import load_checkpoint
from shrink.modelio.create import create_model
from shrink.modelio.saved import save

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    """Convert a public checkpoint to a ``shrink.save`` directory (safetensors + config.json)."""
    parser = OneLineArgumentParser(
        prog="python -m shrink.convert",
        description="Convert a public checkpoint of an MLP family (Scaling MLPs, MS-MLP, FF-only ViT, timm) into "
                    "a shrink model directory (model.safetensors + config.json) that loads without unpickling.",
    )
    parser.add_argument("model", help="timm model name, e.g. bottleneck_mlp_b12_wi1024 or msmlp_tiny_patch4_shift5_224")
    parser.add_argument("checkpoint", help="the downloaded weights file (.pth, .safetensors or suffix-less)")
    parser.add_argument("output", help="directory to write (must not exist yet)")
    parser.add_argument("--num-classes", type=int, default=None, help="classifier size (default: the model's)")
    parser.add_argument("--img-size", type=int, default=None, help="input resolution (default: the model's)")
    parser.add_argument("--entry", default=None, help="top-level entry holding the weights, e.g. model_ema")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="allow a full unpickler for files that need one; only for files from a source you trust")
    add_threads_argument(parser)

    def body(argv: list[str] | None) -> int:
        args = parser.parse_args(argv)
        for flag, v in (("--num-classes", args.num_classes), ("--img-size", args.img_size)):
            if v is not None and not 0 < v <= 1 << 20:
                raise ShrinkError(f"{flag} must be a positive integer, got {v}")
        check_input_file(args.checkpoint, "checkpoint")
        out = check_output_dir(args.output, "output", must_not_exist=True)
        apply_threads(args.threads)
        kwargs = {k: v for k, v in (("num_classes", args.num_classes), ("img_size", args.img_size)) if v is not None}
        model = create_model(args.model, **kwargs)
        report = load_checkpoint(model, args.checkpoint, trusted=args.trust_checkpoint, entry=args.entry)
        save(model, out, extra={"converted_from": str(args.checkpoint)})
        note = f" (classifier re-initialised: {', '.join(report['reinitialised'])})" if report["reinitialised"] else ""
        print(f"wrote {out}{note}")
        return 0

    return cli_main(body, argv)


if __name__ == "__main__":
    sys.exit(main())
