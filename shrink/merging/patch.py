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
ramp over the merging blocks, the official formula, see :func:`shrink.merging.merge.ramp`), or a list
with one entry per block. The r of each block is stored on the block; nothing is popped during
forward. Which tokens merge follows the official partition (A/B by position in the whole sequence,
see :mod:`shrink.merging.merge`), so on DeiT and distilled DeiT the logits are the official code's.

A block with r = 0 that no merging block precedes (all of them after ``apply_tome(model, 0)``) runs
its original timm forward: fused attention, no metric, no size bookkeeping, so it costs nothing.
Blocks after a merge weigh attention by size (``prop_attn``) and compute the metric only if they merge.

Class, distillation and register tokens (``model.num_prefix_tokens``) never merge and stay in
front, so token pooling is unchanged; average pooling is weighted by token size. Per-forward state
(sizes, optional source map) lives in one small object shared by the blocks (``tome_state(model)``)
and is reset when a block runs that does not come after the last one that ran, i.e. at the start
of every forward however it is entered (``forward``, ``forward_features``, ``forward_intermediates``
or blocks called one by one). One model must therefore not run two forwards at once (threads,
``nn.DataParallel``); DDP is fine. Gradient checkpointing (which re-runs blocks out of order) is
refused with a ShrinkError while any block merges. ``forward_intermediates`` unmerges through the
source map: ``output_fmt='NCHW'`` returns the full patch grid (each patch takes the value of the
token it went into), ``'NLC'`` the merged tokens unless ``unmerge=True``.

This module is the API (apply, remove, inspect); the block forwards and the shared state are in
:mod:`shrink.merging.block`, pooling and ``forward_intermediates`` in :mod:`shrink.merging.models`.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from shrink.blocks.contract import block_family, classify_block, get_blocks, unsupported_reason
from shrink.errors import ShrinkError
from shrink.introspect import input_size as model_input_size
from shrink.merging.block import (
    ToMeAttentionFreeBlock,
    ToMeBlock,
    ToMeDilutedBlock,
    ToMeState,
    key_validity,
    tome_class,
)
from shrink.merging.kernels import (
    ModelSupport,
    attention_kernel,
    attention_with_metric,
    bind_methods,
    model_support,
    protected_tokens,
)
from shrink.merging.merge import POLICIES, tome_schedule
from shrink.merging.models import tome_forward_intermediates
from shrink.unwrap import unwrap

__all__ = [
    "POLICIES",
    "ToMeAttentionFreeBlock",
    "ToMeBlock",
    "ToMeDilutedBlock",
    "ToMeState",
    "apply_tome",
    "attention_with_metric",
    "is_tome",
    "key_validity",
    "remove_tome",
    "tome_info",
    "tome_schedule",
    "tome_state",
    "tome_token_counts",
]

_logger = logging.getLogger(__name__)

def _block_kinds(model: nn.Module) -> list[str]:
    """'attn' or 'free' per block; a ShrinkError for any block the contract does not know."""
    kinds = []
    for i, b in enumerate(get_blocks(model)):
        kind = classify_block(b)
        if kind == "unsupported":
            raise ShrinkError(f"block {i} is not supported by ToMe: {unsupported_reason(b)}")
        if kind == "diluted":
            kind = "attention" if b.attn_active else "attention-free"
        kinds.append("free" if kind == "attention-free" else "attn")
    return kinds


def _check_merging(model: nn.Module, kinds: list[str], schedule: list[int]) -> ModelSupport:
    """The model's support, or a one-line ShrinkError unless every block from the first merge on can
    run merged tokens (its family merges: not windowed attention; each of its attention modules has a
    kernel, :mod:`shrink.merging.kernels`) and the model class has a support."""
    blocks = get_blocks(model)
    first = next(i for i, r in enumerate(schedule) if r > 0)
    for i, (b, kind) in enumerate(zip(blocks, kinds, strict=True)):
        if i < first:  # blocks before the first merge see whole, unweighted tokens
            continue
        fam = block_family(b)
        reason = fam.tome_refusal
        if reason:
            raise ShrinkError(f"block {i}: token merging (r > 0) does not apply to {fam.name} blocks ({reason}); "
                              "r = 0 works on every family")
        if kind == "attn" and fam.layout != "parallel":
            bad = [type(a).__name__ for a in fam.attention_modules(b) if attention_kernel(a) is None]
            if bad:
                raise ShrinkError(
                    f"block {i}: token merging (r > 0) is not implemented for {fam.name} blocks with "
                    f"{bad[0]} attention; r = 0 works on every family"
                )
    support = model_support(model)
    if support is None:
        raise ShrinkError(f"token merging (r > 0) is not implemented for {type(model).__name__} models "
                          "(see docs/tome.md for the supported families); r = 0 works on every family")
    if support.check is not None:
        support.check(model)
    return support


