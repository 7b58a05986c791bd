"""Token merging (ToMe) for timm 1.x VisionTransformers, attention-free and diluted blocks included.

``apply_tome(model, r, start_idx, policy)`` swaps every block for a ToMe block that takes over its
submodules (state-dict keys unchanged) and merges ``r`` tokens between the token mixer and the MLP:

- attention blocks (timm ``Block``; ``DilutedBlock`` while its lambda > 0): after the (lambda-
  weighted) attention branch, matched on the block's keys averaged over heads, with proportional
  attention (``+ log(size)`` on each key; an additive mask for fused attention, none while every
  size is 1). LayerScale, qk-norm, drop_path and fused / unfused attention are those of the block.
- attention-free blocks (``AttentionFreeBlock``; ``DilutedBlock`` at lambda 0) follow ``policy``:
  ``"none"`` (the reference: tokens pass through) or ``"hidden"`` (merge before the MLP, matched
  on the cosine of ``norm2(x)``).

``start_idx`` counts attention-bearing blocks, as in the reference: ``start_idx=1`` starts merging
at the second block that still has attention (a diluted block counts as attention-bearing when its
lambda is > 0 at the time of ``apply_tome``). Attention-free blocks merge (policy ``"hidden"``)
only from that block on. ``r`` is an int (every merging block), a ``(r, inflection)`` tuple (a
ramp over the merging blocks, the official formula, see :func:`shrink.tome_merge.ramp`), or a list
with one entry per block. The r of each block is stored on the block; nothing is popped during
forward. Which tokens merge follows the official partition (A/B by position in the whole sequence,
see :mod:`shrink.tome_merge`), so on DeiT and distilled DeiT the logits are the official code's.

A block with r = 0 that no merging block precedes (all of them after ``apply_tome(model, 0)``) runs
its original timm forward: fused attention, no metric, no size bookkeeping, so it costs nothing.
Blocks after a merge weigh attention by size (``prop_attn``) and compute the metric only if they merge.

Class, distillation and register tokens (``model.num_prefix_tokens``) never merge and stay in
front, so token pooling is unchanged; average pooling is weighted by token size. Per-forward state
(sizes, optional source map) lives in one small object shared by the blocks (``tome_state(model)``)
and is reset when a block runs that does not come after the last one that ran, i.e. at the start
of every forward however it is entered (``forward``, ``forward_features``, ``forward_intermediates``
or blocks called one by one). One model must therefore not run two forwards at once (threads,
``nn.DataParallel``); DDP is fine. Gradient checkpointing (which re-runs blocks out of order) and
``forward_intermediates(output_fmt='NCHW')`` (which needs the full patch grid) are refused with a
ShrinkError while any block merges; ``output_fmt='NLC'`` works and returns the merged tokens.
"""
from __future__ import annotations

import logging
import numbers
import sys
import types
from collections.abc import Sequence
from typing import Any

import torch
from timm.layers import Attention
from timm.models.vision_transformer import Block
from torch import nn

from .dilution import DilutedBlock, get_blocks
from .errors import ShrinkError
from .export import AttentionFreeBlock
from .tome_merge import (
    POLICIES,
    bipartite_soft_matching,
    init_source,
    merge_source,
    merge_wavg,
    proportional_attention,
    tome_schedule,
    weighted_mean,
)
from .wrappers import unwrap

__all__ = [
    "POLICIES",
    "ToMeAttentionFreeBlock",
    "ToMeBlock",
    "ToMeDilutedBlock",
    "ToMeState",
    "apply_tome",
    "attention_with_metric",
    "is_tome",
    "remove_tome",
    "tome_info",
    "tome_schedule",
    "tome_state",
    "tome_token_counts",
]

_logger = logging.getLogger(__name__)

_ATTN_PARTS = ("norm1", "attn", "ls1", "drop_path1")
_MLP_PARTS = ("norm2", "mlp", "ls2", "drop_path2")


