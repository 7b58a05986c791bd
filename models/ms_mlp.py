"""MS-MLP: "Mixing and Shifting: Exploiting Global and Local Dependencies in Vision MLPs" (Zheng et al., 2022).

A Swin-like 4-stage pyramid (patch 4 stem, 2x2 strided-conv downsampling that doubles the width)
of mix-shift blocks. A block splits the channels into ``len(shift_dist)`` groups (``torch.chunk``
sizes), rolls group g by ``shift_dist[g]`` pixels along W and, separately, along H, mixes each
rolled group with a depthwise ``k_g x k_g`` conv (``mix_size``: bigger kernels for more distant
groups), adds the two directions, then runs LayerNorm -> channel MLP (ratio 4) -> LayerScale
(init 1e-6) on a residual. Head: global average pool -> LayerNorm -> linear.

Published configs (patch 4, shift 5, distances -2..2, mix sizes [[1,1,3,5,7], [1,3,3,5,7],
[1,5,5,5,7], [1,7,7,7,7]]): Tiny width 96, depths 3-3-9-3 (28M); Small 96, 3-3-27-3 (50M);
Base 128, 3-3-27-3 (88M). Key names here are timm-style; :func:`checkpoint_filter_fn` maps the
original ones (``patch_embed``, ``layers.i``, ``dwconv_lr`` / ``dwconv_td``, ``pwconv1`` / ``pwconv2``,
``gamma``).
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from timm.layers import DropPath, LayerScale, Mlp
from timm.models import generate_default_cfgs, register_model
from torch import nn

from ._helpers import CIFAR100_MEAN, CIFAR100_STD, build, cfg, init_linear, rename_keys

__all__ = ["MSMLP", "MixShiftBlock", "ShiftMix", "checkpoint_filter_fn"]

_LN = partial(nn.LayerNorm, eps=1e-6)
_MIX_SIZE = ((1, 1, 3, 5, 7), (1, 3, 3, 5, 7), (1, 5, 5, 5, 7), (1, 7, 7, 7, 7))
_SHIFT_DIST = (-2, -1, 0, 1, 2)


def chunk_sizes(dim: int, groups: int) -> list[int]:
    """The channel split of ``torch.chunk(x, groups)``: equal chunks of ceil(dim / groups), the last smaller."""
    size = math.ceil(dim / groups)
    sizes = [min(size, dim - i * size) for i in range(math.ceil(dim / size))]
    if len(sizes) != groups:
        raise ValueError(f"MS-MLP: {dim} channels do not split into {groups} groups the way torch.chunk does ({sizes})")
    return sizes


class ShiftMix(nn.Module):
    """Roll channel group g by ``shift_dist[g]`` along W and along H, depthwise-conv each, add both directions."""

    def __init__(self, dim: int, shift_dist: Sequence[int] = _SHIFT_DIST, mix_size: Sequence[int] = _MIX_SIZE[0]) -> None:
        super().__init__()
        if len(mix_size) != len(shift_dist):
            raise ValueError(f"MS-MLP: {len(shift_dist)} shift distances but {len(mix_size)} mixing sizes")
        self.shift_dist = tuple(int(s) for s in shift_dist)
        self.chunks = chunk_sizes(dim, len(self.shift_dist))

        def convs() -> nn.ModuleList:
            return nn.ModuleList(nn.Conv2d(c, c, k, padding=k // 2, groups=c) for c, k in zip(self.chunks, mix_size, strict=True))

        self.conv_w = convs()  # after the shift along W (the original's dwconv_lr)
        self.conv_h = convs()  # after the shift along H (the original's dwconv_td)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = torch.split(x, self.chunks, dim=1)
        w = [conv(torch.roll(g, s, dims=3)) for g, s, conv in zip(groups, self.shift_dist, self.conv_w, strict=True)]
        h = [conv(torch.roll(g, s, dims=2)) for g, s, conv in zip(groups, self.shift_dist, self.conv_h, strict=True)]
        return torch.cat(w, dim=1) + torch.cat(h, dim=1)


class MixShiftBlock(nn.Module):
    """``x + drop_path(ls(mlp(norm(shift_mix(x)))))`` on an NCHW feature map."""

    def __init__(self, dim: int, shift_dist: Sequence[int], mix_size: Sequence[int], mlp_ratio: float = 4.0,
                 proj_drop: float = 0.0, drop_path: float = 0.0, init_values: float | None = 1e-6,
                 norm_layer: type[nn.Module] = _LN, act_layer: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.mix = ShiftMix(dim, shift_dist, mix_size)
        self.norm = norm_layer(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.ls = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mix(x).permute(0, 2, 3, 1)
        y = self.ls(self.mlp(self.norm(y))).permute(0, 3, 1, 2)
        return x + self.drop_path(y)


class ConvEmbed(nn.Module):
    """Strided conv (kernel = stride = ``patch_size``) then LayerNorm over channels; NCHW in and out."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int, norm_layer: type[nn.Module] = _LN) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = norm_layer(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class MSMLPStage(nn.Module):
    """``depth`` mix-shift blocks, then (except in the last stage) a 2x2 conv that halves H, W and doubles C."""

    def __init__(self, dim: int, depth: int, shift_dist: Sequence[int], mix_size: Sequence[int], mlp_ratio: float,
                 proj_drop: float, drop_path: Sequence[float], init_values: float | None, downsample: bool) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*[
            MixShiftBlock(dim, shift_dist, mix_size, mlp_ratio, proj_drop, drop_path[i], init_values)
            for i in range(depth)
        ])
        self.downsample = ConvEmbed(dim, 2 * dim, 2) if downsample else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample(self.blocks(x))


