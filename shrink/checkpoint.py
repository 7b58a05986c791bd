"""Weights in and out: DeiT ``.pth`` / ``.safetensors`` / timm hub names in; shrunk models out and back.

Nothing here unpickles arbitrary objects: ``.pth`` files are read with ``weights_only=True`` and
everything the toolkit writes is safetensors + JSON.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from timm.layers import resample_abs_pos_embed
from torch import nn

from .dilution import DilutedBlock, dilute, get_blocks
from .errors import ShrinkError
from .export import AttentionFreeBlock, attention_free_indices, export, is_folded
from .io import atomic_dir

_logger = logging.getLogger(__name__)

FORMAT = "shrink.model/1"
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
_WRAPPER_KEYS = ("model", "state_dict", "model_state", "module")
_HEAD_PREFIXES = ("head.", "head_dist.")


def _register_project_models() -> None:
    """Import ``models`` so the project's architectures are registered with timm."""
    try:
        import models  # noqa: F401
    except ImportError:  # the library works without the repo's models/ package
        pass


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a weights file (``.safetensors`` or a torch ``.pth``) into a flat state dict.

    ``.pth`` files are loaded with ``weights_only=True``: a pickle that would run code is refused.
    DeiT-style wrappers (``{'model': ...}``) and DDP's ``module.`` prefixes are removed.
    """
    path = Path(path)
    if not path.is_file():
        raise ShrinkError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        try:
            sd = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise ShrinkError(f"cannot read {path}: not a valid safetensors file ({e})") from None
    else:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            # weights_only refuses any global it does not know: that is a file that would run code
            glob = next((ln.strip() for ln in str(e).splitlines() if "global" in ln.lower()), None)
            if glob is None:
                raise ShrinkError(f"cannot read {path}: not a torch checkpoint of tensors") from None
            raise ShrinkError(f"refused to load {path}: it holds objects other than tensors and loading it "
                              f"could run code ({glob})") from None
        except Exception as e:  # noqa: BLE001 - torch.load raises many types on damaged files
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ShrinkError(f"cannot read {path}: {first}") from None
        sd = _unwrap_state_dict(obj, path)
    return _strip_prefix(sd)


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    for _ in range(3):
        if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        if isinstance(obj, Mapping):
            inner = next((obj[k] for k in _WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
            if inner is not None:
                obj = inner
                continue
        break
    raise ShrinkError(f"cannot read {path}: no state dict of tensors found (expected a dict, or one under 'model')")


def _strip_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in ("module.", "_orig_mod."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _key_report(missing: list[str], unexpected: list[str], mismatched: list[str], limit: int = 8) -> str:
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


def load_weights(
    model: nn.Module,
    weights: str | os.PathLike | Mapping[str, torch.Tensor],
    *,
    strict: bool = True,
    reset_head: bool = True,
) -> dict[str, list[str]]:
    """Load weights into ``model`` with strict key matching and a readable report.

    Position embeddings are resampled when the resolution differs (timm's filter). When the class
    count differs and ``reset_head``, the classifier keeps its fresh initialisation and the report
    lists it under ``reinitialised``. Any other missing, unexpected or mis-shaped key raises.
    """
    sd = dict(read_state_dict(weights) if isinstance(weights, (str, os.PathLike)) else weights)
    sd = _strip_prefix(sd)
    _resample_pos_embed(sd, model)
    own = model.state_dict()
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
            f"checkpoint does not match {type(model).__name__}: {_key_report(missing, unexpected, mismatched)}"
        )
    if reinit:
        _logger.info("classifier re-initialised (class count differs): %s", ", ".join(reinit))
    return {"missing": missing, "unexpected": unexpected, "mismatched": mismatched, "reinitialised": reinit}


def create_model(
    name: str,
    *,
    pretrained: bool = False,
    checkpoint: str | os.PathLike | None = None,
    **kwargs: Any,
) -> nn.Module:
    """``timm.create_model`` that remembers how it was built (for ``save``/``load``).

    ``checkpoint`` loads a local weights file strictly (DeiT ``.pth``, ``.safetensors``, or a
    directory written by :func:`save`); ``pretrained`` uses timm's hub download.
    """
    _register_project_models()
    if checkpoint is not None and Path(checkpoint).is_dir():
        model = load(checkpoint)
        return model
    if not timm.is_model(name):
        raise ShrinkError(f"unknown model {name!r}: not a timm model name (see timm.list_models())")
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as e:
        raise ShrinkError(f"cannot build {name} with {kwargs}: {e}") from None
    except (OSError, RuntimeError, ValueError) as e:
        if pretrained:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ShrinkError(
                f"could not get pretrained weights for {name} (no network or hub access?): {first}; "
                f"pass a local file with --finetune/checkpoint instead"
            ) from None
        raise
    model.shrink_arch = {"name": name, "kwargs": _jsonable(kwargs)}
    if checkpoint is not None:
        load_weights(model, checkpoint)
    return model


def _jsonable(kwargs: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in kwargs.items():
        if isinstance(v, tuple):
            v = list(v)
        try:
            json.dumps(v)
        except TypeError:
            raise ShrinkError(f"model argument {k}={v!r} cannot be stored in config.json") from None
        out[k] = v
    return out


def describe_architecture(model: nn.Module) -> dict[str, Any]:
    """How to rebuild ``model``: its timm name, constructor kwargs and block structure."""
    arch = getattr(model, "shrink_arch", None)
    if arch is None:
        name = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
        if name is None:
            raise ShrinkError("cannot tell which timm architecture this model is; build it with shrink.create_model")
        kwargs: dict[str, Any] = {}
        if hasattr(model, "num_classes"):
            kwargs["num_classes"] = int(model.num_classes)
        img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
        if img_size is not None:
            kwargs["img_size"] = list(img_size)
        arch = {"name": name, "kwargs": kwargs}
    blocks = getattr(model, "blocks", None)
    desc = {"architecture": arch["name"], "model_kwargs": dict(arch["kwargs"])}
    if isinstance(blocks, (nn.Sequential, nn.ModuleList)):
        desc["attention_free_blocks"] = attention_free_indices(model)
        desc["folded"] = is_folded(model) if desc["attention_free_blocks"] else False
        desc["diluted_blocks"] = {str(i): b.lambda_value for i, b in enumerate(blocks) if isinstance(b, DilutedBlock)}
    return desc


def _data_config(model: nn.Module) -> dict[str, Any]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    keys = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode", "num_classes")
    return {k: (list(cfg[k]) if isinstance(cfg[k], tuple) else cfg[k]) for k in keys if k in cfg}


def save(model: nn.Module, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` to directory ``path`` (``model.safetensors`` + ``config.json``), atomically."""
    model = getattr(model, "_orig_mod", model)
    config = {"format": FORMAT, **describe_architecture(model), "data_config": _data_config(model),
              "num_params": sum(p.numel() for p in model.parameters())}
    if extra:
        config["extra"] = extra
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}

    def fill(tmp: Path) -> None:
        save_file(state, str(tmp / MODEL_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")

    return atomic_dir(path, fill)


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` of a saved model directory."""
    cfg_path = Path(path) / CONFIG_FILE
    if not cfg_path.is_file():
        raise ShrinkError(f"not a saved shrink model: {cfg_path} is missing")
    try:
        config = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ShrinkError(f"cannot read {cfg_path}: {e}") from None
    if config.get("format") != FORMAT:
        raise ShrinkError(f"{cfg_path}: unknown format {config.get('format')!r} (expected {FORMAT!r})")
    return config


def build_from_config(config: dict[str, Any]) -> nn.Module:
    """An (untrained) model with the structure a config.json describes."""
    _register_project_models()
    name = config["architecture"]
    if not timm.is_model(name):
        raise ShrinkError(f"unknown model {name!r} in config.json (is its registering package imported?)")
    model = timm.create_model(name, pretrained=False, **config.get("model_kwargs", {}))
    model.shrink_arch = {"name": name, "kwargs": dict(config.get("model_kwargs", {}))}
    free = list(config.get("attention_free_blocks", []))
    diluted = {int(i): float(v) for i, v in config.get("diluted_blocks", {}).items()}
    if free:
        dilute(model, free, lam=0.0)
        export(model, inplace=True)
        if config.get("folded"):
            for b in get_blocks(model):
                if isinstance(b, AttentionFreeBlock):
                    b.residual_scale = 1.0
    for i, lam in diluted.items():
        dilute(model, [i], lam=lam)
    return model


def load(path: str | os.PathLike, device: str | torch.device | None = None) -> nn.Module:
    """Rebuild a model saved with :func:`save` and load its weights strictly (no code is run)."""
    path = Path(path)
    if not path.is_dir():
        raise ShrinkError(f"model directory not found: {path}")
    config = read_config(path)
    model = build_from_config(config)
    load_weights(model, path / MODEL_FILE, reset_head=False)
    if device is not None:
        model.to(device)
    return model.eval()
