"""BottleneckMLP from "Scaling MLPs: A Tale of Inductive Bias" (Bachmann et al., NeurIPS 2023).

The image is flattened (C, H, W order) into one vector; a linear layer embeds it to width ``w``;
``b`` pre-norm residual blocks ``x + fc2(gelu(fc1(norm(x))))`` with hidden width ``4w`` follow,
then a linear head. No patches, no token mixing: the least inductive bias a vision net can have.

Published sizes (64 px input, ImageNet-21k head of 11,230 classes): B_6-Wi_512 24M, B_12-Wi_512 37M,
B_6-Wi_1024 74M, B_12-Wi_1024 124M (the README truncates to whole millions; exact counts are
24,657,374 / 37,261,790 / 74,469,342 / 124,843,998). Their normalisation is ImageNet's mean/std.

Key names here are timm's (``stem``, ``blocks.i.norm``, ``blocks.i.mlp.fc1``, ``head``);
:func:`checkpoint_filter_fn` maps the original names (``linear_in``, ``layernorms.i``,
``blocks.i.block.0``, ``linear_out``) onto them.
"""
# No ``from __future__ import annotations`` here: torch.fx copies forward()'s annotations into the code it
# generates, and string annotations there break TorchScript of the traced graph (timm's fx + jit test).
import re
from typing import Any

import torch
from timm.layers import DropPath, Mlp, get_device_dtype, register_notrace_function, to_2tuple
from timm.models import checkpoint_seq, generate_default_cfgs, register_model
from torch import nn

from ._helpers import build, cfg, rename_keys

__all__ = ["BottleneckBlock", "BottleneckMLP", "checkpoint_filter_fn", "flatten_input", "parse_architecture"]

_NORMS = {"layer": nn.LayerNorm, "batch": nn.BatchNorm1d, "none": nn.Identity}
_ACTS = {"gelu": nn.GELU, "relu": nn.ReLU}


@register_notrace_function  # a branch on the input's shape: one leaf call in torch.fx graphs
def flatten_input(x: torch.Tensor, in_chans: int, height: int, width: int) -> torch.Tensor:
    """Images (B, C, H, W) flattened in (C, H, W) order, or flat vectors (B, C*H*W) as they are; else ValueError."""
    if x.dim() == 4:
        if x.shape[1] != in_chans or x.shape[2] != height or x.shape[3] != width:
            raise ValueError(
                f"BottleneckMLP expects {in_chans}x{height}x{width} images, got {x.shape[1]}x{x.shape[2]}x{x.shape[3]}: "
                f"resize the input or build the model with that img_size")
        return x.flatten(1)
    in_dim = in_chans * height * width
    if x.dim() != 2 or x.shape[1] != in_dim:
        raise ValueError(f"BottleneckMLP expects images or flat vectors of {in_dim} values, got shape {x.shape}")
    return x


