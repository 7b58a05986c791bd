"""Shared fixtures: small random-initialised timm ViT variants (no network)."""
from __future__ import annotations

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

import shrink  # noqa: F401  (registers the project's models with timm)

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

IMG = 64  # a small resolution keeps the four DeiT variants fast on CPU


def _randomise_layerscale(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith(("ls1.gamma", "ls2.gamma")):
            with torch.no_grad():
                p.copy_(torch.rand(p.shape, generator=g) * 1.5 + 0.25)


def make_vit(variant: str) -> torch.nn.Module:
    """The four ViT variants the foundation must support, at 64 px, in eval mode."""
    torch.manual_seed(0)
    if variant == "deit_tiny":
        m = timm.create_model("deit_tiny_patch16_224", img_size=IMG)
    elif variant == "deit_tiny_distilled":
        m = timm.create_model("deit_tiny_distilled_patch16_224", img_size=IMG)
    elif variant == "deit3_small":
        m = timm.create_model("deit3_small_patch16_224", img_size=IMG)
        _randomise_layerscale(m)
    elif variant == "vit_qknorm":
        m = VisionTransformer(img_size=IMG, patch_size=16, embed_dim=96, depth=6, num_heads=3, qk_norm=True,
                              num_classes=10)
    else:
        raise ValueError(variant)
    return m.eval()


VARIANTS = ["deit_tiny", "deit_tiny_distilled", "deit3_small", "vit_qknorm"]


@pytest.fixture(params=VARIANTS)
def vit(request):
    return make_vit(request.param)


@pytest.fixture
def images():
    return torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: on a shared 2-core machine, two spinning threads per process are 10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
