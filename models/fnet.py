"""FNet for images: the token mixer is the real part of a 2-D Fourier transform (no parameters).

FNet (Lee-Thorp et al., 2021) replaces self-attention by ``Re(FFT2(x))`` over (tokens, channels);
this is the vision form of the Keras example "Image classification with modern MLP models"
(keras-io, CIFAR-100): 32x32 images resized to 64x64, 8x8 patches (64 tokens), a linear patch
embedding of width 256 plus a learned position embedding, 4 post-norm blocks
``x = norm1(x + Re(FFT2(x))); x = norm2(x + ffn(x))`` with an FFN of width 256 (ratio 1) and
dropout 0.2, global average pooling, dropout 0.2, a linear head: 621,924 parameters (0.62M).

Differences from the Keras example, none of which changes the parameter count: the 32 -> 64
resize and the normalisation live in the data pipeline (timm's ``pretrained_cfg``: 64 px input,
CIFAR-100 mean / std) rather than inside the model, GELU is the exact form rather than
TensorFlow Addons' tanh approximation, and the FFT runs in fp32 under autocast.
"""
# No ``from __future__ import annotations`` here: torch.fx copies forward()'s annotations into the code it
# generates, and string annotations there break TorchScript of the traced graph (timm's fx + jit test).
from functools import partial
from typing import Any

import torch
from timm.layers import DropPath, Mlp, PatchEmbed, get_device_dtype, trunc_normal_
from timm.models import checkpoint, checkpoint_seq, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import nn

from ._helpers import CIFAR100_MEAN, CIFAR100_STD, build, cfg, init_linear

__all__ = ["FNet", "FNetBlock", "FourierMix"]

_LN = partial(nn.LayerNorm, eps=1e-6)
_POOLS = ("", "avg")