class ToMeState:
    """Per-forward ToMe state of one model: token sizes and (optionally) the source map."""

    def __init__(self, model: nn.Module, num_protected: int, prop_attn: bool = True, trace_source: bool = False):
        self.model = model  # read for grad_checkpointing; a plain attribute, not a submodule
        self.num_protected = int(num_protected)
        self.prop_attn = bool(prop_attn)
        self.trace_source = bool(trace_source)
        self.merging = False  # any block with r > 0
        self.last_block = sys.maxsize  # index of the block that ran last; a lower or equal one starts anew
        self.size: torch.Tensor | None = None  # (B, N, 1) patches per token; None = all ones
        self.source: torch.Tensor | None = None  # (B, N, N0) 0/1: input tokens of each token

    def begin(self, x: torch.Tensor) -> None:
        """Start a new forward pass on tokens ``x`` ``(B, N0, C)``."""
        if self.merging and torch.is_grad_enabled() and getattr(self.model, "grad_checkpointing", False):
            raise ShrinkError(
                "ToMe cannot run under gradient checkpointing (blocks are re-run out of order and the "
                "token count changes): call model.set_grad_checkpointing(False) or remove_tome(model)"
            )
        self.size = None
        self.source = init_source(x.shape[0], x.shape[1], x.device) if self.trace_source else None


def _check_no_mask(attn_mask: torch.Tensor | None, is_causal: bool) -> None:
    if attn_mask is not None or is_causal:
        raise ShrinkError("ToMe blocks take no attn_mask / is_causal (merging changes the tokens); remove_tome first")


