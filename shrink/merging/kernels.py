"""What token merging needs from each attention class and each model class: two small registries.

ToMe runs a block's attention itself, because a merged token stands for several patches: attention
is *proportional* (``+ log(size)`` on each key's logit, which equals attention over a sequence in
which every merged token is repeated ``size`` times) and the block's keys, averaged over heads, are
the matching metric. Anything the attention adds per token pair or per position (rotary
embeddings, relative-position biases) must follow the merged tokens too.

- An **attention kernel** (:func:`register_attention_kernel`) runs one attention class on merged
  tokens: ``kernel(attn, x, call) -> (output, metric or None)``; ``call`` (:class:`AttentionCall`)
  holds the token sizes, whether a metric is wanted, the block's index and extra inputs (``rope=``,
  ``shared_rel_pos=``, ...) and the model's live :class:`~shrink.merging.block.ToMeState` (token positions,
  source map).
- A **model support** (:func:`register_model_support`) says that a model class can run merged tokens
  end to end: how many prefix tokens never merge, a check of the model's settings, and what to
  install on the model (pooling weighted by size, hooks that record the patch grid, ...).

Each family's file (``tome_rope``, ``tome_relpos``, ``tome_cait``) registers its own; this module
holds timm ``Attention`` and ``VisionTransformer``. Nothing here reads block attributes (the block
contract, :mod:`shrink.blocks.contract`, hands the attention modules over).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from shrink.merging.merge import proportional_attention

__all__ = [
    "AttentionCall",
    "Undo",
    "bind_methods",
    "ModelSupport",
    "attention_kernel",
    "attention_with_metric",
    "model_support",
    "protected_tokens",
    "register_attention_kernel",
    "register_model_support",
]


@dataclass
class AttentionCall:
    """What an attention kernel gets besides the module and the (normed) tokens ``x`` ``(B, N, C)``."""

    size: torch.Tensor | None  # (B, N, 1) patches per token for proportional attention; None = all ones
    metric: bool  # return the matching metric (keys averaged over heads, (B, N, head_dim))
    index: int  # the block's index in model.blocks (rotary tables per depth, ...)
    ctx: dict[str, Any] = field(default_factory=dict)  # the block's extra inputs, attn_mask / is_causal removed
    state: Any = None  # the model's ToMeState: positions (state.tracked), source map, patch grid

    @property
    def merged(self) -> bool:
        """True when tokens may have merged before this block (positions / biases must follow them)."""
        return self.size is not None


AttentionKernel = Callable[[nn.Module, torch.Tensor, AttentionCall], "tuple[torch.Tensor, torch.Tensor | None]"]
_KERNELS: dict[type, AttentionKernel] = {}


def register_attention_kernel(*classes: type | None) -> Callable[[AttentionKernel], AttentionKernel]:
    """Decorator: ``fn(attn, x, call) -> (out, metric)`` runs these attention classes under ToMe
    (``None`` entries, classes this timm lacks, are skipped)."""

    def deco(fn: AttentionKernel) -> AttentionKernel:
        for c in classes:
            if c is not None:
                _KERNELS[c] = fn
        return fn

    return deco


def attention_kernel(attn: nn.Module) -> AttentionKernel | None:
    """The kernel of ``attn``'s class, or None. A subclass that overrides ``forward`` has none (its
    computation is unknown)."""
    for klass in type(attn).__mro__:
        fn = _KERNELS.get(klass)
        if fn is not None:
            return fn if type(attn).forward is klass.forward else None
    return None


@dataclass
class ModelSupport:
    """How a model class runs merged tokens (r > 0) end to end."""

    name: str
    classes: tuple[type, ...]
    # prefix tokens of the token sequence the blocks see (they never merge and stay in front)
    num_protected: Callable[[nn.Module], int] = lambda m: int(getattr(m, "num_prefix_tokens", 0))
    # ShrinkError (one line) when this model's settings cannot run merged tokens
    check: Callable[[nn.Module], None] | None = None
    # install(model, state): bind model-level pieces (size-weighted pooling, hooks); returns an undo callable
    install: Callable[[nn.Module, Any], Callable[[], None] | None] | None = None


_SUPPORTS: list[ModelSupport] = []


def register_model_support(support: ModelSupport) -> ModelSupport:
    """Add ``support``; the most specific class wins (a later registration for the same class replaces)."""
    _SUPPORTS[:] = [s for s in _SUPPORTS if s.classes != support.classes]
    _SUPPORTS.append(support)
    return support


def model_support(model: nn.Module) -> ModelSupport | None:
    """The support registered for ``model``'s class or its nearest base class, or None."""
    for klass in type(model).__mro__:
        for s in _SUPPORTS:
            if klass in s.classes:
                return s
    return None


def protected_tokens(model: nn.Module) -> int:
    """Tokens of ``model``'s block sequence that never merge: its support's count, else ``num_prefix_tokens``
    (CaiT: none; its class token joins after the blocks)."""
    support = model_support(model)
    return support.num_protected(model) if support is not None else int(getattr(model, "num_prefix_tokens", 0))


class Undo:
    """One undo step of an install: ``fn(*refs)``. A plain object, not a closure, so that a deep copy
    of a merging model (``shrink.export``, ``copy.deepcopy``) gets steps that act on the copy: the
    references are copied with the model, the function is not."""

    def __init__(self, fn: Callable[..., None], *refs: Any):
        self.fn, self.refs = fn, refs

    def __call__(self) -> None:
        self.fn(*self.refs)


def _unbind(model: nn.Module, names: tuple[str, ...]) -> None:
    for name in names:
        model.__dict__.pop(name, None)


def bind_methods(model: nn.Module, **methods: Callable) -> Undo:
    """Bind ``methods`` on ``model`` (instance attributes over the class's); returns the undo step."""
    import types

    for name, fn in methods.items():
        setattr(model, name, types.MethodType(fn, model))
    return Undo(_unbind, model, tuple(methods))


# --------------------------------------------------------------------------------------------------
# timm Attention (vit, respost, parallel-things blocks; NaFlexVit)
# --------------------------------------------------------------------------------------------------

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


def _timm_attention() -> type | None:
    from timm.layers import Attention

    return Attention


@register_attention_kernel(_timm_attention())
def _vit_kernel(attn: nn.Module, x: torch.Tensor, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor | None]:
    return attention_with_metric(attn, x, call.size, metric=call.metric)