class MSMLP(nn.Module):
    """Mix-Shift-MLP: conv stem, four stages of mix-shift blocks, pool -> LayerNorm -> linear head."""

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 4,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 96,
        depths: Sequence[int] = (3, 3, 9, 3),
        shift_dist: Sequence[int] = _SHIFT_DIST,
        mix_size: Sequence[Sequence[int]] = _MIX_SIZE,
        mlp_ratio: float = 4.0,
        init_values: float | None = 1e-6,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        global_pool: str = "avg",
    ) -> None:
        super().__init__()
        if len(mix_size) != len(depths):
            raise ValueError(f"MS-MLP: {len(depths)} stages but {len(mix_size)} rows of mixing sizes")
        self.img_size = img_size
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = int(embed_dim * 2 ** (len(depths) - 1))
        self.stem = ConvEmbed(in_chans, embed_dim, patch_size)
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        stages, start = [], 0
        for i, depth in enumerate(depths):
            stages.append(MSMLPStage(
                embed_dim * 2 ** i, depth, shift_dist, mix_size[i], mlp_ratio, proj_drop_rate,
                dpr[start:start + depth], init_values, downsample=i < len(depths) - 1,
            ))
            start += depth
        self.stages = nn.Sequential(*stages)
        self.norm = _LN(self.num_features)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(init_linear)

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        # As the original: pool first, then the LayerNorm over channels.
        if self.global_pool == "avg":
            x = x.mean(dim=(2, 3))
        x = self.head_drop(self.norm(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


_ORIGINAL_KEYS = (
    (re.compile(r"^patch_embed\."), "stem."),
    (re.compile(r"^layers\.(\d+)\.downsample\."), r"stages.\1.downsample."),
    (re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.dwconv_lr\."), r"stages.\1.blocks.\2.mix.conv_w."),
    (re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.dwconv_td\."), r"stages.\1.blocks.\2.mix.conv_h."),
    (re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.pwconv1\."), r"stages.\1.blocks.\2.mlp.fc1."),
    (re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.pwconv2\."), r"stages.\1.blocks.\2.mlp.fc2."),
    (re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.gamma$"), r"stages.\1.blocks.\2.ls.gamma"),
    (re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.norm\."), r"stages.\1.blocks.\2.norm."),
)


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Rename the original repository's keys (``layers.i.blocks.j.dwconv_lr.g`` ...) to this module's."""
    return rename_keys(state_dict, _ORIGINAL_KEYS)


def _cfg(**kwargs: Any) -> dict[str, Any]:
    args = dict(crop_pct=0.875, first_conv="stem.proj", origin_url="https://github.com/JegZheng/MS-MLP",
                paper_ids="arXiv:2202.06510")
    return cfg(**{**args, **kwargs})


default_cfgs = generate_default_cfgs({
    "msmlp_tiny_patch4_shift5_224": _cfg(),
    "msmlp_small_patch4_shift5_224": _cfg(),
    "msmlp_base_patch4_shift5_224": _cfg(),
    "msmlp_nano": _cfg(num_classes=10, input_size=(3, 32, 32), crop_pct=1.0, mean=CIFAR100_MEAN, std=CIFAR100_STD),
})


def _create(variant: str, pretrained: bool, defaults: dict[str, Any], kwargs: dict[str, Any]) -> MSMLP:
    return build(MSMLP, variant, pretrained, filter_fn=checkpoint_filter_fn, **{**defaults, **kwargs})


@register_model
def msmlp_tiny_patch4_shift5_224(pretrained: bool = False, **kwargs: Any) -> MSMLP:
    """MS-MLP-Tiny: width 96, depths 3-3-9-3 (the original trains with drop_path_rate 0.1)."""
    return _create("msmlp_tiny_patch4_shift5_224", pretrained, dict(embed_dim=96, depths=(3, 3, 9, 3)), kwargs)


@register_model
def msmlp_small_patch4_shift5_224(pretrained: bool = False, **kwargs: Any) -> MSMLP:
    """MS-MLP-Small: width 96, depths 3-3-27-3 (the original trains with drop_path_rate 0.4)."""
    return _create("msmlp_small_patch4_shift5_224", pretrained, dict(embed_dim=96, depths=(3, 3, 27, 3)), kwargs)


@register_model
def msmlp_base_patch4_shift5_224(pretrained: bool = False, **kwargs: Any) -> MSMLP:
    """MS-MLP-Base: width 128, depths 3-3-27-3 (the original trains with drop_path_rate 0.5)."""
    return _create("msmlp_base_patch4_shift5_224", pretrained, dict(embed_dim=128, depths=(3, 3, 27, 3)), kwargs)


@register_model
def msmlp_nano(pretrained: bool = False, **kwargs: Any) -> MSMLP:
    """A test-sized MS-MLP: 32 px, width 10 (five groups of 2 channels), two stages of one block, 10 classes."""
    defaults = dict(embed_dim=10, depths=(1, 1), mix_size=((1, 1, 3, 3, 3), (1, 3, 3, 3, 3)))
    return _create("msmlp_nano", pretrained, defaults, kwargs)
