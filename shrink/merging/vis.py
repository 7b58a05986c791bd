"""Pictures of token merging: which input patches ToMe merged into the same token, for one image.

Each final token is a group of patches (from the source map that ToMe tracks); the picture fills
every group with its mean colour and outlines it, next to the input crop.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from shrink.errors import ShrinkError
from shrink.io import atomic_write
from shrink.merging.patch import is_tome, tome_state
from shrink.unwrap import unwrap

_logger = logging.getLogger(__name__)


def _grid(model: nn.Module, height: int, width: int) -> tuple[int, int]:
    pe = model.patch_embed
    if hasattr(pe, "dynamic_feat_size"):
        gh, gw = pe.dynamic_feat_size((height, width))
    else:
        gh, gw = pe.grid_size
    return int(gh), int(gw)


@torch.inference_mode()
def merge_groups(model: nn.Module, image: torch.Tensor) -> torch.Tensor:
    """Group id of every patch ``(grid_h, grid_w)`` after the last block, for one normalised image.

    ``image`` is ``(1, C, H, W)`` or ``(C, H, W)``; the model must have ToMe applied.
    """
    model = unwrap(model)
    if not is_tome(model):
        raise ShrinkError("the model has no ToMe applied: call shrink.merging.patch.apply_tome(model, r) first")
    if image.dim() == 3:
        image = image.unsqueeze(0)
    if image.dim() != 4 or image.shape[0] != 1:
        raise ShrinkError(f"expected one image (1, C, H, W), got shape {tuple(image.shape)}")
    state = tome_state(model)
    p = next(model.parameters())
    was_training, was_tracing = model.training, state.trace_source
    try:
        model.eval()
        state.trace_source = True
        model(image.to(device=p.device, dtype=p.dtype))
        source = state.source
    finally:
        state.trace_source = was_tracing
        model.train(was_training)
    gh, gw = _grid(model, image.shape[-2], image.shape[-1])
    patches = source[0, :, state.num_protected:]  # (tokens, patches); CaiT: no prefix token in the blocks
    if patches.shape[1] != gh * gw:
        raise ShrinkError(f"source map has {patches.shape[1]} patches, expected a {gh}x{gw} grid")
    return patches.argmax(dim=0).reshape(gh, gw).cpu()


def render_groups(rgb: np.ndarray, groups: torch.Tensor | np.ndarray) -> np.ndarray:
    """Fill every patch group of ``rgb`` ``(H, W, 3)`` in [0, 1] with its mean colour, outlined."""
    groups = np.asarray(groups)
    h, w = rgb.shape[:2]
    gh, gw = groups.shape
    if h % gh or w % gw:
        raise ShrinkError(f"image {h}x{w} is not a whole number of {gh}x{gw} patches")
    label = np.repeat(np.repeat(groups, h // gh, axis=0), w // gw, axis=1)
    out = np.zeros_like(rgb, dtype=np.float64)
    flat_label = label.reshape(-1)
    counts = np.bincount(flat_label)
    for c in range(3):
        sums = np.bincount(flat_label, weights=rgb[..., c].reshape(-1).astype(np.float64), minlength=len(counts))
        means = sums / np.maximum(counts, 1)
        out[..., c] = means[label]
    edge = np.zeros((h, w), dtype=bool)
    edge[:-1, :] |= label[:-1, :] != label[1:, :]
    edge[:, :-1] |= label[:, :-1] != label[:, 1:]
    out[edge] = 1.0
    return out.clip(0.0, 1.0)


def load_image(image: str | os.PathLike | Image.Image, size: tuple[int, int]) -> np.ndarray:
    """RGB image resized (shorter side) and centre-cropped to ``size`` (H, W), floats in [0, 1]."""
    if not isinstance(image, Image.Image):
        path = Path(image)
        if not path.is_file():
            raise ShrinkError(f"image not found: {path}")
        try:
            image = Image.open(path)
            image.load()
        except OSError as e:
            raise ShrinkError(f"cannot read image {path}: {e}") from None
    image = image.convert("RGB")
    th, tw = size
    scale = max(th / image.height, tw / image.width)
    nw, nh = max(tw, round(image.width * scale)), max(th, round(image.height * scale))
    image = image.resize((nw, nh), Image.BICUBIC)
    left, top = (nw - tw) // 2, (nh - th) // 2
    image = image.crop((left, top, left + tw, top + th))
    return np.asarray(image, dtype=np.float32) / 255.0


def _normalise(model: nn.Module, rgb: np.ndarray) -> torch.Tensor:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean = torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406)), dtype=torch.float32)[:, None, None]
    std = torch.tensor(cfg.get("std", (0.229, 0.224, 0.225)), dtype=torch.float32)[:, None, None]
    x = torch.from_numpy(rgb).permute(2, 0, 1)
    proj = getattr(getattr(model, "patch_embed", None), "proj", None)
    if getattr(proj, "in_channels", 3) == 1:  # grey-scale models (e.g. vit_digits): ITU-R 601 luma
        x = (x * torch.tensor([0.299, 0.587, 0.114])[:, None, None]).sum(0, keepdim=True)
        mean, std = mean[:1], std[:1]
    return ((x - mean) / std).unsqueeze(0)


def save_merge_png(
    model: nn.Module, image: str | os.PathLike | Image.Image, path: str | os.PathLike, title: str | None = None
) -> Path:
    """Write a PNG (input crop | merged patch groups) for ``image`` through a ToMe model, atomically."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    model = unwrap(model)
    img_size = getattr(model.patch_embed, "img_size", None)
    if img_size is None:
        raise ShrinkError("cannot tell the model's input size (patch_embed.img_size)")
    rgb = load_image(image, (int(img_size[0]), int(img_size[1])))
    groups = merge_groups(model, _normalise(model, rgb))
    picture = render_groups(rgb, groups)
    n_groups = int(np.unique(groups.numpy()).size)

    fig, axes = plt.subplots(1, 2, figsize=(8, 4.3))
    try:
        axes[0].imshow(rgb)
        axes[0].set_title(f"input ({groups.numel()} patches)")
        axes[1].imshow(picture)
        axes[1].set_title(f"merged: {n_groups} patch tokens")
        for ax in axes:
            ax.axis("off")
        if title:
            fig.suptitle(title)
        fig.tight_layout(rect=(0, 0, 1, 0.94) if title else None)
        out = atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=100))
    finally:
        plt.close(fig)
    _logger.info("wrote %s (%d groups from %d patches)", out, n_groups, groups.numel())
    return out
