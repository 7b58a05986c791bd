"""Export: diluted blocks become attention-free blocks whose attention parameters are gone.

An attention-free block computes ``x = 2 x; x = x + drop_path2(ls2(mlp(norm2(x))))``. Its state
dict is the original block's minus ``norm1.*``, ``attn.*`` and ``ls1.*`` (LayerScale of the removed
branch; absent in DeiT v1); no key is renamed.

Optional folding removes the factor 2 exactly (up to LayerNorm eps): with ``k`` removed blocks at
or before a block, divide its ``attn.proj`` and ``mlp.fc2`` weight and bias by ``2**k``. Every
residual-stream value is then ``2**K`` times smaller, which the final LayerNorm cancels, and fp16
residuals stop growing.
"""
from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from .dilution import DilutedBlock, _is_prenorm_block, get_blocks
from .errors import ShrinkError

_logger = logging.getLogger(__name__)


class AttentionFreeBlock(nn.Module):
    """The MLP half of a pre-norm block after its attention was removed: ``x -> s*x + MLP``."""

    def __init__(self, norm2: nn.Module, mlp: nn.Module, ls2: nn.Module, drop_path2: nn.Module,
                 residual_scale: float = 2.0):
        super().__init__()
        self.norm2 = norm2
        self.mlp = mlp
        self.ls2 = ls2
        self.drop_path2 = drop_path2
        self.residual_scale = float(residual_scale)

    @classmethod
    def from_block(cls, block: nn.Module) -> AttentionFreeBlock:
        return cls(block.norm2, block.mlp, block.ls2, block.drop_path2)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if self.residual_scale != 1.0:
            x = x * self.residual_scale
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def extra_repr(self) -> str:
        return f"residual_scale={self.residual_scale:g}"


def attention_free_indices(model: nn.Module) -> list[int]:
    """Indices of the attention-free blocks of ``model``."""
    return [i for i, b in enumerate(get_blocks(model)) if isinstance(b, AttentionFreeBlock)]


def is_folded(model: nn.Module) -> bool:
    """True when the factor 2 of the attention-free blocks has been folded into later weights."""
    return any(b.residual_scale == 1.0 for b in get_blocks(model) if isinstance(b, AttentionFreeBlock))


def export(model: nn.Module, *, fold: bool = False, inplace: bool = False) -> nn.Module:
    """The deployable model: every diluted block becomes an attention-free block (lambda = 0).

    Returns a new model unless ``inplace``; the removed ``norm1`` / ``attn`` / ``ls1`` parameters are
    gone from it. A diluted block whose lambda is not 0 is exported as its lambda = 0 form, which
    is what "deploy mode" evaluates; a warning says so.
    """
    out = model if inplace else copy.deepcopy(model)
    blocks = get_blocks(out)
    for i, b in enumerate(blocks):
        if isinstance(b, DilutedBlock):
            if b.lambda_value != 0.0:
                _logger.info("block %d has lambda=%g; exporting its lambda=0 (deployable) form", i, b.lambda_value)
            blocks[i] = AttentionFreeBlock.from_block(b)
    if fold:
        fold_residual_scale(out)
    _logger.info("exported attention-free blocks %s (fold=%s)", attention_free_indices(out), fold)
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
    if not _final_norm_is_layernorm(model):
        raise ShrinkError("folding is exact only when a LayerNorm feeds the head; this model has none")
    plan: list[tuple[nn.Linear, int]] = []  # validate everything before changing any weight
    k = 0
    for i, b in enumerate(blocks):
        if isinstance(b, AttentionFreeBlock):
            k += 1
            projections = [getattr(b.mlp, "fc2", None)]
        elif _is_prenorm_block(b):
            projections = [getattr(b.attn, "proj", None), getattr(b.mlp, "fc2", None)]
        else:
            raise ShrinkError(f"block {i} ({type(b).__name__}) is not a pre-norm block; cannot fold")
        if k == 0:
            continue
        for proj in projections:
            if not isinstance(proj, nn.Linear):
                raise ShrinkError(f"block {i}: no linear output projection (attn.proj / mlp.fc2) to fold into")
            plan.append((proj, k))
    for proj, k in plan:
        proj.weight.div_(2.0**k)
        if proj.bias is not None:
            proj.bias.div_(2.0**k)
    for b in blocks:
        if isinstance(b, AttentionFreeBlock):
            b.residual_scale = 1.0
    return model


def removed_parameter_count(model: nn.Module, layers) -> int:
    """Parameters that exporting ``layers`` removes: their norm1 + attn + ls1 parameters."""
    blocks = get_blocks(model)
    n = 0
    for i in layers:
        b = blocks[i]
        for name in ("norm1", "attn", "ls1"):
            n += sum(p.numel() for p in getattr(b, name).parameters())
    return n
