"""The embedded demo model: a 12-block DeiT-style ViT for scikit-learn's 8x8 digits.

Twelve blocks so that removal ratios mean what they mean on DeiT (40% = 5 blocks). The dense
weights ship with the repo (``models/weights/vit_digits_dense.safetensors``, made by
``scripts/make_dense_digits.py``) and load with ``pretrained=True``, offline.
"""
from __future__ import annotations

from pathlib import Path

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

__all__ = ["DENSE_WEIGHTS", "vit_digits"]

DENSE_WEIGHTS = Path(__file__).parent / "weights" / "vit_digits_dense.safetensors"


def _cfg(**kwargs):
    return {
        "num_classes": 10, "input_size": (1, 8, 8), "pool_size": None, "crop_pct": 1.0,
        "interpolation": "nearest", "fixed_input_size": True, "mean": (0.5,), "std": (0.5,),
        "first_conv": "patch_embed.proj", "classifier": "head", "license": "apache-2.0", **kwargs,
    }


default_cfgs = generate_default_cfgs({
    # 'file' makes pretrained=True load the shipped weights from disk; nothing is downloaded.
    "vit_digits.dense": _cfg(file=str(DENSE_WEIGHTS)),
})


@register_model
def vit_digits(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """ViT-Digits: 8x8x1 input, patch 2 (16 tokens + class token), width 48, 12 blocks, 3 heads."""
    args = dict(img_size=8, patch_size=2, in_chans=1, num_classes=10, embed_dim=48, depth=12, num_heads=3,
                mlp_ratio=2.0, qkv_bias=True)
    args.update(kwargs)
    out_indices = args.pop("out_indices", 3)  # as timm's _create_vision_transformer
    return build_model_with_cfg(VisionTransformer, "vit_digits", pretrained,
                                pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **args)