class _RecordGrid:
    """A patch_embed forward pre-hook that records the patch grid (H, W) of each input image in the
    state (an object, not a closure: a deep copy of the model records into its own state)."""

    def __init__(self, state: ToMeState):
        self.state = state

    def __call__(self, module: nn.Module, args: tuple) -> None:
        img = args[0] if args else None
        if not isinstance(img, torch.Tensor) or img.dim() != 4:
            self.state.grid = None
            return
        size = (int(img.shape[-2]), int(img.shape[-1]))
        feat = getattr(module, "dynamic_feat_size", None)
        self.state.grid = tuple(int(v) for v in feat(size)) if feat is not None else tuple(module.grid_size)


def _restart(model: nn.Module, args: tuple) -> None:
    """The model's forward pre-hook: every call starts a forward (the model's own state, so copies work)."""
    model._tome_state.restart()


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
    kinds = _block_kinds(model)
    schedule = tome_schedule(kinds, r, start_idx, policy)  # validate everything before changing the model
    merging = any(v > 0 for v in schedule)
    support = _check_merging(model, kinds, schedule) if merging else None
    if is_tome(model):
        remove_tome(model)
    blocks = get_blocks(model)
    state = ToMeState(model, protected_tokens(model), prop_attn=prop_attn, trace_source=trace_source)
    state.merging = merging
    for i, b in enumerate(blocks):
        sized = prop_attn and any(v > 0 for v in schedule[:i])  # tokens may arrive merged
        b.__class__ = tome_class(type(b))
        b._tome_init(schedule[i], i, state, policy, sized)
    model._tome_state = state
    model._tome_info = {"r": r, "start_idx": start_idx, "policy": policy, "prop_attn": prop_attn,
                        "schedule": schedule}
    # every call of the model starts a forward: under torch.compile this keeps the state that the
    # previous call left (last block, sizes) out of the guards, so a second batch does not recompile
    undo: list[Any] = [model.register_forward_pre_hook(_restart).remove]
    if merging:
        pe = getattr(model, "patch_embed", None)
        if isinstance(pe, nn.Module):
            undo.append(pe.register_forward_pre_hook(_RecordGrid(state)).remove)
        if hasattr(type(model), "forward_intermediates"):  # dense outputs unmerge through the source map
            undo.append(bind_methods(model, forward_intermediates=tome_forward_intermediates))
        if support.install is not None:
            u = support.install(model, state)
            if u is not None:
                undo.append(u)
    object.__setattr__(model, "_tome_undo", undo)  # a plain list, not a submodule
    _logger.info("ToMe applied: r per block %s (start_idx=%d, policy=%s)", schedule, start_idx, policy)
    return model


def remove_tome(model: nn.Module) -> nn.Module:
    """Undo apply_tome in place: the original block objects come back with their current weights."""
    model = unwrap(model)
    if not is_tome(model):
        raise ShrinkError("the model has no ToMe applied (call shrink.merging.patch.apply_tome first)")
    for b in get_blocks(model):
        if isinstance(b, ToMeBlock):
            b.__class__ = b._tome_prev
            for name in ("tome_r", "tome_index", "tome_policy", "tome_sized", "_tome_state"):
                b.__dict__.pop(name, None)
    for fn in reversed(model.__dict__.get("_tome_undo", [])):
        fn()
    for name in ("_tome_state", "_tome_info", "_tome_undo"):
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


@torch.inference_mode()
def tome_token_counts(
    model: nn.Module, input_size: int | Sequence[int] | None = None, batch: int = 1
) -> list[int]:
    """Tokens left after each block, measured by a real forward pass on a random input."""
    model = unwrap(model)
    blocks = get_blocks(model)
    c, h, w = model_input_size(model, input_size)
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
