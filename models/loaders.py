"""Load the public checkpoints of the MLP families into this project's models, without running code.

Formats handled (all read with ``torch.load(weights_only=True)``):

- Scaling MLPs (BottleneckMLP): a bare ``state_dict`` (``linear_in``, ``blocks.i.block.0``, ...),
  possibly with ``_orig_mod.`` (torch.compile) or ``module.`` (DDP) prefixes.
- MS-MLP (Swin-style training code): ``{'model': ..., 'optimizer': ..., 'config': <yacs CfgNode>, ...}``.
- FF-only ViT (DeiT training code): ``{'model': ..., 'model_ema': ..., 'args': <argparse.Namespace>, ...}``.
- timm / this project: bare state dicts or ``.safetensors``.

The yacs ``CfgNode`` and ``argparse.Namespace`` records are rebuilt as inert stand-ins (a plain
``OrderedDict`` / a ``Namespace``) by the weights-only unpickler, so no class of the original code
is imported and nothing executes. A file that holds any other object is refused, unless the caller
opts in explicitly with ``trusted=True`` (CLI: ``--trust-checkpoint``), which uses a full
``torch.load`` and must only be used for files from a source you trust.

CLI: ``python -m models.loaders MODEL CHECKPOINT OUT_DIR`` converts once to ``shrink.save``'s
safetensors + JSON directory, which loads safely from then on.
"""
from __future__ import annotations

import argparse
import logging
import os
import pickle
import sys
import warnings
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shrink.checkpoint import load_weights, read_state_dict
from shrink.errors import ShrinkError

from . import bottleneck_mlp, ff_vit, ms_mlp

__all__ = ["checkpoint_filter", "load_checkpoint", "main", "read_checkpoint"]

_logger = logging.getLogger(__name__)
# ``python -m models.loaders``: the package imports this module first, and runpy would then warn on stderr
# that it is already imported; running it is exactly what is meant, so that one warning is silenced.
warnings.filterwarnings("ignore", message=r"'models\.loaders' found in sys\.modules", category=RuntimeWarning)

# Inert stand-ins for the configuration records training scripts pickle next to the weights.
_STAND_INS: list[Any] = [(OrderedDict, "yacs.config.CfgNode"), argparse.Namespace]
_WRAPPER_KEYS = ("model", "state_dict", "model_state", "module", "net")
_PREFIXES = ("module.", "_orig_mod.", "model.")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _torch_load(path: Path, trusted: bool) -> Any:
    try:
        with torch.serialization.safe_globals(_STAND_INS):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not trusted:
            raise ShrinkError(
                f"refused to load {path}: it pickles objects other than tensors and config records, and loading it "
                f"could run code; if you trust its source, pass trusted=True (CLI: --trust-checkpoint)"
            ) from None
        _logger.warning("loading %s with a full unpickler (trusted=True): %s", path, _first_line(e))
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError) as e:
        raise ShrinkError(f"cannot read {path}: {_first_line(e)}") from None
    try:
        return torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as e:  # a trusted file can fail in any way its pickle chooses
        raise ShrinkError(f"cannot read {path}: {_first_line(e)}") from None


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _unwrap(obj: Any, path: Path, entry: str | None) -> dict[str, torch.Tensor]:
    if entry is not None:
        if not isinstance(obj, Mapping) or entry not in obj:
            keys = ", ".join(map(str, obj)) if isinstance(obj, Mapping) else type(obj).__name__
            raise ShrinkError(f"{path} has no entry {entry!r} (it has: {keys})")
        obj = obj[entry]
    for _ in range(3):
        if _is_state_dict(obj):
            return dict(obj)
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj, Mapping) and isinstance(obj.get(k), Mapping)),
                     None)
        if inner is None:
            break
        obj = inner
    raise ShrinkError(f"cannot read {path}: no state dict of tensors found (expected a dict, or one under 'model')")


def _strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if sd and all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                changed = True
    return sd


def read_checkpoint(
    path: str | os.PathLike, *, trusted: bool = False, entry: str | None = None
) -> dict[str, torch.Tensor]:
    """The flat state dict of a checkpoint file (``.safetensors``, bare or wrapped ``.pth``, any suffix).

    ``entry`` picks a top-level entry explicitly (e.g. ``'model_ema'``); by default the weights
    are found under ``model`` / ``state_dict`` / ... or at the top level. ``trusted=True`` is the
    explicit opt-in to a full unpickler for files that need one; see the module docstring.
    """
    path = Path(path)
    if not path.is_file():
        raise ShrinkError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return read_state_dict(path)
    return _strip_prefixes(_unwrap(_torch_load(path, trusted), path, entry))


def checkpoint_filter(model: nn.Module) -> Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]]:
    """The key remap for ``model``'s family (identity for models with no foreign format)."""
    from timm.models import mlp_mixer

    filters: list[tuple[type, Callable]] = [
        (bottleneck_mlp.BottleneckMLP, bottleneck_mlp.checkpoint_filter_fn),
        (ms_mlp.MSMLP, ms_mlp.checkpoint_filter_fn),
        (ff_vit.FeedForwardViT, ff_vit.checkpoint_filter_fn),
        (mlp_mixer.MlpMixer, mlp_mixer.checkpoint_filter_fn),
    ]
    model = getattr(model, "_orig_mod", model)
    return next((fn for cls, fn in filters if isinstance(model, cls)), lambda sd, model=None: sd)


def load_checkpoint(
    model: nn.Module,
    checkpoint: str | os.PathLike | Mapping[str, torch.Tensor],
    *,
    trusted: bool = False,
    entry: str | None = None,
    strict: bool = True,
    reset_head: bool = True,
) -> dict[str, list[str]]:
    """Load a public checkpoint (or a state dict) into ``model``: unwrap, remap keys, load strictly.

    A classifier of another class count is left freshly initialised (``reset_head``) and listed
    under ``reinitialised`` in the returned report; any other mismatch raises ``ShrinkError``.
    """
    if isinstance(checkpoint, Mapping):
        sd = _strip_prefixes(dict(checkpoint))
    else:
        sd = read_checkpoint(checkpoint, trusted=trusted, entry=entry)
    sd = checkpoint_filter(model)(sd, model)
    return load_weights(model, sd, strict=strict, reset_head=reset_head)


def main(argv: list[str] | None = None) -> int:
    """Convert a public checkpoint to a ``shrink.save`` directory (safetensors + config.json)."""
    from shrink.cli import OneLineArgumentParser, check_input_file, check_output_dir, cli_main

    parser = OneLineArgumentParser(
        prog="python -m models.loaders",
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

    def body(argv: list[str] | None) -> int:
        import shrink

        args = parser.parse_args(argv)
        for flag, v in (("--num-classes", args.num_classes), ("--img-size", args.img_size)):
            if v is not None and not 0 < v <= 1 << 20:
                raise ShrinkError(f"{flag} must be a positive integer, got {v}")
        check_input_file(args.checkpoint, "checkpoint")
        out = check_output_dir(args.output, "output", must_not_exist=True)
        kwargs = {k: v for k, v in (("num_classes", args.num_classes), ("img_size", args.img_size)) if v is not None}
        model = shrink.create_model(args.model, **kwargs)
        report = load_checkpoint(model, args.checkpoint, trusted=args.trust_checkpoint, entry=args.entry)
        shrink.save(model, out, extra={"converted_from": str(args.checkpoint)})
        note = f" (classifier re-initialised: {', '.join(report['reinitialised'])})" if report["reinitialised"] else ""
        print(f"wrote {out}{note}")
        return 0

    return cli_main(body, argv)


if __name__ == "__main__":
    sys.exit(main())
