"""Models in and out: build any timm model by name (checked first), save a shrunk one, load it back.

``create_model`` is ``timm.create_model`` that checks names, arguments and sizes on the meta device
before anything is allocated or downloaded, loads a local checkpoint (:mod:`shrink.modelio.checkpoint`),
and remembers how the model was built. ``save`` writes ``model.safetensors`` + ``config.json``
atomically, with the block structure (diluted / attention-free blocks); ``load`` rebuilds that
structure and loads the weights strictly, after checking the config's schema and the file's header.
"""
from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from shrink.blocks.attention_free import AttentionFreeBlock, attention_free_indices, export, is_folded
from shrink.blocks.contract import block_family
from shrink.blocks.dilution import DilutedBlock, dilute, get_blocks
from shrink.errors import ShrinkError, first_line
from shrink.io import atomic_dir
from shrink.modelio.checkpoint import key_report, load_checkpoint
from shrink.unwrap import unwrap

__all__ = [
    "FORMAT", "MODEL_FILE", "CONFIG_FILE", "MAX_PARAMS", "build_from_config", "check_hub", "check_input_size",
    "create_model", "describe_architecture", "input_size", "load", "model_skeleton", "read_config", "save", "validate_config",
]

_logger = logging.getLogger(__name__)

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
    n = sum(p.numel() for p in model.parameters())
    if n > MAX_PARAMS:
        raise ShrinkError(f"{name} would have {n:,} parameters; refusing to build it (limit {MAX_PARAMS:,})")


def _timm_skeleton(name: str, kwargs: dict[str, Any]) -> nn.Module:
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


def model_skeleton(name: str | None, *, checkpoint: str | os.PathLike | None = None, **kwargs: Any) -> nn.Module:
    """The model :func:`create_model` would build, on the meta device: no memory, no download, no weights.

    For checking names, arguments, input sizes and layer indices before any heavy work.
    """
    if checkpoint is not None and Path(checkpoint).is_dir():
        config, _ = _saved_with_overrides(checkpoint, name, kwargs)
        with torch.device("meta"):
            return build_from_config(config)
    if not isinstance(name, str) or not timm.is_model(name):
        raise ShrinkError(f"unknown model {name!r}: not a timm model name (see timm.list_models())")
    model = _timm_skeleton(name, kwargs)
    model.shrink_arch = {"name": name, "kwargs": _jsonable(kwargs)}
    return model


