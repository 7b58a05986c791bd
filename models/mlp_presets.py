"""32-px CIFAR presets of timm's own MLP-Mixer, ResMLP and gMLP (``timm.models.mlp_mixer.MlpMixer``).

Nothing is re-implemented: each preset calls timm's class with the arguments of timm's own small
ImageNet model (``mixer_s16_224``, ``resmlp_12_224``, ``gmlp_s16_224``) except ``img_size=32`` and a
4-px patch (64 tokens), CIFAR-100's mean / std and 100 classes. Pass ``num_classes=10`` for CIFAR-10.

- ``mixer_s4_cifar``: Mixer-S (8 blocks, width 512, token MLP 256, channel MLP 2048).
- ``resmlp_12_cifar``: ResMLP-S12 (12 blocks, width 384, ratio 4, Affine norm, timm's LayerScale init).
- ``gmlp_s4_cifar``: gMLP-S (30 blocks, width 256, ratio 6, spatial gating unit).
- ``*_nano_cifar``: three blocks of width 32 on 8-px patches, for tests (three, so that timm's feature
  tests, which want at least three feature levels, apply).
"""
from __future__ import annotations

from typing import Any

from timm.models import generate_default_cfgs, register_model
from timm.models.mlp_mixer import (
    Affine,
    GatedMlp,
    MlpMixer,
    ResBlock,
    SpatialGatingBlock,
    checkpoint_filter_fn,
)

from ._helpers import CIFAR100_MEAN, CIFAR100_STD, build, cfg

__all__: list[str] = []


def _cfg(**kwargs: Any) -> dict[str, Any]:
    args = dict(num_classes=100, input_size=(3, 32, 32), crop_pct=1.0, interpolation="bicubic",
                mean=CIFAR100_MEAN, std=CIFAR100_STD, first_conv="stem.proj")
    return cfg(**{**args, **kwargs})


default_cfgs = generate_default_cfgs({
    "mixer_s4_cifar": _cfg(paper_ids="arXiv:2105.01601"),
    "resmlp_12_cifar": _cfg(paper_ids="arXiv:2105.03404"),
    "gmlp_s4_cifar": _cfg(paper_ids="arXiv:2105.08050"),
    "mixer_nano_cifar": _cfg(num_classes=10),
    "resmlp_nano_cifar": _cfg(num_classes=10),
    "gmlp_nano_cifar": _cfg(num_classes=10),
})

_MIXER = dict(img_size=32)
_RESMLP = dict(img_size=32, mlp_ratio=4, block_layer=ResBlock, norm_layer=Affine)
_GMLP = dict(img_size=32, mlp_ratio=6, block_layer=SpatialGatingBlock, mlp_layer=GatedMlp)
_NANO = dict(patch_size=8, num_blocks=3, embed_dim=32)


def _create(variant: str, pretrained: bool, defaults: dict[str, Any], kwargs: dict[str, Any]) -> MlpMixer:
    out_indices = kwargs.pop("out_indices", 3)  # as timm's _create_mixer: features_only through FeatureGetterNet
    return build(MlpMixer, variant, pretrained, filter_fn=checkpoint_filter_fn,
                 feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **{**defaults, **kwargs})


@register_model
def mixer_s4_cifar(pretrained: bool = False, **kwargs: Any) -> MlpMixer:
    """MLP-Mixer-S on 32x32 images with 4x4 patches (64 tokens)."""
    return _create("mixer_s4_cifar", pretrained, dict(_MIXER, patch_size=4, num_blocks=8, embed_dim=512), kwargs)


@register_model
def resmlp_12_cifar(pretrained: bool = False, **kwargs: Any) -> MlpMixer:
    """ResMLP-S12 on 32x32 images with 4x4 patches (64 tokens)."""
    return _create("resmlp_12_cifar", pretrained, dict(_RESMLP, patch_size=4, num_blocks=12, embed_dim=384), kwargs)


@register_model
def gmlp_s4_cifar(pretrained: bool = False, **kwargs: Any) -> MlpMixer:
    """gMLP-S on 32x32 images with 4x4 patches (64 tokens)."""
    return _create("gmlp_s4_cifar", pretrained, dict(_GMLP, patch_size=4, num_blocks=30, embed_dim=256), kwargs)


@register_model
def mixer_nano_cifar(pretrained: bool = False, **kwargs: Any) -> MlpMixer:
    """A test-sized MLP-Mixer: 32 px, 8x8 patches (16 tokens), 3 blocks of width 32, 10 classes."""
    return _create("mixer_nano_cifar", pretrained, dict(_MIXER, **_NANO), kwargs)


@register_model
def resmlp_nano_cifar(pretrained: bool = False, **kwargs: Any) -> MlpMixer:
    """A test-sized ResMLP: 32 px, 8x8 patches, 3 blocks of width 32, 10 classes."""
    return _create("resmlp_nano_cifar", pretrained, dict(_RESMLP, **_NANO), kwargs)


@register_model
def gmlp_nano_cifar(pretrained: bool = False, **kwargs: Any) -> MlpMixer:
    """A test-sized gMLP: 32 px, 8x8 patches, 3 blocks of width 32, 10 classes."""
    return _create("gmlp_nano_cifar", pretrained, dict(_GMLP, **_NANO), kwargs)
