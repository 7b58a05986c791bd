"""Token merging for CaiT (timm ``Cait``): talking-heads self-attention blocks, class-attention blocks.

CaiT's self-attention blocks (``model.blocks``, ``LayerScaleBlock`` + ``TalkingHeadAttn``) see the
patch tokens only: the class token joins in ``forward_cls``, whose class-attention blocks
(``model.blocks_token_only``) update it from ``cat(class token, patches)``. So no token of the block
sequence is protected (``num_protected`` 0 although ``model.num_prefix_tokens`` is 1), every patch
token may merge, and the class-attention blocks attend over the merged patches.

- **Talking heads** (:func:`talking_heads_with_metric`): the logits are mixed across heads by
  ``proj_l`` before the softmax and the probabilities by ``proj_w`` after it. Repeating a key
  ``s`` times repeats its logits in every head, hence its ``proj_l``-mixed logits, so the softmax
  over the copies equals ``+ log(s)`` added right before the softmax (after ``proj_l``). ``proj_w``
  is affine: its weight mixes the (now proportional) probabilities, but its bias is added once per
  key, ``s`` times for ``s`` copies, so the bias is scaled by the key's size. With both, the output
  equals talking-heads attention over the sequence in which each token is repeated ``size`` times.
  The matching metric is the keys averaged over heads.
- **Class attention**: the ``ClassAttn`` modules of ``model.blocks_token_only`` get their class
  swapped (undone by ``remove_tome``) to a subclass that adds ``log(size)`` of each patch token
  (the class token counts 1) to the keys' logits while tokens are merged.
- **Pooling**: ``'token'`` reads the class token (unchanged); ``'avg'`` averages the patch tokens
  weighted by size (``forward_head`` bound).
- **forward_intermediates** (CaiT's own signature, no prefix tokens): unmerged through the source
  map like the generic one in :mod:`shrink.merging.patch`; ``NCHW`` always returns the full patch grid.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from shrink.errors import ShrinkError
from shrink.merging.kernels import (
    AttentionCall,
    ModelSupport,
    Undo,
    bind_methods,
    register_attention_kernel,
    register_model_support,
)
from shrink.merging.merge import proportional_attention, proportional_bias, weighted_mean

__all__ = ["class_attention_sizes", "talking_heads_with_metric"]


def _cait() -> Any:
    try:
        from timm.models import cait
    except ImportError:  # pragma: no cover - every timm 1.x has it
        return None
    return cait


_CAIT = _cait()
TalkingHeadAttn = getattr(_CAIT, "TalkingHeadAttn", None)
ClassAttn = getattr(_CAIT, "ClassAttn", None)
Cait = getattr(_CAIT, "Cait", None)
LayerScaleBlockClassAttn = getattr(_CAIT, "LayerScaleBlockClassAttn", None)


# --------------------------------------------------------------------------------------------------
# Talking-heads self-attention (the blocks of model.blocks)
# --------------------------------------------------------------------------------------------------

def talking_heads_with_metric(
    attn: nn.Module, x: torch.Tensor, size: torch.Tensor | None = None, *, metric: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """timm ``TalkingHeadAttn`` forward on tokens of sizes ``size`` ``(B, N, 1)``; returns (output,
    keys averaged over heads ``(B, N, head_dim)`` or None with ``metric=False``).

    ``+ log(size)`` goes on the ``proj_l``-mixed logits (right before the softmax) and ``proj_w``'s
    bias is counted ``size`` times per key: together, attention over the tokens repeated ``size``
    times. ``size=None`` computes exactly the module's own forward."""
    B, N, C = x.shape
    H = attn.num_heads
    qkv = attn.qkv(x).reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0] * attn.scale, qkv[1], qkv[2]
    logits = q @ k.transpose(-2, -1)
    logits = attn.proj_l(logits.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    bias = proportional_bias(size, logits.dtype)  # (B, 1, 1, N): log(size) per key
    if bias is not None:
        logits = logits + bias
    probs = logits.softmax(dim=-1)
    mixed = attn.proj_w(probs.permute(0, 2, 3, 1))  # (B, N, N, H): proj_w's bias once per (query, key)
    w_bias = getattr(attn.proj_w, "bias", None)
    if size is not None and w_bias is not None:  # ... a key repeated s times gets it s times
        mixed = mixed + (size.to(mixed.dtype) - 1).unsqueeze(1) * w_bias
    out = attn.attn_drop(mixed.permute(0, 3, 1, 2))
    out = (out @ v).transpose(1, 2).reshape(B, N, C)
    out = attn.proj_drop(attn.proj(out))
    return out, (k.mean(dim=1) if metric else None)


@register_attention_kernel(TalkingHeadAttn)
def _talking_heads_kernel(attn: nn.Module, x: torch.Tensor, call: AttentionCall):
    return talking_heads_with_metric(attn, x, call.size, metric=call.metric)


# --------------------------------------------------------------------------------------------------
# Class attention (model.blocks_token_only): proportional over the merged patch tokens
# --------------------------------------------------------------------------------------------------

def class_attention_sizes(state: Any, u: torch.Tensor) -> torch.Tensor | None:
    """Sizes ``(B, 1 + N, 1)`` of the class-attention input ``u`` = (class token, the blocks' N
    tokens): 1 for the class token, the merged sizes after it; None when nothing merged (or the
    state's sizes belong to another sequence)."""
    size = getattr(state, "size", None) if getattr(state, "prop_attn", False) else None
    if size is None or size.shape[0] != u.shape[0] or size.shape[1] + 1 != u.shape[1]:
        return None
    return torch.cat([size.new_ones(size.shape[0], 1, 1), size], dim=1)


class _ToMeClassAttn(nn.Module):
    """Mixin of ClassAttn under ToMe: keys weighted by size (``+ log(size)``), the class token 1."""

    _tome_prev: type
    _tome_state: Any

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = class_attention_sizes(self._tome_state, x)
        if size is None:
            return self._tome_prev.forward(self, x)
        B, N, C = x.shape
        H = self.num_heads
        q = self.q(x[:, 0]).unsqueeze(1).reshape(B, 1, H, C // H).permute(0, 2, 1, 3)
        k = self.k(x).reshape(B, N, H, C // H).permute(0, 2, 1, 3)
        v = self.v(x).reshape(B, N, H, C // H).permute(0, 2, 1, 3)
        if self.fused_attn:
            x_cls = proportional_attention(q, k, v, size, fused=True,
                                           dropout_p=self.attn_drop.p if self.training else 0.0)
        else:
            x_cls = proportional_attention(q, k, v, size, fused=False, scale=self.scale, dropout=self.attn_drop)
        x_cls = x_cls.transpose(1, 2).reshape(B, 1, C)
        return self.proj_drop(self.proj(x_cls))


_CLASS_ATTN_CLASSES: dict[type, type] = {}


def _tome_class_attn(cls: type) -> type:
    out = _CLASS_ATTN_CLASSES.get(cls)
    if out is None:
        out = type(f"ToMe{cls.__name__}", (_ToMeClassAttn, cls), {"_tome_prev": cls, "__module__": __name__})
        _CLASS_ATTN_CLASSES[cls] = out
    return out


def _class_attention_modules(model: nn.Module) -> list[list[nn.Module]]:
    """Per class-attention block, its ClassAttn modules (found by type, not by attribute)."""
    blocks = getattr(model, "blocks_token_only", None)
    if blocks is None:
        return []
    return [[m for m in blk.modules() if isinstance(m, ClassAttn)] for blk in blocks]


def _check_cait(model: nn.Module) -> None:
    """ShrinkError (one line) unless every class-attention block is timm's, with one plain ClassAttn."""
    blocks = getattr(model, "blocks_token_only", None)
    for i, (blk, found) in enumerate(zip(blocks or [], _class_attention_modules(model), strict=True)):
        ok = (LayerScaleBlockClassAttn is not None and isinstance(blk, LayerScaleBlockClassAttn)
              and type(blk).forward is LayerScaleBlockClassAttn.forward and len(found) == 1
              and type(found[0]).forward in (ClassAttn.forward, _ToMeClassAttn.forward))
        if not ok:
            raise ShrinkError(f"token merging (r > 0) needs timm's class-attention blocks (LayerScaleBlockClassAttn "
                              f"with one ClassAttn); blocks_token_only[{i}] is {type(blk).__name__}: r = 0 works")
    if model.global_pool not in ("", "token", "avg"):
        raise ShrinkError(f"token merging (r > 0) supports CaiT's 'token' and 'avg' pooling, not "
                          f"{model.global_pool!r}; r = 0 works")


def _cait_forward_head(self: nn.Module, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
    """Cait.forward_head with 'avg' pooling weighted by token size (bound to the model)."""
    size = self._tome_state.size
    p = self.num_prefix_tokens
    if self.global_pool != "avg" or size is None or size.shape[0] != x.shape[0] or size.shape[1] + p != x.shape[1]:
        return type(self).forward_head(self, x, pre_logits)
    x = self.head_drop(weighted_mean(x[:, p:], size))
    return x if pre_logits else self.head(x)


def _cait_forward_intermediates(
    self: nn.Module,
    x: torch.Tensor,
    indices: int | list[int] | None = None,
    norm: bool = False,
    stop_early: bool = False,
    output_fmt: str = "NCHW",
    intermediates_only: bool = False,
    unmerge: bool | None = None,
):
    """Cait.forward_intermediates under ToMe (bound to the model): each intermediate is unmerged
    through the source map (every patch takes the value of the token it went into), so ``NCHW``
    returns the full patch grid; ``NLC`` the merged tokens unless ``unmerge=True``. The final
    features (after the class-attention blocks) are the merged ones, class token first."""
    if output_fmt not in ("NCHW", "NLC"):
        raise ShrinkError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
    unmerge = output_fmt == "NCHW" if unmerge is None else bool(unmerge)
    st = self._tome_state
    plain = type(self).forward_intermediates
    if not (st.merging and unmerge):
        return plain(self, x, indices=indices, norm=norm, stop_early=stop_early, output_fmt=output_fmt,
                     intermediates_only=intermediates_only)
    from timm.models._features import feature_take_indices

    take, _ = feature_take_indices(len(self.blocks), indices)
    traced = st.trace_source
    st.trace_source, st.sources = True, {}
    try:
        out = plain(self, x, indices=indices, norm=norm, stop_early=stop_early, output_fmt="NLC",
                    intermediates_only=intermediates_only)
        sources = st.sources
    finally:
        st.trace_source, st.sources = traced, None
    final, inter = (None, out) if intermediates_only else out
    B, _, height, width = x.shape
    full_maps = []
    for i, tokens in zip(sorted(take), inter, strict=True):
        where = sources[i].argmax(dim=1)  # (B, patches): the token each patch is in now
        full = tokens.gather(1, where.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        if output_fmt == "NCHW":
            H, W = self.patch_embed.dynamic_feat_size((height, width))
            full = full.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous()
        full_maps.append(full)
    return full_maps if intermediates_only else (final, full_maps)


def _install_cait(model: nn.Module, state: Any) -> Callable[[], None]:
    swapped = []
    for found in _class_attention_modules(model):
        for m in found:
            prev = getattr(type(m), "_tome_prev", type(m))
            m.__class__ = _tome_class_attn(prev)
            object.__setattr__(m, "_tome_state", state)  # shared, not a submodule
            swapped.append((m, prev))
    methods: dict[str, Callable] = {"forward_head": _cait_forward_head}
    if hasattr(type(model), "forward_intermediates"):
        methods["forward_intermediates"] = _cait_forward_intermediates
    return Undo(_undo_cait, swapped, bind_methods(model, **methods))


def _undo_cait(swapped: list[tuple[nn.Module, type]], unbind: Undo) -> None:
    for m, prev in swapped:
        m.__class__ = prev
        m.__dict__.pop("_tome_state", None)
    unbind()


if Cait is not None and TalkingHeadAttn is not None and ClassAttn is not None:
    register_model_support(ModelSupport("cait", (Cait,), num_protected=lambda m: 0, check=_check_cait,
                                        install=_install_cait))