def attention_with_metric(
    attn: nn.Module, x: torch.Tensor, size: torch.Tensor | None = None, *, metric: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """timm ``Attention`` forward with proportional attention; returns (output, keys mean over heads),
    the second None with ``metric=False``."""
    B, N, _ = x.shape
    gate = getattr(attn, "gate", None)
    gate = gate(x).sigmoid() if gate is not None else None
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if attn.fused_attn:
        out = proportional_attention(q, k, v, size, fused=True,
                                     dropout_p=attn.attn_drop.p if attn.training else 0.0)
    else:
        out = proportional_attention(q, k, v, size, fused=False, scale=attn.scale, dropout=attn.attn_drop)
    out = out.transpose(1, 2).reshape(B, N, getattr(attn, "attn_dim", attn.num_heads * attn.head_dim))
    norm = getattr(attn, "norm", None)
    if norm is not None:
        out = norm(out)
    if gate is not None:
        out = out * gate
    out = attn.proj_drop(attn.proj(out))
    return out, (k.mean(dim=1) if metric else None)


class _ToMeMixin:
    """What every ToMe block shares: its r, the shared state, and the merge step."""

    tome_r: int
    tome_index: int
    tome_sized: bool
    _tome_state: ToMeState

    def _tome_init(self, original: nn.Module, r: int, index: int, state: ToMeState, sized: bool = True) -> None:
        object.__setattr__(self, "_tome_original", original)  # not a submodule: no duplicate keys
        self.tome_r = int(r)
        self.tome_index = int(index)
        # False when no earlier block merges (or prop_attn is off): all sizes are 1 here, so a block
        # with r = 0 runs the plain timm path (fused attention, no metric, no size bookkeeping)
        self.tome_sized = bool(sized)
        self._tome_state = state

    @property
    def tome_plain(self) -> bool:
        """True when this block runs exactly the original block's forward (nothing to merge or weigh)."""
        return self.tome_r == 0 and not self.tome_sized

    def _begin(self, x: torch.Tensor) -> None:
        st = self._tome_state
        if self.tome_index <= st.last_block:  # blocks run in increasing order within one forward
            st.begin(x)
        st.last_block = self.tome_index

    def _attn_size(self) -> torch.Tensor | None:
        st = self._tome_state
        return st.size if st.prop_attn else None

    def _merge(self, x: torch.Tensor, metric: torch.Tensor) -> torch.Tensor:
        st = self._tome_state
        m = bipartite_soft_matching(metric, self.tome_r, st.num_protected)
        if m is None:
            return x
        x, st.size = merge_wavg(m, x, st.size)
        if st.source is not None:
            st.source = merge_source(m, st.source)
        return x

    def _give_back(self, parts: Sequence[str]) -> nn.Module:
        original = self._tome_original
        for name in parts:
            setattr(original, name, getattr(self, name))
        return original


class ToMeBlock(_ToMeMixin, Block):
    """A timm pre-norm ``Block`` that merges ``tome_r`` tokens between attention and MLP."""

    def __init__(self, block: nn.Module, r: int, index: int, state: ToMeState, sized: bool = True):
        nn.Module.__init__(self)
        for name in _ATTN_PARTS + _MLP_PARTS:
            setattr(self, name, getattr(block, name))
        self._tome_init(block, r, index, state, sized)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        _check_no_mask(attn_mask, is_causal)
        self._begin(x)
        if self.tome_plain:
            return Block.forward(self, x)
        y, metric = attention_with_metric(self.attn, self.norm1(x), self._attn_size(), metric=self.tome_r > 0)
        x = x + self.drop_path1(self.ls1(y))
        if self.tome_r > 0:
            x = self._merge(x, metric)
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def restore(self) -> nn.Module:
        return self._give_back(_ATTN_PARTS + _MLP_PARTS)

    def extra_repr(self) -> str:
        return f"r={self.tome_r}"


class ToMeDilutedBlock(_ToMeMixin, DilutedBlock):
    """A DilutedBlock under ToMe: merge after the lambda-weighted attention branch (keys metric);
    at lambda 0 it is attention-free and follows the policy."""

    def __init__(self, block: DilutedBlock, r: int, index: int, state: ToMeState, policy: str, sized: bool = True):
        DilutedBlock.__init__(self, block, lam=block.lambda_value)
        self.lam = block.lam  # the same buffer (device, dtype, value)
        self.attn_active = block.attn_active
        self.tome_policy = policy
        self._tome_init(block, r, index, state, sized)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        _check_no_mask(attn_mask, is_causal)
        self._begin(x)
        if self.tome_plain:
            return DilutedBlock.forward(self, x)
        if self.attn_active:
            y, metric = attention_with_metric(self.attn, self.norm1(x), self._attn_size(), metric=self.tome_r > 0)
            lam = self.lam
            x = (2.0 - lam) * x + lam * self.drop_path1(self.ls1(y))
            if self.tome_r > 0:
                x = self._merge(x, metric)
        else:
            x = x * 2.0
            if self.tome_r > 0 and self.tome_policy == "hidden":
                x = self._merge(x, self.norm2(x))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def restore(self) -> nn.Module:
        original = self._give_back(_ATTN_PARTS + _MLP_PARTS)
        original.lam = self.lam
        original.attn_active = self.attn_active
        return original

    def extra_repr(self) -> str:
        return f"lam={self.lambda_value:g}, r={self.tome_r}, policy={self.tome_policy}"


class ToMeAttentionFreeBlock(_ToMeMixin, AttentionFreeBlock):
    """An AttentionFreeBlock under ToMe: policy "none" passes tokens through, "hidden" merges
    ``tome_r`` tokens before the MLP, matched on ``norm2(x)``."""

    def __init__(self, block: AttentionFreeBlock, r: int, index: int, state: ToMeState, policy: str,
                 sized: bool = True):
        AttentionFreeBlock.__init__(self, block.norm2, block.mlp, block.ls2, block.drop_path2, block.residual_scale)
        self.tome_policy = policy
        self._tome_init(block, r, index, state, sized)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        _check_no_mask(attn_mask, is_causal)
        self._begin(x)
        if self.residual_scale != 1.0:
            x = x * self.residual_scale
        if self.tome_r > 0 and self.tome_policy == "hidden":
            x = self._merge(x, self.norm2(x))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def restore(self) -> nn.Module:
        original = self._give_back(_MLP_PARTS)
        original.residual_scale = self.residual_scale
        return original

    def extra_repr(self) -> str:
        return f"residual_scale={self.residual_scale:g}, r={self.tome_r}, policy={self.tome_policy}"


_TOME_BLOCKS = (ToMeBlock, ToMeDilutedBlock, ToMeAttentionFreeBlock)


# --------------------------------------------------------------------------------------------------
# Model-level pieces: pooling by size, forward_intermediates guard.
# --------------------------------------------------------------------------------------------------

def _tome_pool(self: nn.Module, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
    """VisionTransformer.pool with the average weighted by token size (bound to the model)."""
    st: ToMeState = self._tome_state
    size = st.size
    if size is None or size.shape[:2] != x.shape[:2]:
        return type(self).pool(self, x, pool_type)
    if self.attn_pool is not None:
        raise ShrinkError("attention pooling ('map'/'prr') does not support merged tokens; use token or avg pooling")
    pool_type = self.global_pool if pool_type is None else pool_type
    if pool_type not in ("avg", "avgmax"):
        return type(self).pool(self, x, pool_type)
    p = 0 if self.pool_include_prefix else self.num_prefix_tokens
    x, size = x[:, p:], size[:, p:]
    mean = weighted_mean(x, size)
    if pool_type == "avg":
        return mean
    return 0.5 * (x.amax(dim=1) + mean)


def _tome_forward_intermediates(self: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any):
    """forward_intermediates that refuses the NCHW grid when tokens merge (bound to the model)."""
    fmt = kwargs.get("output_fmt", args[4] if len(args) > 4 else "NCHW")
    if fmt == "NCHW" and self._tome_state.merging:
        raise ShrinkError(
            "forward_intermediates(output_fmt='NCHW') needs the full patch grid, but ToMe merges tokens: "
            "use output_fmt='NLC' or remove_tome(model)"
        )
    return type(self).forward_intermediates(self, x, *args, **kwargs)


# --------------------------------------------------------------------------------------------------
# apply / remove
# --------------------------------------------------------------------------------------------------

def _supported_attention(attn: nn.Module) -> bool:
    return isinstance(attn, Attention) and type(attn).forward is Attention.forward


def _block_kinds(model: nn.Module) -> list[str]:
    """'attn' or 'free' per block; a ShrinkError for any block ToMe cannot handle."""
    kinds = []
    for i, b in enumerate(get_blocks(model)):
        if isinstance(b, AttentionFreeBlock):
            kinds.append("free")
            continue
        if isinstance(b, DilutedBlock):
            kind = "attn" if b.attn_active else "free"
        elif isinstance(b, ToMeBlock) or (isinstance(b, Block) and type(b).forward is Block.forward):
            kind = "attn"
        else:
            raise ShrinkError(
                f"block {i} ({type(b).__name__}) is not supported by ToMe: it needs timm ViT blocks "
                "(Block, DilutedBlock, AttentionFreeBlock) with token attention"
            )
        if not _supported_attention(b.attn):
            raise ShrinkError(f"block {i}: attention {type(b.attn).__name__} is not supported by ToMe (timm Attention only)")
        kinds.append(kind)
    return kinds


def is_tome(model: nn.Module) -> bool:
    """True when apply_tome has been applied to ``model``."""
    return getattr(unwrap(model), "_tome_state", None) is not None


def apply_tome(
    model: nn.Module,
    r: int | Sequence[int] | tuple[int, float],
    start_idx: int = 0,
    policy: str = "none",
    *,
    prop_attn: bool = True,
    trace_source: bool = False,
) -> nn.Module:
    """Attach token merging to a timm ViT in place (re-applying replaces the settings); returns it.

    ``r``: int, per-block list, or ``(r, inflection)`` ramp; ``start_idx`` counts attention blocks;
    ``policy`` for attention-free blocks: "none" (reference) or "hidden" (merge on norm2(x)).
    """
    model = unwrap(model)
    get_blocks(model)
    if not hasattr(model, "num_prefix_tokens") or not hasattr(model, "patch_embed"):
        raise ShrinkError(f"{type(model).__name__} is not a timm VisionTransformer (no patch tokens / prefix tokens)")
    kinds = _block_kinds(model)
    schedule = tome_schedule(kinds, r, start_idx, policy)  # validate everything before changing the model
    if getattr(model, "attn_pool", None) is not None:
        raise ShrinkError("attention pooling ('map'/'prr') does not support merged tokens; use token or avg pooling")
    if is_tome(model):
        remove_tome(model)
    blocks = get_blocks(model)
    state = ToMeState(model, model.num_prefix_tokens, prop_attn=prop_attn, trace_source=trace_source)
    state.merging = any(v > 0 for v in schedule)
    for i, b in enumerate(blocks):
        sized = prop_attn and any(v > 0 for v in schedule[:i])  # tokens may arrive merged
        if isinstance(b, AttentionFreeBlock):
            new = ToMeAttentionFreeBlock(b, schedule[i], i, state, policy, sized)
        elif isinstance(b, DilutedBlock):
            new = ToMeDilutedBlock(b, schedule[i], i, state, policy, sized)
        else:
            new = ToMeBlock(b, schedule[i], i, state, sized)
        new.train(b.training)
        blocks[i] = new
    model._tome_state = state
    model._tome_info = {"r": r, "start_idx": start_idx, "policy": policy, "prop_attn": prop_attn,
                        "schedule": schedule}
    if "pool" in type(model).__dict__ or hasattr(type(model), "pool"):
        model.pool = types.MethodType(_tome_pool, model)
    if hasattr(type(model), "forward_intermediates"):
        model.forward_intermediates = types.MethodType(_tome_forward_intermediates, model)
    _logger.info("ToMe applied: r per block %s (start_idx=%d, policy=%s)", schedule, start_idx, policy)
    return model


def remove_tome(model: nn.Module) -> nn.Module:
    """Undo apply_tome in place: the original block objects come back with their current weights."""
    model = unwrap(model)
    if not is_tome(model):
        raise ShrinkError("the model has no ToMe applied (call shrink.tome.apply_tome first)")
    blocks = get_blocks(model)
    for i, b in enumerate(blocks):
        if isinstance(b, _TOME_BLOCKS):
            original = b.restore()
            original.train(b.training)
            blocks[i] = original
    for name in ("pool", "forward_intermediates", "_tome_state", "_tome_info"):
        model.__dict__.pop(name, None)
    return model


def tome_info(model: nn.Module) -> dict[str, Any] | None:
    """The settings apply_tome stored (r, start_idx, policy, per-block schedule), or None."""
    info = getattr(unwrap(model), "_tome_info", None)
    return dict(info) if info is not None else None


def tome_state(model: nn.Module) -> ToMeState:
    """The live ToMe state (sizes and source map of the last forward) of a ToMe model."""
    model = unwrap(model)
    if not is_tome(model):
        raise ShrinkError("the model has no ToMe applied")
    return model._tome_state


def _input_size(model: nn.Module, input_size: int | Sequence[int] | None) -> tuple[int, int, int]:
    pe = getattr(model, "patch_embed", None)
    in_chans = getattr(getattr(pe, "proj", None), "in_channels", 3)
    if input_size is None:
        img = getattr(pe, "img_size", None)
        if img is None:
            raise ShrinkError("cannot tell the model's input size; pass input_size=(C, H, W)")
        return (in_chans, int(img[0]), int(img[1]))
    if isinstance(input_size, numbers.Integral):
        return (in_chans, int(input_size), int(input_size))
    size = tuple(int(v) for v in input_size)
    if len(size) == 2:
        return (in_chans, *size)
    if len(size) != 3:
        raise ShrinkError(f"input_size must be an int, (H, W) or (C, H, W), got {input_size!r}")
    return size  # type: ignore[return-value]


@torch.inference_mode()
def tome_token_counts(
    model: nn.Module, input_size: int | Sequence[int] | None = None, batch: int = 1
) -> list[int]:
    """Tokens left after each block, measured by a real forward pass on a random input."""
    model = unwrap(model)
    blocks = get_blocks(model)
    c, h, w = _input_size(model, input_size)
    p = next(model.parameters())
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, c, h, w, generator=gen).to(device=p.device, dtype=p.dtype)
    counts: list[int] = []
    hooks = [b.register_forward_hook(lambda _m, _i, out: counts.append(int(out.shape[1]))) for b in blocks]
    was_training = model.training
    try:
        model.eval()
        model(x)
    finally:
        for hk in hooks:
            hk.remove()
        model.train(was_training)
    return counts
