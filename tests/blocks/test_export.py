"""shrink.blocks.attention_free: the removed parameters, exact parameter counts, folding the residual factor."""
from __future__ import annotations

import pytest
import timm
import torch

import shrink

from ..conftest import IMG, ROOT, accelerate, image_folder, make_vit, metrics, run, subprocess_env  # noqa: F401

LAYERS = [0, 2, 4]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def test_removed_params_are_exactly_norm1_plus_attn_for_deit_v1():
    m = make_vit("deit_tiny")
    dense = sum(p.numel() for p in m.parameters())
    per_block = sum(p.numel() for p in m.blocks[0].attn.parameters()) + sum(
        p.numel() for p in m.blocks[0].norm1.parameters())
    shrink.dilute(m, LAYERS)
    small = shrink.export(m)
    assert sum(p.numel() for p in small.parameters()) == dense - 3 * per_block


def test_deit_tiny_reference_parameter_counts():
    m = timm.create_model("deit_tiny_patch16_224")
    assert sum(p.numel() for p in m.parameters()) == 5_717_416
    shrink.dilute(m, LAYERS)
    small = shrink.export(m)
    assert round(sum(p.numel() for p in small.parameters()) / 1e6, 2) == 5.27


@torch.no_grad()
def test_fold_is_exact_up_to_layernorm_eps(images):
    m = make_vit("deit3_small")
    shrink.dilute(m, LAYERS, lam=0.0)
    ref = shrink.export(m)
    folded = shrink.export(m, fold=True)
    assert all(folded.blocks[i].residual_scale == 1.0 for i in LAYERS)
    # LayerNorm(c * x) == LayerNorm(x) only up to eps; random-init residuals are tiny (var ~ eps),
    # so eps is the whole difference here. With eps -> 0 the fold is exact in fp32:
    for mod in list(ref.modules()) + list(folded.modules()):
        if isinstance(mod, torch.nn.LayerNorm):
            mod.eps = 1e-30
    assert max_diff(ref(images), folded(images)) <= 1e-5
    # the residual stream really is smaller after the fold (2^3 for 3 removed blocks)
    feats_ref = ref.blocks(ref._pos_embed(ref.patch_embed(images)))
    feats_fold = folded.blocks(folded._pos_embed(folded.patch_embed(images)))
    assert torch.allclose(feats_fold * 8, feats_ref, rtol=1e-4, atol=1e-5)


def test_fold_refuses_diluted_model():
    m = make_vit("deit_tiny")
    shrink.dilute(m, LAYERS)
    with pytest.raises(shrink.ShrinkError, match="diluted"):
        shrink.fold_residual_scale(m)