def _saved_with_overrides(path: str | os.PathLike, name: str | None,
                          kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A saved model's config with ``kwargs`` overriding its model_kwargs, and the overrides that changed it."""
    config = read_config(path)
    arch = config["architecture"]
    if name is not None and name != arch:
        raise ShrinkError(f"{path} holds a {arch}, not a {name}; give --model {arch} or leave --model out")
    saved = dict(config.get("model_kwargs", {}))
    overrides = {k: v for k, v in _jsonable(kwargs).items() if not _same_value(v, saved.get(k, _MISSING))}
    if not overrides:
        return config, {}
    merged = {**config, "model_kwargs": {**saved, **overrides}}
    return validate_config(merged, f"{path}/{CONFIG_FILE} with {overrides}"), overrides


_MISSING = object()


def _hub_url(model: nn.Module) -> str | None:
    """Where timm would download ``model``'s pretrained weights from; None when no download is needed
    (a local file, or already in the hub cache); '' when timm knows no weights for it."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if cfg.get("file"):
        return None
    hf = cfg.get("hf_hub_id")
    if hf:
        from huggingface_hub import try_to_load_from_cache
        from huggingface_hub.constants import ENDPOINT

        repo, _, revision = hf.partition("@")
        for fname in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
            try:
                hit = try_to_load_from_cache(repo, fname, revision=revision or None)
            except Exception:  # noqa: BLE001 - a damaged cache is a miss
                hit = None
            if isinstance(hit, str):
                return None
        return f"{ENDPOINT.rstrip('/')}/{repo}"
    url = cfg.get("url")
    if url:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
        return None if cached.is_file() else url
    return ""


def _reachable(url: str, timeout: float = 3.0) -> bool:
    """Can a TCP connection to ``url``'s host (or the HTTPS proxy) be opened within ``timeout`` seconds?"""
    parsed = urlparse(url)
    host, port = parsed.hostname or "", parsed.port or (80 if parsed.scheme == "http" else 443)
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    no_proxy = [d.strip().lstrip(".") for d in (os.environ.get("NO_PROXY") or os.environ.get("no_proxy") or "").split(",")]
    if proxy and not any(d and host.endswith(d) for d in no_proxy):
        pp = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        host, port = pp.hostname or host, pp.port or 80
    ok: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                ok.append(True)
        except (OSError, UnicodeError):
            ok.append(False)

    t = threading.Thread(target=probe, daemon=True)  # name resolution has no timeout of its own
    t.start()
    t.join(timeout + 0.5)
    return bool(ok and ok[0])


def check_hub(name: str, skeleton: nn.Module) -> None:
    """Fail fast, in one line, when pretrained weights must come from a hub that cannot be reached."""
    url = _hub_url(skeleton)
    if url is None:
        return
    if not url:
        raise ShrinkError(f"timm has no pretrained weights for {name}; use --no-pretrained or --finetune FILE")
    from huggingface_hub.constants import HF_HUB_OFFLINE

    if HF_HUB_OFFLINE and (getattr(skeleton, "pretrained_cfg", None) or {}).get("hf_hub_id"):
        raise ShrinkError(f"the pretrained weights of {name} are not in the local cache and HF_HUB_OFFLINE is set; "
                          f"pass a local file with --finetune, or --no-pretrained")
    if not _reachable(url):
        raise ShrinkError(f"cannot reach {urlparse(url).hostname} to download the pretrained weights of {name} "
                          f"(no network?); pass a local file with --finetune, or --no-pretrained")


def create_model(
    name: str | None,
    *,
    pretrained: bool = False,
    checkpoint: str | os.PathLike | None = None,
    **kwargs: Any,
) -> nn.Module:
    """``timm.create_model`` that remembers how it was built (for ``save``/``load``).

    ``checkpoint`` loads a local weights file strictly (DeiT ``.pth``, ``.safetensors``, or a
    directory written by :func:`save`); ``pretrained`` uses timm's hub download, which fails fast in
    one line when the hub cannot be reached. For a saved directory, ``name`` may be None (the saved
    architecture) or must equal it, and ``kwargs`` override the saved ones: ``num_classes``
    re-initialises the head, ``img_size`` resamples ``pos_embed``, ``drop_path_rate`` applies.
    Names, arguments and input sizes are checked on the meta device before anything is allocated.
    """
    if checkpoint is not None and Path(checkpoint).is_dir():
        config, overrides = _saved_with_overrides(checkpoint, name, kwargs)
        if not overrides:
            return load(checkpoint)
        with torch.device("meta"):
            skeleton = build_from_config(config)
        _check_size(skeleton, config["architecture"])
        model = build_from_config(config)
        report = load_checkpoint(model, Path(checkpoint) / MODEL_FILE, reset_head=True)
        model.shrink_head_reinitialised = report["reinitialised"]  # train.py reports it
        return model.eval()
    if name is None:
        raise ShrinkError("create_model needs a model name (or checkpoint= a folder written by shrink.save)")
    if not isinstance(name, str) or not timm.is_model(name):
        raise ShrinkError(f"unknown model {name!r}: not a timm model name (see timm.list_models())")
    skeleton = _timm_skeleton(name, kwargs)  # cheap checks before any download or allocation
    if pretrained:
        check_hub(name, skeleton)
    del skeleton
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except TypeError as e:
        raise ShrinkError(f"cannot build {name} with {kwargs}: {e}") from None
    except (OSError, RuntimeError, ValueError) as e:
        if pretrained:
            raise ShrinkError(
                f"could not get pretrained weights for {name} (no network or hub access?): {first_line(e)}; "
                f"pass a local file with --finetune/checkpoint instead"
            ) from None
        raise
    model.shrink_arch = {"name": name, "kwargs": _jsonable(kwargs)}
    if checkpoint is not None:
        model.shrink_head_reinitialised = load_checkpoint(model, checkpoint)["reinitialised"]  # train.py reports it
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
        for k, v in _jsonable(recorded).items():
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


def input_size(model: nn.Module, img_size: int | None = None) -> tuple[int, int, int]:
    """(C, H, W) the model expects: ``img_size`` if given, else its build size, else its pretrained_cfg."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    c, h, w = tuple(cfg.get("input_size", (3, 224, 224)))
    if img_size is not None:
        return c, img_size, img_size
    for owner in (getattr(model, "patch_embed", None), getattr(model, "stem", None)):
        size = getattr(owner, "img_size", None)
        if isinstance(size, (tuple, list)) and len(size) == 2:
            return c, int(size[0]), int(size[1])
    return c, h, w


DATA_CONFIG_KEYS = {"input_size": list, "interpolation": str, "mean": list, "std": list, "crop_pct": (int, float),
                    "crop_mode": str, "num_classes": int}


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


def save(model: nn.Module, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
    """Write ``model`` to directory ``path`` (``model.safetensors`` + ``config.json``), atomically."""
    model = unwrap(model)
    config = {"format": FORMAT, **describe_architecture(model), "data_config": _data_config(model),
              "num_params": sum(p.numel() for p in model.parameters())}
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


def build_from_config(config: dict[str, Any]) -> nn.Module:
    """An (untrained) model with the structure a config.json describes (checked first)."""
    validate_config(config)
    name = config["architecture"]
    kwargs = dict(config.get("model_kwargs", {}))
    meta = torch.empty(0).device.type == "meta"
    if meta:
        model = _timm_skeleton(name, kwargs)
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
