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
# No ``from __future__ import annotations`` here: torch.fx copies forward()'s annotations into the code it
# generates, and string annotations there break TorchScript of the traced graph (timm's fx + jit test).
import math
import re
from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from timm.layers import DropPath, LayerScale, Mlp, get_device_dtype
from timm.models import checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn

from ._helpers import CIFAR100_MEAN, CIFAR100_STD, build, cfg, init_linear, rename_keys

__all__ = ["MSMLP", "MixShiftBlock", "ShiftMix", "checkpoint_filter_fn"]

_LN = partial(nn.LayerNorm, eps=1e-6)
_MIX_SIZE = ((1, 1, 3, 5, 7), (1, 3, 3, 5, 7), (1, 5, 5, 5, 7), (1, 7, 7, 7, 7))
_SHIFT_DIST = (-2, -1, 0, 1, 2)
_POOLS = ("", "avg")


def chunk_sizes(dim: int, groups: int) -> list[int]:
    """The channel split of ``torch.chunk(x, groups)``: equal chunks of ceil(dim / groups), the last smaller."""
    size = math.ceil(dim / groups)
    sizes = [min(size, dim - i * size) for i in range(math.ceil(dim / size))]
    if len(sizes) != groups:
        raise ValueError(f"MS-MLP: {dim} channels do not split into {groups} groups the way torch.chunk does ({sizes})")
    return sizes


class ShiftMix(nn.Module):
    """Roll channel group g by ``shift_dist[g]`` along W and along H, depthwise-conv each, add both directions."""

    def __init__(self, dim: int, shift_dist: Sequence[int] = _SHIFT_DIST, mix_size: Sequence[int] = _MIX_SIZE[0],
                 device=None, dtype=None) -> None:
        dd = dict(device=device, dtype=dtype)
        super().__init__()
        if len(mix_size) != len(shift_dist):
            raise ValueError(f"MS-MLP: {len(shift_dist)} shift distances but {len(mix_size)} mixing sizes")
        self.shift_dist = [int(s) for s in shift_dist]
        self.chunks = chunk_sizes(dim, len(self.shift_dist))

        def convs() -> nn.ModuleList:
            return nn.ModuleList(nn.Conv2d(c, c, k, padding=k // 2, groups=c, **dd)
                                 for c, k in zip(self.chunks, mix_size, strict=True))

        self.conv_w = convs()  # after the shift along W (the original's dwconv_lr)
        self.conv_h = convs()  # after the shift along H (the original's dwconv_td)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Indexed loops (not zip over the split): TorchScript and torch.fx both take them.
        groups = torch.split(x, self.chunks, dim=1)
        w = []
        for i, conv in enumerate(self.conv_w):
            w.append(conv(torch.roll(groups[i], self.shift_dist[i], dims=3)))
        h = []
        for i, conv in enumerate(self.conv_h):
            h.append(conv(torch.roll(groups[i], self.shift_dist[i], dims=2)))
        return torch.cat(w, dim=1) + torch.cat(h, dim=1)


class MixShiftBlock(nn.Module):
    """``x + drop_path(ls(mlp(norm(shift_mix(x)))))`` on an NCHW feature map."""

    def __init__(self, dim: int, shift_dist: Sequence[int], mix_size: Sequence[int], mlp_ratio: float = 4.0,
                 proj_drop: float = 0.0, drop_path: float = 0.0, init_values: float | None = 1e-6,
                 norm_layer: type[nn.Module] = _LN, act_layer: type[nn.Module] = nn.GELU,
                 device=None, dtype=None) -> None:
        dd = dict(device=device, dtype=dtype)
        super().__init__()
        self.mix = ShiftMix(dim, shift_dist, mix_size, **dd)
        self.norm = norm_layer(dim, **dd)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop, **dd)
        self.ls = LayerScale(dim, init_values, **dd) if init_values else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.mix(x).permute(0, 2, 3, 1)
        y = self.ls(self.mlp(self.norm(y))).permute(0, 3, 1, 2)
        return x + self.drop_path(y)