class FourierMix(nn.Module):
    """``Re(FFT2(x))`` over the last two dimensions (tokens, channels), in fp32 at least (fp16 FFTs are lossy)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float64 stays float64, anything narrower runs in float32; no Python branch, so torch.fx can trace it
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        return torch.fft.fft2(xf, dim=(-2, -1)).real.to(x.dtype)


class FNetBlock(nn.Module):
    """Post-norm FNet block: ``x = norm1(x + mix(x)); x = norm2(x + mlp(x))``."""

    def __init__(self, dim: int, mlp_ratio: float = 1.0, proj_drop: float = 0.0, drop_path: float = 0.0,
                 norm_layer: type[nn.Module] = _LN,
                 act_layer: type[nn.Module] = nn.GELU, device=None, dtype=None) -> None:
        dd = dict(device=device, dtype=dtype)
        super().__init__()
        self.mix = FourierMix()
        self.norm1 = norm_layer(dim, **dd)
        # Keras: Dense -> GELU -> Dropout -> Dense (no dropout after the second Dense).
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=act_layer, drop=(proj_drop, 0.0), **dd)
        self.norm2 = norm_layer(dim, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.drop_path(self.mix(x)))
        return self.norm2(x + self.drop_path(self.mlp(x)))


class FNet(nn.Module):
    """Patch embedding + learned positions, post-norm Fourier blocks, average pool, linear head.

    timm's token-model interface (as its MLP-Mixer): ``forward_features`` gives the tokens (B, N, C)
    (post-norm blocks: there is no final norm), ``forward_head`` averages them (``global_pool='avg'``,
    or ``''`` for none), ``forward_intermediates`` / ``prune_intermediate_layers`` / ``feature_info``
    work per block. The input size is fixed by the learned position embedding (as timm's ViT).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 64,
        patch_size: int = 8,
        in_chans: int = 3,
        num_classes: int = 100,
        embed_dim: int = 256,
        depth: int = 4,
        mlp_ratio: float = 1.0,
        pos_embed: bool = True,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        global_pool: str = "avg",
        device=None,
        dtype=None,
    ) -> None:
        dd = dict(device=device, dtype=dtype)
        super().__init__()
        assert global_pool in _POOLS, f"FNet: global_pool must be one of {_POOLS}, got {global_pool!r}"
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_prefix_tokens = 0  # no class token: pos_embed covers the patches only
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.grad_checkpointing = False
        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                                      **dd)
        num_patches = self.patch_embed.num_patches
        reduction = self.patch_embed.feat_ratio()
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, embed_dim, **dd)) if pos_embed else None
        dpr = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()
        self.blocks = nn.Sequential(*[
            FNetBlock(embed_dim, mlp_ratio, proj_drop_rate, dpr[i], **dd) for i in range(depth)
        ])
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=reduction) for i in range(depth)]
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        if self.pos_embed is not None:
            trunc_normal_(self.pos_embed, std=0.02)
        self.apply(init_linear)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(stem=r"^pos_embed|patch_embed", blocks=r"^blocks\.(\d+)")

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
            assert global_pool in _POOLS, f"FNet: global_pool must be one of {_POOLS}, got {global_pool!r}"
            self.global_pool = global_pool
        self.head = nn.Linear(self.embed_dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.head.train(self.training)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        return x

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's MLP-Mixer ``forward_intermediates``: block outputs as maps (NCHW) or tokens (NLC).

        Args:
            x: Input images.
            indices: Take the last n blocks if an int, all if None, the listed ones if a sequence.
            norm: Accepted for timm's interface; FNet's blocks are post-norm and there is no final norm.
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
                intermediates.append(x)

        if reshape:
            H, W = self.patch_embed.dynamic_feat_size((height, width))
            intermediates = [y.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
        self,
        indices: int | list[int] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> list[int]:
        """Drop the blocks after the last index asked for (and the head, if asked; there is no final norm)."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[:max_index + 1]
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self._embed(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _cifar_cfg(**kwargs: Any) -> dict[str, Any]:
    args = dict(num_classes=100, input_size=(3, 64, 64), crop_pct=1.0, interpolation="bilinear",
                mean=CIFAR100_MEAN, std=CIFAR100_STD, first_conv="patch_embed.proj", classifier="head",
                origin_url="https://keras.io/examples/vision/mlp_image_classification/", paper_ids="arXiv:2105.03824")
    return cfg(**{**args, **kwargs})


# fixed_input_size (cfg() default, True): the learned position embedding is sized for one patch grid.
default_cfgs = generate_default_cfgs({
    "fnet_keras_cifar100": _cifar_cfg(),
    "fnet_base_patch16_224": cfg(first_conv="patch_embed.proj", classifier="head", crop_pct=0.875,
                                 paper_ids="arXiv:2105.03824"),
    "fnet_nano": _cifar_cfg(num_classes=10, input_size=(3, 16, 16)),
})


def _create(variant: str, pretrained: bool, defaults: dict[str, Any], kwargs: dict[str, Any]) -> FNet:
    out_indices = kwargs.pop("out_indices", 3)  # the last three blocks, as timm's MLP-Mixer
    return build(FNet, variant, pretrained, feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
                 **{**defaults, **kwargs})


@register_model
def fnet_keras_cifar100(pretrained: bool = False, **kwargs: Any) -> FNet:
    """The Keras example's FNet: 64 px, patch 8, width 256, 4 blocks, FFN ratio 1, dropout 0.2, 100 classes."""
    args = dict(img_size=64, patch_size=8, embed_dim=256, depth=4, mlp_ratio=1.0, drop_rate=0.2, proj_drop_rate=0.2)
    return _create("fnet_keras_cifar100", pretrained, args, kwargs)


@register_model
def fnet_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> FNet:
    """FNet-Base sized for ImageNet: 224 px, patch 16, width 768, 12 blocks, FFN ratio 4."""
    args = dict(img_size=224, patch_size=16, embed_dim=768, depth=12, mlp_ratio=4.0)
    return _create("fnet_base_patch16_224", pretrained, args, kwargs)


@register_model
def fnet_nano(pretrained: bool = False, **kwargs: Any) -> FNet:
    """A test-sized FNet: 16 px, patch 4, width 32, 3 blocks, 10 classes."""
    args = dict(img_size=16, patch_size=4, embed_dim=32, depth=3, mlp_ratio=2.0)
    return _create("fnet_nano", pretrained, args, kwargs)
