"""Export: diluted blocks become attention-free blocks whose attention parameters are gone.

An attention-free block computes ``x = s x; x = x + MLP branch`` (``s = 2`` for pre-norm and
parallel blocks, 1 for post-norm ones; see :mod:`shrink.blocks.contract`). Its state dict is the original
block's minus the parts only the token-mixing branch used (``norm1.*``, ``attn.*`` and ``ls1.*`` /
``gamma_1`` for pre-norm blocks; the q / k / v rows and attention columns of a parallel block's
fused projections); no key is renamed. Model-level position tables that only attention read (a
shared relative-position bias, RoPE) go when no block with attention remains.

Optional folding removes the factor 2 exactly (up to LayerNorm eps): with ``k`` removed blocks at
or before a block, divide the output projections of its branches (``attn.proj`` and ``mlp.fc2``
for a timm ``Block``) by ``2**k``. Every residual-stream value is then ``2**K`` times smaller, which
the final LayerNorm cancels, and fp16 residuals stop growing.
"""
from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from shrink.blocks.contract import AttentionFreeBlock, DilutedBlock, block_family, export_block, get_blocks
from shrink.blocks.parts import output_projections, prune_shared_tables, removed_parameter_count
from shrink.errors import ShrinkError

__all__ = ["AttentionFreeBlock", "attention_free_indices", "export", "fold_residual_scale", "is_folded",
           "removed_parameter_count"]

_logger = logging.getLogger(__name__)


def attention_free_indices(model: nn.Module) -> list[int]:
    """Indices of the attention-free blocks of ``model``."""
    return [i for i, b in enumerate(get_blocks(model)) if isinstance(b, AttentionFreeBlock)]


def is_folded(model: nn.Module) -> bool:
    """True when the factor 2 of the attention-free blocks has been folded into later weights."""
    return any(b.residual_scale == 1.0 and block_family(b).residual_scale != 1.0
               for b in get_blocks(model) if isinstance(b, AttentionFreeBlock))


def export(model: nn.Module, *, fold: bool = False, inplace: bool = False) -> nn.Module:
    """The deployable model: every diluted block becomes an attention-free block (lambda = 0).

    Returns a new model unless ``inplace``; the removed attention parameters are gone from it. A
    diluted block whose lambda is not 0 is exported as its lambda = 0 form, which is what "deploy
    mode" evaluates; a log line says so.
    """
    out = model if inplace else copy.deepcopy(model)
    blocks = get_blocks(out)
    for i, b in enumerate(blocks):
        if isinstance(b, DilutedBlock):
            if b.lambda_value != 0.0:
                _logger.info("block %d has lambda=%g; exporting its lambda=0 (deployable) form", i, b.lambda_value)
            blocks[i] = export_block(b)
    dropped = prune_shared_tables(out)
    if fold:
        fold_residual_scale(out)
    _logger.info("exported attention-free blocks %s (fold=%s, shared tables dropped: %s)",
                 attention_free_indices(out), fold, dropped or "none")
    return out


def _final_norm_is_layernorm(model: nn.Module) -> bool:
    if getattr(model, "attn_pool", None) is not None:
        return False
    pool = getattr(model, "global_pool", "token")
    norm = getattr(model, "norm", None)
    fc_norm = getattr(model, "fc_norm", None)

    def is_ln(m):
        return isinstance(m, nn.LayerNorm) or type(m).__name__ in ("LayerNorm", "LayerNorm2d", "RmsNorm")

    if norm is not None and is_ln(norm):
        return True
    return pool in ("avg", "avgmax", "max") and fc_norm is not None and is_ln(fc_norm)


@torch.no_grad()
def fold_residual_scale(model: nn.Module) -> nn.Module:
    """Fold the factor 2 of every attention-free block into later residual branches, in place."""
    blocks = get_blocks(model)
    if any(isinstance(b, DilutedBlock) for b in blocks):
        raise ShrinkError("cannot fold a model that still has diluted blocks: export it first")
    if not attention_free_indices(model):
        raise ShrinkError("nothing to fold: the model has no attention-free blocks (export it first)")
    if is_folded(model):
        raise ShrinkError("the model is already folded")
    if any(b.residual_scale != 2.0 for b in blocks if isinstance(b, AttentionFreeBlock)):
        raise ShrinkError("folding needs residual scale 2 in every attention-free block (post-norm blocks have 1)")
    if not _final_norm_is_layernorm(model):
        raise ShrinkError("folding is exact only when a LayerNorm feeds the head; this model has none")
    plan: list[tuple[nn.Linear, int]] = []  # validate everything before changing any weight
    k = 0
    for i, b in enumerate(blocks):
        if isinstance(b, AttentionFreeBlock):
            k += 1
        if k == 0:
            continue
        for proj in output_projections(b):
            if not isinstance(proj, nn.Linear):
                raise ShrinkError(f"block {i} ({type(b).__name__}): no linear output projection to fold into")
            plan.append((proj, k))
    for proj, k in plan:
        proj.weight.div_(2.0**k)
        if proj.bias is not None:
            proj.bias.div_(2.0**k)
    for b in blocks:
        if isinstance(b, AttentionFreeBlock):
            b.residual_scale = 1.0
    return model
