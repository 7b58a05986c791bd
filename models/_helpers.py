"""What the project's MLP families share: normalisation constants, cfg defaults, the build call.

None of these models has downloadable weights: ``pretrained=True`` raises timm's own error (no
source for the weights). Local files of the original repositories load with
``shrink.load_checkpoint`` (or ``timm.create_model(name, pretrained=True,
pretrained_cfg_overlay=dict(file=path))`` for files already in this module's key names).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import to_2tuple, trunc_normal_
from timm.models import build_model_with_cfg
from torch import nn

__all__ = [
    "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD", "IMAGENET_DEFAULT_MEAN",
    "IMAGENET_DEFAULT_STD", "build", "cfg", "init_linear", "rename_keys",
]

# Per-channel statistics of the training images (torchvision's CIFAR, pixels scaled to [0, 1]).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


def cfg(**kwargs: Any) -> dict[str, Any]:
    """A timm pretrained cfg without weights (no url, no hub id): ImageNet 224 px unless overridden."""
    out = {
        "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.9,
        "interpolation": "bicubic", "fixed_input_size": True, "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD, "first_conv": "", "classifier": "head",
    }
    out.update(kwargs)
    return out


def build(
    model_cls: Callable[..., nn.Module],
    variant: str,
    pretrained: bool,
    *,
    filter_fn: Callable[..., Any] | None = None,
    feature_cfg: dict[str, Any] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """``build_model_with_cfg`` for a weight-less variant; the cfg's input size follows ``img_size``.

    ``feature_cfg`` is timm's: ``dict(out_indices=..., feature_cls='getter')`` makes ``features_only=True``
    wrap the model in ``FeatureGetterNet`` (its ``forward_intermediates``), as timm's ViT / Mixer do.
    """
    model = build_model_with_cfg(model_cls, variant, pretrained, pretrained_filter_fn=filter_fn,
                                 feature_cfg=feature_cfg, **kwargs)
    img_size = kwargs.get("img_size")
    if img_size is not None:
        old = model.pretrained_cfg["input_size"]
        in_chans = kwargs.get("in_chans", old[0])
        size = (in_chans, *to_2tuple(img_size))
        update: dict[str, Any] = {"input_size": size}
        pool = model.pretrained_cfg.get("pool_size")
        if pool:  # the final map scales with the input
            update["pool_size"] = tuple(max(1, p * n // o) for p, n, o in zip(pool, size[1:], old[1:], strict=True))
        model.pretrained_cfg = model.default_cfg = {**model.pretrained_cfg, **update}
    return model


def init_linear(m: nn.Module) -> None:
    """Linear layers: truncated-normal weights (std 0.02), zero bias (timm's ViT/Mixer default); use with apply."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def rename_keys(state_dict: dict[str, torch.Tensor], rules) -> dict[str, torch.Tensor]:
    """Apply (compiled regex, replacement) rules to every key, in order; values are kept as they are."""
    out = {}
    for k, v in state_dict.items():
        for pattern, repl in rules:
            k = pattern.sub(repl, k)
        out[k] = v
    return out
