"""Transforms: timm's train / eval transforms for a model, with the augmentation ops hardened.

Transforms for real images come from timm (``create_transform``), so the DeiT recipe
(RandAugment, colour jitter, random erasing, bicubic 256 -> 224 evaluation) is timm's own.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from shrink.errors import first_line

__all__ = ["AugmentationError", "augment_ops", "build_transform", "harden_augmentation", "model_data_config",
           "posterize_any_bits"]


class AugmentationError(Exception):
    """An augmentation op that failed; :class:`DataPipelineError` adds the file it failed on."""


class _GuardedOp:
    """A timm augmentation op function that names itself when it fails (picklable: workers may spawn)."""

    def __init__(self, name: str, fn):
        self.name, self.fn = name, fn

    def __call__(self, img, *args, **kwargs):
        fill = kwargs.get("fillcolor")
        bands = len(img.getbands()) if hasattr(img, "getbands") else None
        if isinstance(fill, (tuple, list)) and bands == 1 and len(fill) != 1:
            # timm fills with the RGB mean; a grey image takes one value (their mean)
            kwargs["fillcolor"] = round(sum(fill) / len(fill))
        try:
            return self.fn(img, *args, **kwargs)
        except Exception as e:  # noqa: BLE001 - re-raised in one line, naming the op
            size = "x".join(map(str, getattr(img, "size", ()))) or "?"
            shown = ", ".join(f"{a:.3g}" if isinstance(a, float) else str(a) for a in args)
            raise AugmentationError(f"augmentation {self.name}({shown}) failed on a {getattr(img, 'mode', '?')} "
                                    f"{size} image: {type(e).__name__}: {first_line(e)}") from None


def posterize_any_bits(img, bits_to_keep, **kwargs):
    """timm's posterize, with 0 bits giving what Pillow < 13 gave (an all-black image) instead of an error.

    timm's RandAugment asks for 0 bits at the top magnitudes of ``PosterizeIncreasing`` and the bottom
    ones of ``Posterize``; Pillow 13 refuses bits outside 1..8.
    """
    from PIL import ImageOps
    from timm.data import auto_augment

    if bits_to_keep <= 0 and img.mode in ("L", "RGB"):
        return img.point([0] * 256 * len(img.getbands()))
    if bits_to_keep <= 0:  # the modes Pillow's posterize refuses anyway: its own error
        return ImageOps.posterize(img, 1)
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


def augment_ops(transform) -> list:
    """The timm ``AugmentOp``s of a transform (RandAugment, AutoAugment, AugMix), in order."""
    from timm.data.auto_augment import AugmentOp

    found: list = []

    def walk(obj, depth: int = 0) -> None:
        if depth > 6:
            return
        if isinstance(obj, AugmentOp):
            found.append(obj)
        elif isinstance(obj, (list, tuple)):
            for item in obj:
                walk(item, depth + 1)
        else:
            for attr in ("transforms", "ops", "policy"):
                if isinstance(getattr(obj, attr, None), (list, tuple)):
                    walk(getattr(obj, attr), depth + 1)

    walk(transform)
    return found


def harden_augmentation(transform):
    """Make timm's augmentation ops work with the installed Pillow and name themselves when they fail.

    Only each op's image function is replaced (posterize by :func:`posterize_any_bits`, every op
    wrapped to name itself in an error); the policy, the ops' probabilities and magnitudes and their
    random draws stay timm's, so a run draws exactly the augmentations timm would.
    """
    from timm.data import auto_augment

    for op in augment_ops(transform):
        fn = op.aug_fn.fn if isinstance(op.aug_fn, _GuardedOp) else op.aug_fn
        if fn is auto_augment.posterize:
            fn = posterize_any_bits
        op.aug_fn = _GuardedOp(op.name, fn)
    return transform


def model_data_config(model: nn.Module | None, input_size: int | None) -> dict[str, Any]:
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model) if model is not None else {
        "input_size": (3, 224, 224), "interpolation": "bicubic",
        "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "crop_pct": 0.875}
    if input_size is not None:
        cfg["input_size"] = (cfg["input_size"][0], input_size, input_size)
    elif model is not None:  # the size the model was built for, not its pretrained_cfg's (224 for img_size=64)
        for owner in (getattr(model, "patch_embed", None), getattr(model, "stem", None)):
            size = getattr(owner, "img_size", None)
            if isinstance(size, (tuple, list)) and len(size) == 2:
                cfg["input_size"] = (cfg["input_size"][0], int(size[0]), int(size[1]))
                break
    return cfg


def build_transform(train: bool, model: nn.Module | None = None, input_size: int | None = None,
                    aug: dict[str, Any] | None = None):
    """timm's train or eval transform for the model's input size, mean and std.

    ``aug`` passes the DeiT recipe to ``timm.data.create_transform`` (auto_augment, color_jitter,
    re_prob, ...). Evaluation resizes to ``size / crop_pct`` then centre-crops (256 -> 224).
    """
    from timm.data import create_transform

    cfg = model_data_config(model, input_size)
    kwargs = dict(input_size=cfg["input_size"], interpolation=cfg.get("interpolation", "bicubic"),
                  mean=cfg["mean"], std=cfg["std"])
    if train:
        kwargs.update(aug or {})
        return harden_augmentation(create_transform(is_training=True, **kwargs))
    return create_transform(is_training=False, crop_pct=cfg.get("crop_pct", 0.875), **kwargs)
