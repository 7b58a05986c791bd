"""What a model says about itself: the image size it takes and how many parameters it has.

The one copy of each; selection, merging, training, deployment, measuring and planning ask here.
"""
from __future__ import annotations

import numbers
from collections.abc import Sequence

from torch import nn

from shrink.errors import ShrinkError

__all__ = ["input_size", "num_params"]


def num_params(module: nn.Module) -> int:
    """Parameters of ``module`` (each counted once, shared ones included once, as ``nn.Module.parameters``)."""
    return sum(p.numel() for p in module.parameters())


def _channels(model: nn.Module, cfg: dict) -> int:
    proj = getattr(getattr(model, "patch_embed", None), "proj", None)
    if isinstance(getattr(proj, "in_channels", None), int):
        return proj.in_channels
    return int(tuple(cfg.get("input_size", (3,)))[0])


def input_size(model: nn.Module, size: int | Sequence[int] | None = None, *,
               img_size: int | None = None) -> tuple[int, int, int]:
    """(C, H, W) of one image for ``model``.

    ``size`` may be an int (a square side), (H, W) or (C, H, W); without it, the size the model was
    built for (its patch embedding's or stem's ``img_size``), else its ``pretrained_cfg``, else 224.
    The channels come from the patch embedding, else the ``pretrained_cfg``. ``img_size=`` is the
    keyword of ``shrink.modelio.create.input_size``, which is this function.
    """
    if img_size is not None:
        if size is not None:
            raise ShrinkError("give the input size once (size or img_size), not both")
        size = img_size
    cfg = getattr(model, "pretrained_cfg", None) or {}
    c = _channels(model, cfg)
    if size is None:
        for owner in (getattr(model, "patch_embed", None), getattr(model, "stem", None)):
            img = getattr(owner, "img_size", None)
            if isinstance(img, (tuple, list)) and len(img) == 2:
                return c, int(img[0]), int(img[1])
        _, h, w = tuple(cfg.get("input_size", (c, 224, 224)))
        return c, int(h), int(w)
    if isinstance(size, numbers.Integral) and not isinstance(size, bool):
        dims: tuple[int, ...] = (c, int(size), int(size))
    elif isinstance(size, Sequence) and not isinstance(size, str) and len(size) in (2, 3) and all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in size):
        dims = (c, *map(int, size)) if len(size) == 2 else tuple(map(int, size))
    else:
        raise ShrinkError(f"input size must be an int, (H, W) or (C, H, W), got {size!r}")
    if min(dims) < 1:
        raise ShrinkError(f"input size must be positive, got {size!r}")
    return dims  # type: ignore[return-value]
