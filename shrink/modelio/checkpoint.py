"""Weights files in: the one reader of checkpoints, ours and foreign.

Formats (all read without running code; ``.pth`` pickles with ``torch.load(weights_only=True)``):

- ``.safetensors`` (timm, this project's ``model.safetensors``);
- DeiT / timm ``.pth``: a bare state dict or one under ``model`` / ``state_dict`` / ``model_state`` /
  ``module`` / ``net``, with ``module.`` (DDP), ``_orig_mod.`` (torch.compile) or ``model.`` prefixes;
- MS-MLP's Swin-style files (a yacs ``CfgNode`` beside the weights) and FF-only ViT's DeiT-style
  files (an ``argparse.Namespace``): those records are rebuilt as inert stand-ins (a plain
  ``OrderedDict`` / a ``Namespace``), so no class of the original code is imported;
- Scaling MLPs' bare state dicts.

A file that holds any other object is refused unless the caller opts in with ``trusted=True``
(CLI: ``--trust-checkpoint``), a full ``torch.load`` for files from a source you trust.

Each family's key remap stays where timm keeps it, as ``checkpoint_filter_fn`` in the model's
file (:mod:`shrink.models`); :func:`load_checkpoint` applies it. This module imports no other
part of ``shrink`` but :mod:`shrink.errors` and :mod:`shrink.unwrap`: model definitions below it, everything else above.
"""
from __future__ import annotations

import argparse
import logging
import os
import pickle
import sys
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed
from torch import nn

from shrink.errors import ShrinkError, first_line
from shrink.models import bottleneck_mlp
from shrink.unwrap import unwrap

__all__ = ["checkpoint_filter", "get_bottleneck_mlp", "key_report", "load_checkpoint", "read_checkpoint"]

_logger = logging.getLogger(__name__)

# Inert stand-ins for the configuration records training scripts pickle next to the weights.
_STAND_INS: list[Any] = [(OrderedDict, "yacs.config.CfgNode"), argparse.Namespace]
_WRAPPER_KEYS = ("model", "state_dict", "model_state", "module", "net")
_PREFIXES = ("module.", "_orig_mod.", "model.")
_HEAD_PREFIXES = ("head.", "head_dist.")
# timm families whose checkpoint_filter_fn maps a foreign format (ResMLP's official keys); the
# project's own families (shrink.models.*) are all looked up
_TIMM_FILTERED = ("timm.models.mlp_mixer",)


def _torch_load(path: Path, trusted: bool) -> Any:
    try:
        with torch.serialization.safe_globals(_STAND_INS):
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not trusted:
            glob = next((ln.strip() for ln in str(e).splitlines() if "global" in ln.lower()), None)
            if glob is None:
                raise ShrinkError(f"cannot read {path}: not a torch checkpoint of tensors") from None
            raise ShrinkError(
                f"refused to load {path}: it pickles objects other than tensors and config records, and loading it "
                f"could run code ({glob}); if you trust its source, pass trusted=True (CLI: --trust-checkpoint)"
            ) from None
        _logger.warning("loading %s with a full unpickler (trusted=True): %s", path, first_line(e))
    except Exception as e:  # noqa: BLE001 - torch.load raises many types on damaged files
        raise ShrinkError(f"cannot read {path}: {first_line(e)}") from None
    try:
        return torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - a trusted file can fail in any way its pickle chooses
        raise ShrinkError(f"cannot read {path}: {first_line(e)}") from None


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _unwrap(obj: Any, path: Path, entry: str | None) -> dict[str, torch.Tensor]:
    if entry is not None:
        if not isinstance(obj, Mapping) or entry not in obj:
            keys = ", ".join(map(str, obj)) if isinstance(obj, Mapping) else type(obj).__name__
            raise ShrinkError(f"{path} has no entry {entry!r} (it has: {keys})"[:400])
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
    """The flat state dict of a weights file (``.safetensors``, bare or wrapped ``.pth``, any suffix).

    ``entry`` picks a top-level entry explicitly (e.g. ``'model_ema'``); by default the weights
    are found under ``model`` / ``state_dict`` / ... or at the top level. Wrapper prefixes
    (``module.``, ``_orig_mod.``, ``model.``) are removed. ``trusted=True`` is the explicit opt-in
    to a full unpickler for files that need one; see the module docstring.
    """
    path = Path(path)
    if not path.is_file():
        raise ShrinkError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:
            sd = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise ShrinkError(f"cannot read {path}: not a valid safetensors file ({first_line(e)})") from None
        return _strip_prefixes(sd)
    return _strip_prefixes(_unwrap(_torch_load(path, trusted), path, entry))