class ConvEmbed(nn.Module):
    """Strided conv (kernel = stride = ``patch_size``) then LayerNorm over channels; NCHW in and out."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int, norm_layer: type[nn.Module] = _LN,
                 device=None, dtype=None) -> None:
        dd = dict(device=device, dtype=dtype)
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, **dd)
        self.norm = norm_layer(embed_dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class MSMLPStage(nn.Module):
    """``depth`` mix-shift blocks, then (except in the last stage) a 2x2 conv that halves H, W and doubles C."""

    def __init__(self, dim: int, depth: int, shift_dist: Sequence[int], mix_size: Sequence[int], mlp_ratio: float,
                 proj_drop: float, drop_path: Sequence[float], init_values: float | None, downsample: bool,
                 device=None, dtype=None) -> None:
        dd = dict(device=device, dtype=dtype)
        super().__init__()
        self.grad_checkpointing = False
        self.blocks = nn.Sequential(*[
            MixShiftBlock(dim, shift_dist, mix_size, mlp_ratio, proj_drop, drop_path[i], init_values, **dd)
            for i in range(depth)
        ])
        self.downsample = ConvEmbed(dim, 2 * dim, 2, **dd) if downsample else nn.Identity()

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.downsample(self.forward_blocks(x))


class MSMLP(nn.Module):
    """Mix-Shift-MLP: conv stem, four stages of mix-shift blocks, pool -> LayerNorm -> linear head.

    timm's hierarchical-model interface (as its Swin / ConvNeXt): ``forward_features`` gives the last
    stage's NCHW map, ``forward_head`` pools it (``global_pool='avg'``, or ``''`` for none) and applies
    the LayerNorm over channels, then the head. ``forward_intermediates`` / ``prune_intermediate_layers``
    / ``feature_info`` work per stage (the map before the stage's downsampling). Any input size runs
    (rolls and convolutions); the feature maps follow it.
    """

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
        device=None,
        dtype=None,
    ) -> None:
        dd = dict(device=device, dtype=dtype)
        super().__init__()
        if len(mix_size) != len(depths):
            raise ValueError(f"MS-MLP: {len(depths)} stages but {len(mix_size)} rows of mixing sizes")
        assert global_pool in _POOLS, f"MS-MLP: global_pool must be one of {_POOLS}, got {global_pool!r}"
        self.img_size = img_size
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = int(embed_dim * 2 ** (len(depths) - 1))
        self.stem = ConvEmbed(in_chans, embed_dim, patch_size, **dd)
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()
        stages, start = [], 0
        self.feature_info = []
        for i, depth in enumerate(depths):
            dim = embed_dim * 2 ** i
            stages.append(MSMLPStage(
                dim, depth, shift_dist, mix_size[i], mlp_ratio, proj_drop_rate,
                dpr[start:start + depth], init_values, downsample=i < len(depths) - 1, **dd,
            ))
            self.feature_info.append(dict(num_chs=dim, reduction=patch_size * 2 ** i, module=f"stages.{i}.blocks"))
            start += depth
        self.stages = nn.Sequential(*stages)
        self.norm = _LN(self.num_features, **dd)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.apply(init_linear)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        # a stage's downsampling comes after its blocks; the head's norm after everything
        return dict(stem=r"^stem", blocks=r"^stages\.(\d+)" if coarse else [
            (r"^stages\.(\d+)\.blocks\.(\d+)", None), (r"^stages\.(\d+)\.downsample", (99999,)),
            (r"^norm", (99999,))])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for s in self.stages:
            s.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        dd = get_device_dtype(self)
        self.num_classes = num_classes
        if global_pool is not None:
            assert global_pool in _POOLS, f"MS-MLP: global_pool must be one of {_POOLS}, got {global_pool!r}"
            self.global_pool = global_pool
        self.head = nn.Linear(self.num_features, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.head.train(self.training)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's ``forward_intermediates`` for a hierarchical model: one NCHW map per stage.

        A stage's map is taken after its blocks, before its downsampling (as ``feature_info`` says).

        Args:
            x: Input images.
            indices: Take the last n stages if an int, all if None, the listed ones if a sequence.
            norm: Accepted for timm's interface; MS-MLP's LayerNorm follows the pooling (as ConvNeXt's
                head norm), so no intermediate is normalised.
            stop_early: Stop after the last stage asked for.
            output_fmt: ``'NCHW'`` only.
            intermediates_only: Return the intermediates only.
        """
        assert output_fmt in ("NCHW",), "Output shape must be NCHW."
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        x = self.stem(x)
        if torch.jit.is_scripting() or not stop_early:  # can't slice stages in torchscript
            stages = self.stages
        else:
            stages = self.stages[:max_index + 1]
        last = len(stages) - 1  # stopped early, the final map is the last kept stage's, not downsampled
        for i, stage in enumerate(stages):
            x = stage.forward_blocks(x)
            if i in take_indices:
                intermediates.append(x)
            if i < last:
                x = stage.downsample(x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
        self,
        indices: int | list[int] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> list[int]:
        """Drop the stages after the last index asked for, and that stage's downsampling (timm's Swin rule).

        Pruned before the last stage, the features end at the kept stage's width, so the head's norm
        and the head (sized for the last stage) go too and ``num_features`` becomes the kept width.
        """
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        prune_end = max_index < len(self.stages) - 1
        self.stages = self.stages[:max_index + 1]
        self.stages[-1].downsample = nn.Identity()  # the features end at the last kept tap
        if prune_norm or prune_end:
            self.norm = nn.Identity()
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        # As the original: pool first, then the LayerNorm over channels (per position when not pooled).
        if self.global_pool == "avg":
            x = self.norm(x.mean(dim=(2, 3)))
        else:
            x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = self.head_drop(x)
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
    # Not fixed: rolls and convolutions run at any size. pool_size is the last map at the cfg's size (/32).
    args = dict(crop_pct=0.875, first_conv="stem.proj", classifier="head", fixed_input_size=False,
                pool_size=(7, 7), origin_url="https://github.com/JegZheng/MS-MLP", paper_ids="arXiv:2202.06510")
    return cfg(**{**args, **kwargs})


default_cfgs = generate_default_cfgs({
    "msmlp_tiny_patch4_shift5_224": _cfg(),
    "msmlp_small_patch4_shift5_224": _cfg(),
    "msmlp_base_patch4_shift5_224": _cfg(),
    # 32 px, patch 4, three stages: 8 -> 4 -> 2
    "msmlp_nano": _cfg(num_classes=10, input_size=(3, 32, 32), pool_size=(2, 2), crop_pct=1.0, mean=CIFAR100_MEAN,
                       std=CIFAR100_STD),
})


def _create(variant: str, pretrained: bool, defaults: dict[str, Any], kwargs: dict[str, Any]) -> MSMLP:
    args = {**defaults, **kwargs}
    out_indices = args.pop("out_indices", len(args["depths"]))  # every stage
    return build(MSMLP, variant, pretrained, filter_fn=checkpoint_filter_fn,
                 feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **args)


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
    """A test-sized MS-MLP: 32 px, width 10 (five groups of 2 channels), three stages of one block, 10 classes."""
    defaults = dict(embed_dim=10, depths=(1, 1, 1), mix_size=((1, 1, 3, 3, 3), (1, 3, 3, 3, 3), (1, 3, 3, 3, 3)))
    return _create("msmlp_nano", pretrained, defaults, kwargs)
