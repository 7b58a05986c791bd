"""The schema of a saved model's ``config.json``: its names, limits and checks, and its reader.

Checked before anything is built: a config.json is data from outside (a download, a colleague's
folder), so every key, type, size and index is bounded here, and timm's factory arguments that would
read or unpickle files (``checkpoint_path``) are refused.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import timm

from shrink.errors import ShrinkError, first_line
from shrink.io import jsonable

__all__ = ["CONFIG_FILE", "DATA_CONFIG_KEYS", "FORMAT", "MAX_PARAMS", "MODEL_FILE", "config_values", "read_config",
           "validate_config"]

FORMAT = "shrink.model/1"
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

# timm.create_model's own arguments: a config.json must not set them (checkpoint_path would unpickle a file)
_FACTORY_KWARGS = frozenset({
    "model_name", "pretrained", "pretrained_cfg", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir",
    "scriptable", "exportable", "no_jit", "features_only", "feature_cfg", "feature_cls", "out_indices",
    "pretrained_strict"})
# upper bounds for the usual size arguments; any other integer argument is bounded by _MAX_INT
_KWARG_LIMITS = {"depth": 1024, "num_heads": 4096, "embed_dim": 65536, "img_size": 16384, "patch_size": 1024,
                 "num_classes": 1 << 20, "in_chans": 1024, "mlp_ratio": 64, "class_token": 1, "reg_tokens": 1024}
_MAX_INT = 1 << 20
MAX_PARAMS = 20_000_000_000  # 80 GB of fp32 weights: beyond any model this toolkit is for
_MAX_CONFIG_BYTES = 1 << 20


def _check_json_value(key: str, v: Any, where: str, depth: int = 0) -> None:
    if depth > 4:
        raise ShrinkError(f"{where}: model_kwargs.{key} is nested too deeply")
    if isinstance(v, bool) or v is None:
        return
    if isinstance(v, int):
        limit = _KWARG_LIMITS.get(key, _MAX_INT)
        if not -_MAX_INT <= v <= limit:
            raise ShrinkError(f"{where}: model_kwargs.{key} = {v} is out of range (at most {limit})")
    elif isinstance(v, float):
        if not math.isfinite(v) or abs(v) > _KWARG_LIMITS.get(key, _MAX_INT):
            raise ShrinkError(f"{where}: model_kwargs.{key} = {v} is out of range")
    elif isinstance(v, str):
        if len(v) > 256:
            raise ShrinkError(f"{where}: model_kwargs.{key} is a string of {len(v)} characters")
    elif isinstance(v, list):
        if len(v) > 64:
            raise ShrinkError(f"{where}: model_kwargs.{key} is a list of {len(v)} items")
        for item in v:
            _check_json_value(key, item, where, depth + 1)
    elif isinstance(v, dict):
        if len(v) > 64:
            raise ShrinkError(f"{where}: model_kwargs.{key} has {len(v)} entries")
        for k2, item in v.items():
            _check_json_value(f"{key}.{k2}", item, where, depth + 1)
    else:
        raise ShrinkError(f"{where}: model_kwargs.{key} has a value of type {type(v).__name__}")


def _estimate_params(kwargs: dict[str, Any]) -> int:
    """A transformer's parameter count from its size arguments, (4 + 2 * mlp_ratio) * dim^2 per block:
    cheap enough to refuse absurd configs before even the meta-device build (which takes time per block)."""
    def num(v: Any, reduce) -> float:
        vals = [x for x in (v if isinstance(v, list) else [v]) if isinstance(x, (int, float)) and not isinstance(x, bool)]
        return float(reduce(vals)) if vals else 0.0

    dim, depth = num(kwargs.get("embed_dim"), max), num(kwargs.get("depth"), sum)
    ratio = num(kwargs.get("mlp_ratio", 4.0), max) or 4.0
    return int((4 + 2 * ratio) * dim * dim * max(depth, 1.0)) if dim else 0


def _index_list(v: Any, key: str, where: str) -> list[int]:
    if not isinstance(v, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in v):
        raise ShrinkError(f"{where}: {key} must be a list of block indices, got {v!r}"[:300])
    if any(i < 0 or i > _KWARG_LIMITS["depth"] for i in v) or len(set(v)) != len(v):
        raise ShrinkError(f"{where}: {key} holds a negative, huge or repeated index: {v}"[:300])
    return v


def validate_config(config: Any, where: str = CONFIG_FILE) -> dict[str, Any]:
    """Check a saved model's config.json before anything is built: keys, types, sizes, registered name.

    Returns the config; raises ShrinkError with one line naming the bad entry.
    """
    if not isinstance(config, dict):
        raise ShrinkError(f"{where}: expected a JSON object, got {type(config).__name__}")
    if config.get("format") != FORMAT:
        raise ShrinkError(f"{where}: unknown format {str(config.get('format'))[:60]!r} (expected {FORMAT!r})")
    name = config.get("architecture")
    if not isinstance(name, str) or not name:
        raise ShrinkError(f"{where}: 'architecture' must be a timm model name, got {str(name)[:60]!r}")
    if not timm.is_model(name):
        raise ShrinkError(f"{where}: unknown model {name[:80]!r} (not registered with timm)")
    kwargs = config.get("model_kwargs", {})
    if not isinstance(kwargs, dict):
        raise ShrinkError(f"{where}: 'model_kwargs' must be an object, got {type(kwargs).__name__}")
    for k, v in kwargs.items():
        if k in _FACTORY_KWARGS or k.startswith("_"):
            raise ShrinkError(f"{where}: model_kwargs.{k} is not a model argument (refused)")
        _check_json_value(k, v, where)
    estimate = _estimate_params(kwargs)
    if estimate > MAX_PARAMS:
        raise ShrinkError(f"{where}: model_kwargs describe about {estimate:,} parameters; refusing to build "
                          f"(limit {MAX_PARAMS:,})")
    free = _index_list(config.get("attention_free_blocks", []), "attention_free_blocks", where)
    if not isinstance(config.get("folded", False), bool):
        raise ShrinkError(f"{where}: 'folded' must be true or false")
    diluted = config.get("diluted_blocks", {})
    if not isinstance(diluted, dict):
        raise ShrinkError(f"{where}: 'diluted_blocks' must be an object of block index -> lambda")
    idx = []
    for k, v in diluted.items():
        if not k.isdigit():
            raise ShrinkError(f"{where}: diluted_blocks key {k[:20]!r} is not a block index")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and 0.0 <= v <= 1.0):
            raise ShrinkError(f"{where}: diluted_blocks[{k}] must be a lambda in [0, 1], got {v!r}")
        idx.append(int(k))
    _index_list(idx, "diluted_blocks", where)
    if set(idx) & set(free):
        raise ShrinkError(f"{where}: blocks {sorted(set(idx) & set(free))} are both attention-free and diluted")
    scales = config.get("residual_scales", {})
    if not isinstance(scales, dict):
        raise ShrinkError(f"{where}: 'residual_scales' must be an object of block index -> scale")
    for k, v in scales.items():
        if not k.isdigit() or int(k) not in {*idx, *free}:
            raise ShrinkError(f"{where}: residual_scales key {k[:20]!r} is not a diluted or attention-free block")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
            raise ShrinkError(f"{where}: residual_scales[{k}] must be a positive number, got {v!r}")
    for key, kind in (("data_config", dict), ("extra", dict)):
        if key in config and not isinstance(config[key], kind):
            raise ShrinkError(f"{where}: '{key}' must be a JSON object")
    _check_data_config(config.get("data_config", {}), where)
    return config


DATA_CONFIG_KEYS = {"input_size": list, "interpolation": str, "mean": list, "std": list, "crop_pct": (int, float),
                    "crop_mode": str, "num_classes": int}


def _check_data_config(data: dict[str, Any], where: str) -> None:
    for k, v in data.items():
        kind = DATA_CONFIG_KEYS.get(k)
        if kind is None or v is None:
            continue  # unknown keys are kept but never used; null is timm's "not set"
        if isinstance(v, bool) or not isinstance(v, kind):
            raise ShrinkError(f"{where}: data_config.{k} has the wrong type ({type(v).__name__})")
        if kind is list and (not 1 <= len(v) <= 4 or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)):
            raise ShrinkError(f"{where}: data_config.{k} must be a short list of numbers, got {str(v)[:60]}")
        if k == "input_size" and (len(v) != 3 or not all(isinstance(x, int) and 1 <= x <= 16384 for x in v)):
            raise ShrinkError(f"{where}: data_config.input_size must be [channels, height, width], got {str(v)[:60]}")
        if k == "crop_pct" and not (math.isfinite(v) and 0 < v <= 4.0):  # timm has 1.15 (VOLO at 448)
            raise ShrinkError(f"{where}: data_config.crop_pct must be in (0, 4], got {v}")
        if k == "std" and any(x == 0 for x in v):
            raise ShrinkError(f"{where}: data_config.std holds a zero")


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` of a saved model directory, checked against the schema (:func:`validate_config`)."""
    cfg_path = Path(path) / CONFIG_FILE
    if not cfg_path.is_file():
        raise ShrinkError(f"not a saved shrink model: {cfg_path} is missing")
    if cfg_path.stat().st_size > _MAX_CONFIG_BYTES:
        raise ShrinkError(f"{cfg_path} is larger than {_MAX_CONFIG_BYTES} bytes; not a shrink config")

    def no_constant(c: str) -> Any:
        raise ValueError(f"{c} is not allowed")

    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"), parse_constant=no_constant)
    except (json.JSONDecodeError, ValueError, UnicodeDecodeError) as e:
        raise ShrinkError(f"cannot read {cfg_path}: {first_line(e)}") from None
    except RecursionError:
        raise ShrinkError(f"cannot read {cfg_path}: nested too deeply") from None
    return validate_config(config, str(cfg_path))


def config_values(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Model arguments as config.json values (tuples as lists); one that config.json cannot hold is
    refused in one line naming it."""
    return {k: jsonable(v, strict=True, where=f"model argument {k}") for k, v in kwargs.items()}
