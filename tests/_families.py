"""One tiny timm model per block class and per option that changes the block (the block contract's
test table): (timm name, keyword arguments, input size). Random weights, built in a second."""
from __future__ import annotations

import timm
import torch

SMALL = dict(embed_dim=32, depth=3, num_heads=2)

# key -> (timm name, create_model kwargs, image size, family expected)
CASES: dict[str, tuple[str, dict, int, str]] = {
    "vit": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, **SMALL), 32, "vit"),
    "vit-qknorm-reg-ls": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, qk_norm=True, init_values=0.1,
                                                       reg_tokens=2, **SMALL), 32, "vit"),
    "vit-map-head": ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, global_pool="map", **SMALL), 32, "vit"),
    "deit-distilled": ("deit_tiny_distilled_patch16_224", dict(img_size=32, patch_size=8, **SMALL), 32, "vit"),
    "naflexvit": ("naflexvit_base_patch16_gap", dict(img_size=32, **SMALL), 32, "vit"),
    "eva02-rope": ("eva02_tiny_patch14_224", dict(img_size=28, **SMALL), 28, "eva"),
    "dinov3-rope": ("vit_small_patch16_dinov3", dict(img_size=32, **SMALL), 32, "eva"),
    "rope-mixed": ("vit_small_patch16_rope_mixed_224", dict(img_size=32, **SMALL), 32, "eva"),
    "eva-postnorm": ("eva02_tiny_patch14_224", dict(img_size=28, use_post_norm=True, **SMALL), 28, "eva-postnorm"),
    "beit": ("beit_base_patch16_224", dict(img_size=32, **SMALL), 32, "beit"),
    "beit-shared-bias": ("beit_base_patch16_224", dict(img_size=32, use_rel_pos_bias=False,
                                                       use_shared_rel_pos_bias=True, **SMALL), 32, "beit"),
    "cait": ("cait_xxs24_224", dict(img_size=32, depth_token_only=1, **SMALL), 32, "cait"),
    "relpos": ("vit_relpos_small_patch16_224", dict(img_size=32, **SMALL), 32, "relpos"),
    "relpos-shared": ("vit_srelpos_small_patch16_224", dict(img_size=32, **SMALL), 32, "relpos"),
    "relpos-respost": ("vit_relpos_base_patch16_rpn_224", dict(img_size=32, **SMALL), 32, "relpos-respost"),
    "respost": ("vit_base_patch16_rpn_224", dict(img_size=32, **SMALL), 32, "respost"),
    "sam-windowed": ("samvit_base_patch16", dict(img_size=64, window_size=3, global_attn_indexes=(1,), **SMALL),
                     64, "sam"),
    "parallel-things": ("vit_base_patch16_18x2_224", dict(img_size=32, **SMALL), 32, "parallel-things"),
    "parallel-scaling": ("vit_base_patch16_xp_224", dict(img_size=32, **SMALL), 32, "parallel-scaling"),
    "diff-parallel-scaling": ("vit_dpwee_patch16_reg1_gap_256", dict(img_size=32, **SMALL), 32,
                              "diff-parallel-scaling"),
}


def build(key: str, num_classes: int = 5, seed: int = 0) -> torch.nn.Module:
    """The tiny model of ``key`` in eval mode, weights jittered so that no layer scale is ~0."""
    name, kwargs, _, _ = CASES[key]
    torch.manual_seed(seed)
    model = timm.create_model(name, num_classes=num_classes, **kwargs).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    return model


def images(key: str, batch: int = 2, seed: int = 1) -> torch.Tensor:
    size = CASES[key][2]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
