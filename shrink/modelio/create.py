"""Build any timm model by name, checked first: ``create_model`` and its meta-device checks.

``create_model`` is ``timm.create_model`` that checks names, arguments and sizes on the meta device
before anything is allocated or downloaded (:func:`model_skeleton`), fails fast in one line when
pretrained weights must come from a hub that cannot be reached (:func:`check_hub`), loads a local
checkpoint (:mod:`shrink.modelio.checkpoint`, or a folder written by :func:`~shrink.modelio.saved.save`),
and remembers how the model was built. Saving and loading live in :mod:`shrink.modelio.saved`, the
config.json schema in :mod:`shrink.modelio.schema`; their public names answer here too.
"""
from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch
from torch import nn

from shrink.errors import ShrinkError, first_line
from shrink.introspect import input_size
from shrink.modelio.checkpoint import load_checkpoint
from shrink.modelio.saved import (
    _MISSING,
    _check_size,
    _same_value,
    build_from_config,
    check_input_size,
    describe_architecture,
    load,
    save,
    timm_skeleton,
)
from shrink.modelio.schema import (
    CONFIG_FILE,
    FORMAT,
    MAX_PARAMS,
    MODEL_FILE,
    config_values,
    read_config,
    validate_config,
)

# The names of the flat layout's shrink.factory (an alias of this module for one release,
# shrink._old_paths); the library imports them from their own modules.
__all__ = [
    "FORMAT", "MODEL_FILE", "CONFIG_FILE", "MAX_PARAMS", "build_from_config", "check_hub", "check_input_size",
    "create_model", "describe_architecture", "input_size", "load", "model_skeleton", "read_config", "save", "validate_config",
]


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
    model = timm_skeleton(name, kwargs)
    model.shrink_arch = {"name": name, "kwargs": config_values(kwargs)}
    return model


def _saved_with_overrides(path: str | os.PathLike, name: str | None,
                          kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A saved model's config with ``kwargs`` overriding its model_kwargs, and the overrides that changed it."""
    config = read_config(path)
    arch = config["architecture"]
    if name is not None and name != arch:
        raise ShrinkError(f"{path} holds a {arch}, not a {name}; give --model {arch} or leave --model out")
    saved = dict(config.get("model_kwargs", {}))
    overrides = {k: v for k, v in config_values(kwargs).items() if not _same_value(v, saved.get(k, _MISSING))}
    if not overrides:
        return config, {}
    merged = {**config, "model_kwargs": {**saved, **overrides}}
    return validate_config(merged, f"{path}/{CONFIG_FILE} with {overrides}"), overrides


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
    skeleton = timm_skeleton(name, kwargs)  # cheap checks before any download or allocation
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
    model.shrink_arch = {"name": name, "kwargs": config_values(kwargs)}
    if checkpoint is not None:
        model.shrink_head_reinitialised = load_checkpoint(model, checkpoint)["reinitialised"]  # train.py reports it
    return model