def checkpoint_filter(model: nn.Module) -> Callable[[dict[str, torch.Tensor], nn.Module], dict[str, torch.Tensor]]:
    """The key remap of ``model``'s family: its module's ``checkpoint_filter_fn``, timm's convention.

    Looked up for the project's families and for timm's MLP-Mixer module (ResMLP's official keys);
    the identity for every other model (DeiT / ViT checkpoints load under their own names).
    """
    module_name = type(unwrap(model)).__module__
    if module_name.startswith("shrink.models.") or module_name in _TIMM_FILTERED:
        fn = getattr(sys.modules.get(module_name), "checkpoint_filter_fn", None)
        if fn is not None:
            return fn
    return lambda sd, model=None: sd


def key_report(missing: list[str], unexpected: list[str], mismatched: list[str], limit: int = 8) -> str:
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if keys:
            shown = ", ".join(keys[:limit]) + (f", ... (+{len(keys) - limit} more)" if len(keys) > limit else "")
            parts.append(f"{label} {len(keys)}: {shown}")
    return "; ".join(parts)


def _resample_pos_embed(sd: dict[str, torch.Tensor], model: nn.Module) -> None:
    """Interpolate an absolute position embedding to the model's patch grid (timm's resampler)."""
    own = getattr(model, "pos_embed", None)
    v = sd.get("pos_embed")
    if not isinstance(own, torch.Tensor) or v is None or v.shape == own.shape or v.dim() != 3:
        return
    num_prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
    old_grid = int(round((v.shape[1] - num_prefix) ** 0.5))
    if old_grid * old_grid != v.shape[1] - num_prefix or v.shape[2] != own.shape[2]:
        return  # not a square grid of the same width: reported as a shape mismatch
    sd["pos_embed"] = resample_abs_pos_embed(
        v, new_size=list(model.patch_embed.grid_size), old_size=[old_grid, old_grid], num_prefix_tokens=num_prefix
    )
    _logger.info("resampled pos_embed from %dx%d to %s", old_grid, old_grid, tuple(model.patch_embed.grid_size))


def _check_values(sd: Mapping[str, Any], own: Mapping[str, torch.Tensor], source: str) -> None:
    """Weights for the model's floating tensors must be finite floating-point tensors."""
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            raise ShrinkError(f"{source}: {k} is a {type(v).__name__}, not a tensor")
        if k not in own or not own[k].is_floating_point():
            continue
        if not v.is_floating_point():
            raise ShrinkError(f"{source}: {k} has dtype {str(v.dtype).replace('torch.', '')}, expected floating-point "
                              f"weights")
        if not bool(torch.isfinite(v).all()):
            raise ShrinkError(f"{source}: {k} holds NaN or Inf values; refusing weights that would compute nonsense")


