"""The feed-forward-only ViT of "Do You Even Need Attention?" (Melas-Kyriazi, 2021).

A DeiT in which every attention layer is replaced by an MLP over the token axis: each block is
``x += mlp_channels(norm1(x))`` followed by ``x^T += mlp_tokens(norm2(x^T))``, where the token MLP
acts on all 1 + N tokens (class token included) with hidden width ``4 (1 + N)``. Patch 16 conv
embedding, a class token, learned position embedding, final LayerNorm, head on the class token.

Published: FF-tiny (width 192, 12 blocks) 7.7M parameters, 61.4% ImageNet top-1; FF-base (width
768) 62M, 74.9%. The token MLP's size is fixed by ``img_size`` (the original hard-codes 224 px).
Key names here are timm-style; :func:`checkpoint_filter_fn` maps the original checkpoints
(``mlp1`` / ``mlp2``, ``pos_encoding.pos_embed`` as a 14x14 grid + ``pos_encoding.cls_pos_embed``).
"""
# No ``from __future__ import annotations`` here: torch.fx copies forward()'s annotations into the code it
# generates, and string annotations there break TorchScript of the traced graph (timm's fx + jit test).
import re
from functools import partial
from typing import Any

import torch
from timm.layers import DropPath, Mlp, PatchEmbed, get_device_dtype, resample_abs_pos_embed, trunc_normal_
from timm.models import checkpoint, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn

from ._helpers import CIFAR100_MEAN, CIFAR100_STD, build, cfg, init_linear

__all__ = ["FeedForwardBlock", "FeedForwardViT", "checkpoint_filter_fn"]

_LN = partial(nn.LayerNorm, eps=1e-6)
_POOLS = ("", "avg", "token")


class FeedForwardBlock(nn.Module):
    """A channel MLP then a token MLP, each pre-norm with a residual (the same drop-path rate for both)."""

    def __init__(self, dim: int, num_tokens: int, mlp_ratio: float = 4.0, proj_drop: float = 0.0,
                 drop_path: float = 0.0, norm_layer: type[nn.Module] = _LN, act_layer: type[nn.Module] = nn.GELU,
                 device=None, dtype=None) -> None:
        dd = dict(device=device, dtype=dtype)
        super().__init__()
        self.norm1 = norm_layer(dim, **dd)
        self.mlp_channels = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop, **dd)
        self.norm2 = norm_layer(num_tokens, **dd)
        self.mlp_tokens = Mlp(num_tokens, int(num_tokens * mlp_ratio), act_layer=act_layer, drop=proj_drop, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.mlp_channels(self.norm1(x)))
        x = x.transpose(1, 2)
        x = x + self.drop_path(self.mlp_tokens(self.norm2(x)))
        return x.transpose(1, 2)


