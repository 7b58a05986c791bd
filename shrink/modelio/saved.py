"""A model's structure and its folder: rebuild a model from a config.json, describe one, save / load.

``save`` writes ``model.safetensors`` + ``config.json`` atomically, with the block structure (diluted /
attention-free blocks); ``load`` rebuilds that structure and loads the weights strictly, after checking
the config's schema (:mod:`shrink.modelio.schema`) and the weight file's header.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from shrink.blocks.attention_free import AttentionFreeBlock, attention_free_indices, export, is_folded
from shrink.blocks.contract import block_family
from shrink.blocks.dilution import DilutedBlock, dilute, get_blocks
from shrink.errors import ShrinkError, first_line
from shrink.introspect import input_size, num_params
from shrink.io import atomic_dir
from shrink.modelio.checkpoint import key_report, load_checkpoint
from shrink.modelio.schema import (
    _FACTORY_KWARGS,
    CONFIG_FILE,
    DATA_CONFIG_KEYS,
    FORMAT,
    MAX_PARAMS,
    MODEL_FILE,
    config_values,
    read_config,
    validate_config,
)
from shrink.unwrap import unwrap

__all__ = ["build_from_config", "check_input_size", "describe_architecture", "load", "recorded_kwargs", "save",
           "timm_skeleton"]

_logger = logging.getLogger(__name__)


def check_input_size(model: nn.Module, name: str | None = None) -> None:
    """Refuse an image size the patch size does not divide (timm would drop the border or fail later)."""
    pe = getattr(model, "patch_embed", None)
    img, patch = getattr(pe, "img_size", None), getattr(pe, "patch_size", None)
    if img is None or patch is None or getattr(pe, "dynamic_img_pad", False):
        return
    img, patch = tuple(img), tuple(patch)
    if any(i < p or i % p for i, p in zip(img, patch, strict=False)):
        shown = img[0] if len(set(img)) == 1 else "x".join(map(str, img))
        raise ShrinkError(f"input size {shown} is not a multiple of the patch size {patch[0]} of "
                          f"{name or type(model).__name__}; choose e.g. {max(patch[0], img[0] // patch[0] * patch[0])}")


def _check_size(model: nn.Module, name: str) -> None:
    n = num_params(model)
    if n > MAX_PARAMS:
        raise ShrinkError(f"{name} would have {n:,} parameters; refusing to build it (limit {MAX_PARAMS:,})")


def timm_skeleton(name: str, kwargs: dict[str, Any]) -> nn.Module:
    """``name`` built on the meta device (no memory), with its size and input size checked."""
    try:
        try:
            with torch.device("meta"):
                model = timm.create_model(name, pretrained=False, **kwargs)
        except (RuntimeError, NotImplementedError) as e:
            if "meta" not in str(e).lower():
                raise
            # an architecture whose constructor reads tensor values: build it for real (rare, slower)
            _logger.debug("%s cannot be built on the meta device (%s); building it on the CPU", name, first_line(e))
            with torch.device("cpu"):
                model = timm.create_model(name, pretrained=False, **kwargs)
    except TypeError as e:
        raise ShrinkError(f"cannot build {name} with {kwargs}: {first_line(e)}") from None
    except (ValueError, AssertionError, RuntimeError, KeyError, IndexError, ZeroDivisionError) as e:
        raise ShrinkError(f"cannot build {name} with {kwargs}: {type(e).__name__}: {first_line(e)}") from None
    _check_size(model, name)
    check_input_size(model, name)
    return model


_MISSING = object()


def _same_value(a: Any, b: Any) -> bool:
    """Equal as config.json values; an int image size equals the [size, size] timm reports."""
    if isinstance(a, int) and not isinstance(a, bool) and isinstance(b, list) and b == [a, a]:
        return True
    return a == b


def recorded_kwargs(model: nn.Module) -> tuple[str, dict[str, Any]]:
    """The timm name and every keyword argument ``model`` was built with, as config.json values.

    ``shrink.create_model`` remembers name and kwargs; ``timm.create_model`` records its kwargs on
    the model (``timm.models.get_model_args``, which also reports later changes: a new head's class
    count, a new input size, the pooling). A model built by calling its class has neither and is
    refused: its arguments cannot be told from its weights.
    """
    arch = getattr(model, "shrink_arch", None)
    name = arch["name"] if arch else (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
    has_timm_args = hasattr(model, "_model_args")
    if name is not None and arch is None and not has_timm_args and not hasattr(timm.models, "get_model_args"):
        # a timm older than its argument record: what the model shows (save then checks the rebuild)
        shown: dict[str, Any] = {}
        if hasattr(model, "num_classes"):
            shown["num_classes"] = int(model.num_classes)
        img_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
        if img_size is not None:
            shown["img_size"] = list(img_size)
        if isinstance(getattr(model, "global_pool", None), str):
            shown["global_pool"] = model.global_pool
        return name, shown
    if name is None or not (arch or has_timm_args):
        raise ShrinkError(f"cannot tell how this {type(model).__name__} was built (no recorded timm name and "
                          f"arguments); build it with shrink.create_model or timm.create_model")
    kwargs = dict(arch["kwargs"]) if arch else {}
    if has_timm_args:
        from timm.models import get_model_args

        try:
            recorded = get_model_args(model)
        except (ValueError, TypeError, AttributeError) as e:
            raise ShrinkError(f"cannot read the arguments {name} was built with: {first_line(e)}") from None
        recorded = {k: v for k, v in recorded.items() if k not in _FACTORY_KWARGS}
        for k, v in config_values(recorded).items():
            if not _same_value(kwargs.get(k, _MISSING), v):
                kwargs[k] = v
    return name, kwargs


def describe_architecture(model: nn.Module) -> dict[str, Any]:
    """How to rebuild ``model``: its timm name, constructor kwargs and block structure."""
    name, kwargs = recorded_kwargs(model)
    blocks = getattr(model, "blocks", None)
    desc = {"architecture": name, "model_kwargs": kwargs}
    if isinstance(blocks, (nn.Sequential, nn.ModuleList)):
        desc["attention_free_blocks"] = attention_free_indices(model)
        desc["folded"] = is_folded(model) if desc["attention_free_blocks"] else False
        desc["diluted_blocks"] = {str(i): b.lambda_value for i, b in enumerate(blocks) if isinstance(b, DilutedBlock)}
        # a dilution rule other than the family's (folded blocks are told by 'folded')
        desc["residual_scales"] = {
            str(i): b.residual_scale for i, b in enumerate(blocks)
            if (isinstance(b, DilutedBlock) or (isinstance(b, AttentionFreeBlock) and not desc["folded"]))
            and b.residual_scale != block_family(b).residual_scale}
    return desc


def _data_config(model: nn.Module) -> dict[str, Any]:
    """The data config of ``model`` as built: timm's pretrained_cfg (mean, std, interpolation, crop)
    with the input size the model was built for (a ViT built with img_size=64 keeps 224 there)."""
    cfg = {**(getattr(model, "pretrained_cfg", None) or {}), "input_size": input_size(model)}
    if hasattr(model, "num_classes"):
        cfg["num_classes"] = int(model.num_classes)
    return {k: (list(cfg[k]) if isinstance(cfg[k], tuple) else cfg[k]) for k in DATA_CONFIG_KEYS
            if cfg.get(k) is not None}


def _apply_data_config(model: nn.Module, data: dict[str, Any] | None) -> None:
    """Put a saved data config into the model's pretrained_cfg, where timm's ``resolve_data_config``
    (and so the data pipeline) reads it; the input size is the one the model was built for."""
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    cfg.update({k: tuple(v) if isinstance(v, list) else v for k, v in (data or {}).items()
                if k in DATA_CONFIG_KEYS and v is not None})
    model.pretrained_cfg = cfg
    cfg["input_size"] = input_size(model)
    if hasattr(model, "num_classes"):
        cfg["num_classes"] = int(model.num_classes)
    model.pretrained_cfg = model.default_cfg = cfg


def save(model: nn.Module, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` to directory ``path`` (``model.safetensors`` + ``config.json``), atomically."""
    model = unwrap(model)
    config = {"format": FORMAT, **describe_architecture(model), "data_config": _data_config(model),
              "num_params": num_params(model)}
    if extra:
        config["extra"] = extra
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with torch.device("meta"):  # what load would build: the same tensors, or refuse now rather than at load
        rebuilt = build_from_config(validate_config(json.loads(json.dumps(config)), "the model's description"))
    own = {k: list(v.shape) for k, v in rebuilt.state_dict().items()}
    bad = sorted(set(own) ^ set(state)) + sorted(k for k in own if k in state and own[k] != list(state[k].shape))
    if bad:
        raise ShrinkError(f"cannot save {config['architecture']}: its recorded arguments {config['model_kwargs']} "
                          f"do not rebuild it ({bad[0]} differs; was it changed after it was built?)"[:600])
    del rebuilt

    def fill(tmp: Path) -> None:
        save_file(state, str(tmp / MODEL_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")

    return atomic_dir(path, fill)


def build_from_config(config: dict[str, Any]) -> nn.Module:
    """An (untrained) model with the structure a config.json describes (checked first)."""
    validate_config(config)
    name = config["architecture"]
    kwargs = dict(config.get("model_kwargs", {}))
    meta = torch.empty(0).device.type == "meta"
    if meta:
        model = timm_skeleton(name, kwargs)
    else:
        model = timm.create_model(name, pretrained=False, **kwargs)
    model.shrink_arch = {"name": name, "kwargs": kwargs}
    _apply_data_config(model, config.get("data_config"))
    free = list(config.get("attention_free_blocks", []))
    diluted = {int(i): float(v) for i, v in config.get("diluted_blocks", {}).items()}
    if free or diluted:
        depth = len(get_blocks(model))
        bad = [i for i in [*free, *diluted] if i >= depth]
        if bad:
            raise ShrinkError(f"{CONFIG_FILE}: block index {bad[0]} is out of range for {name} with {depth} blocks")
    scales = {int(i): float(v) for i, v in config.get("residual_scales", {}).items()}
    if free:
        for i in free:
            dilute(model, [i], lam=0.0, residual_scale=scales.get(i))
        if meta:  # export reads each lambda with .item(), which a meta tensor cannot answer
            for b in get_blocks(model):
                if isinstance(b, DilutedBlock):
                    b.lam = torch.zeros((), device="cpu")
        export(model, inplace=True)
        if config.get("folded"):
            for b in get_blocks(model):
                if isinstance(b, AttentionFreeBlock):
                    b.residual_scale = 1.0
    for i, lam in diluted.items():
        dilute(model, [i], lam=lam, residual_scale=scales.get(i))
    return model


_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def _safetensors_header(path: Path) -> dict[str, tuple[str, list[int]]]:
    """Names, dtypes and shapes of a safetensors file, read from its header only (nothing allocated)."""
    if not path.is_file():
        raise ShrinkError(f"{path} is missing or not a regular file")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: (f.get_slice(k).get_dtype(), list(f.get_slice(k).get_shape())) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ShrinkError(f"cannot read {path}: not a valid safetensors file ({first_line(e)})") from None


def _check_header(header: dict[str, tuple[str, list[int]]], model: nn.Module, path: Path) -> None:
    """The file holds exactly the model's tensors, with its shapes and a floating dtype where it has one."""
    own = model.state_dict()
    missing = [k for k in own if k not in header and not k.endswith(".lam")]
    unexpected = [k for k in header if k not in own]
    mismatched = [k for k in header if k in own and list(own[k].shape) != header[k][1]]
    if missing or unexpected or mismatched:
        raise ShrinkError(f"{path} does not match the model its config.json describes: "
                          f"{key_report(missing, unexpected, mismatched)}")
    for k, (dtype, _) in header.items():
        if own[k].is_floating_point() and dtype not in _FLOAT_DTYPES:
            raise ShrinkError(f"{path}: {k} has dtype {dtype}, expected floating point weights")


def load(path: str | os.PathLike, device: str | torch.device | None = None) -> nn.Module:
    """Rebuild a model saved with :func:`save` and load its weights strictly (no code is run).

    Everything is checked before memory is spent: the config against its schema, then the weight
    file's header (names, shapes, dtypes) against the model built on the meta device; then the
    weights are loaded and must be finite.
    """
    path = Path(path)
    if not path.is_dir():
        raise ShrinkError(f"model directory not found: {path}")
    config = read_config(path)
    header = _safetensors_header(path / MODEL_FILE)
    with torch.device("meta"):
        skeleton = build_from_config(config)
    _check_header(header, skeleton, path / MODEL_FILE)
    del skeleton
    model = build_from_config(config)
    load_checkpoint(model, path / MODEL_FILE, reset_head=False)
    if device is not None:
        model.to(device)
    return model.eval()