class BottleneckBlock(nn.Module):
    """``x + mlp(norm(x))`` with an expanding hidden layer, then dropout on the sum (as the original)."""

    def __init__(self, dim: int, hidden_dim: int, norm_layer: type[nn.Module] = nn.LayerNorm,
                 act_layer: type[nn.Module] = nn.GELU, drop: float = 0.0, drop_path: float = 0.0,
                 device=None, dtype=None) -> None:
        dd = dict(device=device, dtype=dtype)
        super().__init__()
        self.norm = norm_layer(dim, **dd)
        self.mlp = Mlp(dim, hidden_dim, act_layer=act_layer, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.drop = nn.Dropout(drop) if drop > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(x + self.drop_path(self.mlp(self.norm(x))))


class BottleneckMLP(nn.Module):
    """Flattened image -> linear embedding -> ``depth`` bottleneck blocks -> linear head.

    timm's classifier interface for a model without tokens or a spatial map: ``forward_features``
    gives one vector (B, C) per image, ``forward_head`` is the head alone (there is nothing to pool;
    ``global_pool`` is kept for timm's API). No ``forward_intermediates`` / ``features_only``: no
    layer has a feature map. The input size is fixed (the stem sees C*H*W values).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 64,
        in_chans: int = 3,
        num_classes: int = 11230,
        depth: int = 12,
        embed_dim: int = 1024,
        mlp_ratio: float = 4.0,
        norm: str = "layer",
        act: str = "gelu",
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        global_pool: str = "",
        device=None,
        dtype=None,
    ) -> None:
        dd = dict(device=device, dtype=dtype)
        super().__init__()
        if norm not in _NORMS or act not in _ACTS:
            raise ValueError(f"BottleneckMLP: norm must be one of {sorted(_NORMS)} and act one of {sorted(_ACTS)}")
        self.img_size = to_2tuple(img_size)
        self.in_chans = in_chans
        self.in_dim = in_chans * self.img_size[0] * self.img_size[1]
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.global_pool = global_pool  # kept for timm's API; there are no tokens to pool
        self.grad_checkpointing = False
        self.stem = nn.Linear(self.in_dim, embed_dim, **dd)
        self.stem_drop = nn.Dropout(drop_rate) if drop_rate > 0.0 else nn.Identity()
        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        hidden = int(embed_dim * mlp_ratio)
        self.blocks = nn.Sequential(*[
            BottleneckBlock(embed_dim, hidden, _NORMS[norm], _ACTS[act], drop_rate, dpr[i], **dd) for i in range(depth)
        ])
        self.head = nn.Linear(embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(stem=r"^stem", blocks=r"^blocks\.(\d+)")

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        dd = get_device_dtype(self)
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.head = nn.Linear(self.embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.head.train(self.training)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem_drop(self.stem(flatten_input(x, self.in_chans, self.img_size[0], self.img_size[1])))
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


_ORIGINAL_KEYS = (
    (re.compile(r"^linear_in\."), "stem."),
    (re.compile(r"^linear_out\."), "head."),
    (re.compile(r"^layernorms\.(\d+)\."), r"blocks.\1.norm."),
    (re.compile(r"^blocks\.(\d+)\.block\.0\."), r"blocks.\1.mlp.fc1."),
    (re.compile(r"^blocks\.(\d+)\.block\.2\."), r"blocks.\1.mlp.fc2."),
)


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Rename the original repository's keys to this module's; keys already in this format pass through."""
    return rename_keys(state_dict, _ORIGINAL_KEYS)


def _cfg(**kwargs: Any) -> dict[str, Any]:
    # Scaling MLPs trains at 64 px on ImageNet-21k (11,230 classes) with ImageNet's mean / std.
    # first_conv: the layer that sees the input, a Linear on the flattened image (timm names the input
    # layer there, e.g. NaFlexViT's linear 'embeds.proj'). fixed_input_size (cfg() default): True.
    args = dict(num_classes=11230, input_size=(3, 64, 64), crop_pct=1.0, interpolation="bilinear",
                first_conv="stem", classifier="head", origin_url="https://github.com/gregorbachmann/scaling_mlps",
                paper_ids="arXiv:2306.13575")
    return cfg(**{**args, **kwargs})


default_cfgs = generate_default_cfgs({
    "bottleneck_mlp_b6_wi512": _cfg(),
    "bottleneck_mlp_b12_wi512": _cfg(),
    "bottleneck_mlp_b6_wi1024": _cfg(),
    "bottleneck_mlp_b12_wi1024": _cfg(),
    "bottleneck_mlp_nano": _cfg(num_classes=10, input_size=(3, 16, 16)),
})


def _create(variant: str, pretrained: bool, **kwargs: Any) -> BottleneckMLP:
    return build(BottleneckMLP, variant, pretrained, filter_fn=checkpoint_filter_fn, **kwargs)


@register_model
def bottleneck_mlp_b6_wi512(pretrained: bool = False, **kwargs: Any) -> BottleneckMLP:
    """B_6-Wi_512 at 64 px: 6 blocks of width 512 (hidden 2048)."""
    return _create("bottleneck_mlp_b6_wi512", pretrained, **dict(dict(depth=6, embed_dim=512), **kwargs))


@register_model
def bottleneck_mlp_b12_wi512(pretrained: bool = False, **kwargs: Any) -> BottleneckMLP:
    """B_12-Wi_512 at 64 px: 12 blocks of width 512 (hidden 2048)."""
    return _create("bottleneck_mlp_b12_wi512", pretrained, **dict(dict(depth=12, embed_dim=512), **kwargs))


@register_model
def bottleneck_mlp_b6_wi1024(pretrained: bool = False, **kwargs: Any) -> BottleneckMLP:
    """B_6-Wi_1024 at 64 px: 6 blocks of width 1024 (hidden 4096)."""
    return _create("bottleneck_mlp_b6_wi1024", pretrained, **dict(dict(depth=6, embed_dim=1024), **kwargs))


@register_model
def bottleneck_mlp_b12_wi1024(pretrained: bool = False, **kwargs: Any) -> BottleneckMLP:
    """B_12-Wi_1024 at 64 px: 12 blocks of width 1024 (hidden 4096), the paper's largest."""
    return _create("bottleneck_mlp_b12_wi1024", pretrained, **dict(dict(depth=12, embed_dim=1024), **kwargs))


@register_model
def bottleneck_mlp_nano(pretrained: bool = False, **kwargs: Any) -> BottleneckMLP:
    """A test-sized BottleneckMLP: 16 px, 2 blocks of width 32, 10 classes."""
    return _create("bottleneck_mlp_nano", pretrained, **dict(dict(depth=2, embed_dim=32), **kwargs))


_ARCH = re.compile(r"^B_(\d+)-Wi_(\d+)(?:-Ex_(\d+))?$")


def parse_architecture(architecture: str) -> tuple[int, int, int]:
    """``'B_12-Wi_1024'`` (optionally ``'-Ex_4'``) -> (blocks, width, expansion factor)."""
    m = _ARCH.match(architecture.strip())
    if not m:
        raise ValueError(f"architecture {architecture!r} is not of the form 'B_<blocks>-Wi_<width>[-Ex_<factor>]'")
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 4)