class FeedForwardViT(nn.Module):
    """Patch embedding + class token + positions, feed-forward blocks, final norm, class-token head.

    timm's ViT interface: ``forward_features`` gives the normed tokens (B, 1 + N, C), ``forward_head``
    pools them (``global_pool``: ``'token'``, ``'avg'`` over the patches, or ``''`` for none),
    ``forward_intermediates`` / ``prune_intermediate_layers`` / ``feature_info`` work per block, so
    ``features_only=True`` gives NCHW maps through timm's ``FeatureGetterNet``. The input size is
    fixed: the token MLPs are sized for ``1 + N`` tokens.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 192,
        depth: int = 12,
        mlp_ratio: float = 4.0,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        global_pool: str = "token",
        device=None,
        dtype=None,
    ) -> None:
        dd = dict(device=device, dtype=dtype)
        super().__init__()
        assert global_pool in _POOLS, f"FF-ViT: global_pool must be one of {_POOLS}, got {global_pool!r}"
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_prefix_tokens = 1
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.grad_checkpointing = False
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                                      **dd)
        num_tokens = self.patch_embed.num_patches + 1
        reduction = self.patch_embed.feat_ratio()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim, **dd))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, embed_dim, **dd))
        self.pos_drop = nn.Dropout(pos_drop_rate)
        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.Sequential(*[
            FeedForwardBlock(embed_dim, num_tokens, mlp_ratio, proj_drop_rate, dpr[i], **dd) for i in range(depth)
        ])
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=reduction) for i in range(depth)]
        self.norm = _LN(embed_dim, **dd)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(init_linear)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(stem=r"^cls_token|pos_embed|patch_embed", blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

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
            assert global_pool in _POOLS, f"FF-ViT: global_pool must be one of {_POOLS}, got {global_pool!r}"
            self.global_pool = global_pool
        self.head = nn.Linear(self.embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.head.train(self.training)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x + self.pos_embed)

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's ViT ``forward_intermediates``: block outputs, the class token split off.

        Args:
            x: Input images.
            indices: Take the last n blocks if an int, all if None, the listed ones if a sequence.
            return_prefix_tokens: Return (patch tokens, class token) pairs.
            norm: Apply the final norm to every intermediate.
            stop_early: Stop after the last block asked for.
            output_fmt: ``'NCHW'`` (maps) or ``'NLC'`` (tokens).
            intermediates_only: Return the intermediates only.
        """
        assert output_fmt in ("NCHW", "NLC"), "Output format must be one of NCHW or NLC."
        reshape = output_fmt == "NCHW"
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)

        B, _, height, width = x.shape
        x = self._embed(x)
        if torch.jit.is_scripting() or not stop_early:  # can't slice blocks in torchscript
            blocks = self.blocks
        else:
            blocks = self.blocks[:max_index + 1]
        for i, blk in enumerate(blocks):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(blk, x)
            else:
                x = blk(x)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)

        prefix_tokens = [y[:, 0:self.num_prefix_tokens] for y in intermediates]
        intermediates = [y[:, self.num_prefix_tokens:] for y in intermediates]
        if reshape:
            H, W = self.patch_embed.dynamic_feat_size((height, width))
            intermediates = [y.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if not torch.jit.is_scripting() and return_prefix_tokens:
            intermediates = list(zip(intermediates, prefix_tokens, strict=True))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(
        self,
        indices: int | list[int] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> list[int]:
        """Drop the blocks after the last index asked for (and the final norm / the head, if asked)."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self._embed(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x[:, self.num_prefix_tokens:].mean(dim=1)
        elif self.global_pool == "token":
            x = x[:, 0]
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


_ORIGINAL_KEYS = (
    (re.compile(r"^blocks\.(\d+)\.mlp1\."), r"blocks.\1.mlp_channels."),
    (re.compile(r"^blocks\.(\d+)\.mlp2\."), r"blocks.\1.mlp_tokens."),
)


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Map the original checkpoint: rename the MLPs, join the class position and the 2-D grid into ``pos_embed``.

    A grid of another size is resampled to the model's (timm's bicubic resampler), as the
    original interpolates at run time; the token MLPs are sized for one token count and cannot be.
    """
    out = {}
    grid = state_dict.get("pos_encoding.pos_embed")
    cls_pos = state_dict.get("pos_encoding.cls_pos_embed")
    if grid is not None and cls_pos is not None:
        pos = grid.flatten(2).transpose(1, 2)
        if model is not None and pos.shape[1] != model.patch_embed.num_patches:
            pos = resample_abs_pos_embed(pos, new_size=list(model.patch_embed.grid_size), old_size=list(grid.shape[-2:]),
                                         num_prefix_tokens=0)
        out["pos_embed"] = torch.cat([cls_pos, pos], dim=1)
    for k, v in state_dict.items():
        if k.startswith("pos_encoding."):
            continue
        for pattern, repl in _ORIGINAL_KEYS:
            k = pattern.sub(repl, k)
        out[k] = v
    return out


def _cfg(**kwargs: Any) -> dict[str, Any]:
    # fixed_input_size: the token MLPs are sized for one token count (cfg() default, True).
    args = dict(crop_pct=0.875, first_conv="patch_embed.proj", classifier="head",
                origin_url="https://github.com/lukemelas/do-you-even-need-attention", paper_ids="arXiv:2105.02723")
    return cfg(**{**args, **kwargs})


default_cfgs = generate_default_cfgs({
    "ffvit_tiny_patch16_224": _cfg(),
    "ffvit_base_patch16_224": _cfg(),
    "ffvit_nano": _cfg(num_classes=10, input_size=(3, 16, 16), crop_pct=1.0, mean=CIFAR100_MEAN, std=CIFAR100_STD),
})


def _create(variant: str, pretrained: bool, defaults: dict[str, Any], kwargs: dict[str, Any]) -> FeedForwardViT:
    out_indices = kwargs.pop("out_indices", 3)  # the last three blocks, as timm's ViT
    return build(FeedForwardViT, variant, pretrained, filter_fn=checkpoint_filter_fn,
                 feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **{**defaults, **kwargs})


@register_model
def ffvit_tiny_patch16_224(pretrained: bool = False, **kwargs: Any) -> FeedForwardViT:
    """FF-tiny: width 192, 12 blocks, 197 tokens (published 7.7M parameters)."""
    return _create("ffvit_tiny_patch16_224", pretrained, dict(patch_size=16, embed_dim=192, depth=12), kwargs)


@register_model
def ffvit_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> FeedForwardViT:
    """FF-base: width 768, 12 blocks, 197 tokens (published 62M parameters)."""
    return _create("ffvit_base_patch16_224", pretrained, dict(patch_size=16, embed_dim=768, depth=12), kwargs)


@register_model
def ffvit_nano(pretrained: bool = False, **kwargs: Any) -> FeedForwardViT:
    """A test-sized FF-ViT: 16 px, patch 4 (17 tokens), width 32, 3 blocks, 10 classes."""
    return _create("ffvit_nano", pretrained, dict(patch_size=4, embed_dim=32, depth=3), kwargs)