def load_checkpoint(
    model: nn.Module,
    checkpoint: str | os.PathLike | Mapping[str, torch.Tensor],
    *,
    trusted: bool = False,
    entry: str | None = None,
    strict: bool = True,
    reset_head: bool = True,
) -> dict[str, list[str]]:
    """Load a weights file (or a state dict) into ``model``: read, remap the family's keys, check, load.

    Strict key matching with a readable report. Position embeddings are resampled when the
    resolution differs (timm's resampler). When the class count differs and ``reset_head``, the
    classifier keeps its fresh initialisation and the report lists it under ``reinitialised``. Any
    other missing, unexpected or mis-shaped key, and any non-finite weight, raises ``ShrinkError``.
    """
    if isinstance(checkpoint, Mapping):
        source, sd = "checkpoint", _strip_prefixes(dict(checkpoint))
    else:
        source, sd = str(checkpoint), read_checkpoint(checkpoint, trusted=trusted, entry=entry)
    sd = dict(checkpoint_filter(model)(sd, unwrap(model)))
    own = model.state_dict()
    _check_values(sd, own, source)
    _resample_pos_embed(sd, model)
    reinit = []
    if reset_head:
        for k in list(sd):
            if k.startswith(_HEAD_PREFIXES) and k in own and sd[k].shape != own[k].shape:
                reinit.append(k)
                del sd[k]
        reinit += [k for k in own if k.startswith(_HEAD_PREFIXES) and k not in sd and k not in reinit
                   and any(r.split(".")[0] == k.split(".")[0] for r in reinit)]
    mismatched = [k for k in sd if k in own and sd[k].shape != own[k].shape]
    for k in mismatched:
        del sd[k]
    result = model.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if k not in reinit and not k.endswith(".lam")]
    unexpected = list(result.unexpected_keys)
    if strict and (missing or unexpected or mismatched):
        raise ShrinkError(
            f"checkpoint does not match {type(model).__name__}: {key_report(missing, unexpected, mismatched)}"
        )
    if reinit:
        _logger.info("classifier re-initialised (class count differs): %s", ", ".join(reinit))
    return {"missing": missing, "unexpected": unexpected, "mismatched": mismatched, "reinitialised": reinit}



# The original's named checkpoints (its utils/download.py); they are files to fetch by hand here.
_NAMED_CHECKPOINTS = {
    "in21k": "imagenet21", "in21k_cifar10": "cifar10", "in21k_cifar100": "cifar100", "in21k_imagenet": "imagenet",
}


def get_bottleneck_mlp(
    architecture: str = "B_12-Wi_1024",
    resolution: int = 64,
    num_classes: int = 11230,
    checkpoint: str | os.PathLike | None = None,
    *,
    trusted: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Scaling MLPs' ``get_model`` call shape; ``checkpoint`` is a local weights file (never a download).

    Registered variants (``B_12-Wi_1024`` -> ``bottleneck_mlp_b12_wi1024``) are built by name; other
    block / width / expansion combinations pass ``depth`` / ``embed_dim`` / ``mlp_ratio`` to the class.
    """
    try:
        depth, width, expansion = bottleneck_mlp.parse_architecture(architecture)
    except ValueError as e:
        raise ShrinkError(str(e)) from None
    if checkpoint is not None and str(checkpoint) in _NAMED_CHECKPOINTS and not os.path.exists(checkpoint):
        b, w = architecture.split("-")
        name = f"{b.replace('_', '-')}_{w.replace('_', '-')}_res_{resolution}_{_NAMED_CHECKPOINTS[str(checkpoint)]}"
        raise ShrinkError(
            f"checkpoint {checkpoint!r} names a download of the original repository (a file like '{name}_epochs_*'); "
            f"this project never downloads: fetch the file yourself and pass its path"
        )
    variant = f"bottleneck_mlp_b{depth}_wi{width}"
    args: dict[str, Any] = dict(img_size=resolution, num_classes=num_classes, **kwargs)
    if expansion != 4 or not timm.is_model(variant):
        variant = "bottleneck_mlp_b12_wi1024"  # the class is the same; depth / width / ratio are arguments
        args.update(depth=depth, embed_dim=width, mlp_ratio=float(expansion))
    model = timm.create_model(variant, **args)
    model.shrink_arch = {"name": variant, "kwargs": args}  # lets shrink.save / shrink.load rebuild it
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, trusted=trusted)
    return model
