"""The ToMe blocks: the per-forward state a model's blocks share and the block forwards that merge.

:func:`shrink.merging.patch.apply_tome` swaps each block's class for a subclass of :class:`ToMeBlock`
and of its own class (:func:`tome_class`); the block then merges ``tome_r`` tokens between its token
mixer and its MLP branch, asking the block contract (:mod:`shrink.blocks.contract`) for the two
branches and the attention kernels (:mod:`shrink.merging.kernels`) for proportional attention and the
keys metric. Per-forward state (sizes, source map, tracked per-token quantities) lives in one
:class:`ToMeState` shared by the blocks of one model.
"""
from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from shrink.blocks.contract import AttentionFreeBlock, DilutedBlock, block_family, mix
from shrink.errors import ShrinkError
from shrink.merging.kernels import AttentionCall, attention_kernel
from shrink.merging.merge import bipartite_soft_matching, init_source, merge_source, merge_wavg

__all__ = ["ToMeAttentionFreeBlock", "ToMeBlock", "ToMeDilutedBlock", "ToMeState", "key_validity", "tome_class"]


class ToMeState:
    """Per-forward ToMe state of one model: token sizes, (optionally) the source map, and per-token
    quantities that follow the merges (``tracked``: e.g. patch coordinates for rotary embeddings)."""

    def __init__(self, model: nn.Module, num_protected: int, prop_attn: bool = True, trace_source: bool = False):
        self.model = model  # read for grad_checkpointing; a plain attribute, not a submodule
        self.num_protected = int(num_protected)
        self.prop_attn = bool(prop_attn)
        self.trace_source = bool(trace_source)
        self.merging = False  # any block with r > 0
        self.last_block = sys.maxsize  # index of the block that ran last; a lower or equal one starts anew
        self.size: torch.Tensor | None = None  # (B, N, 1) patches per token; None = all ones
        self.source: torch.Tensor | None = None  # (B, N, N0) 0/1: input tokens of each token
        self.sources: dict[int, torch.Tensor] | None = None  # block -> source after it (forward_intermediates)
        self.grid: tuple[int, int] | None = None  # the patch grid (H, W) of the current input, when known
        # name -> fn(x (B, N0, C), state) -> (B, N0, k): per-token quantities set at the start of a forward
        # and merged by size-weighted mean with the tokens (registered by a ModelSupport's install)
        self.trackers: dict[str, Any] = {}
        self.tracked: dict[str, torch.Tensor] = {}

    def restart(self) -> None:
        """The next block to run starts a new forward."""
        self.last_block = sys.maxsize

    def begin(self, x: torch.Tensor) -> None:
        """Start a new forward pass on tokens ``x`` ``(B, N0, C)``."""
        if self.merging and torch.is_grad_enabled() and getattr(self.model, "grad_checkpointing", False):
            raise ShrinkError(
                "ToMe cannot run under gradient checkpointing (blocks are re-run out of order and the "
                "token count changes): call model.set_grad_checkpointing(False) or remove_tome(model)"
            )
        self.size = None
        self.source = init_source(x.shape[0], x.shape[1], x.device) if self.trace_source else None
        self.tracked = {name: fn(x, self) for name, fn in self.trackers.items()} if self.merging else {}


def key_validity(attn_mask: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """``(B, N)`` bool: the tokens a padding mask lets be attended to.

    ToMe takes the masks of padded batches (NaFlexVit's, symmetric or key-only, boolean or additive
    with 0 / -inf or the dtype's minimum): a merged token has no row or column of an arbitrary mask,
    so any other mask is a one-line ShrinkError."""
    m = attn_mask
    if m.dtype == torch.bool:
        allowed = m
    else:
        low = torch.finfo(m.dtype).min / 2
        if bool(((m != 0) & (m > low)).any()):
            raise ShrinkError("ToMe takes padding masks only (0 where allowed, -inf where not); this attn_mask "
                              "holds other values (a bias): remove_tome or pass no mask")
        allowed = m > low
    while allowed.dim() < 4:
        allowed = allowed.unsqueeze(0)
    if allowed.shape[-1] != num_tokens:
        raise ShrinkError(f"attn_mask covers {allowed.shape[-1]} tokens but the block sees {num_tokens}")
    allowed = allowed.expand(-1, -1, num_tokens if allowed.shape[-2] != 1 else 1, -1).any(dim=1)  # (B, Q, K)
    valid = allowed.any(dim=-2)  # (B, K): attended by some query
    key_only = allowed == valid.unsqueeze(1)
    symmetric = allowed == (valid.unsqueeze(-1) & valid.unsqueeze(1)) if allowed.shape[1] == num_tokens else key_only
    if not bool((key_only.all(dim=(1, 2)) | symmetric.all(dim=(1, 2))).all()):
        raise ShrinkError("ToMe takes padding masks only (a token is attended by all or by none); this attn_mask "
                          "is not one: remove_tome or pass no mask")
    return valid


class ToMeBlock(nn.Module):
    """Mixin of every ToMe block: the original block object (plain, diluted or attention-free) with
    its class swapped to a subclass of this and of its class; state-dict keys unchanged.

    It merges ``tome_r`` tokens between the token mixer and the MLP branch, asking the block
    contract (:mod:`shrink.blocks.contract`) for the two branches."""

    tome_r: int
    tome_index: int
    tome_sized: bool
    tome_policy: str
    _tome_state: ToMeState
    _tome_prev: type  # the class before apply_tome (set on the generated class)

    def _tome_init(self, r: int, index: int, state: ToMeState, policy: str, sized: bool = True) -> None:
        self.tome_r = int(r)
        self.tome_index = int(index)
        self.tome_policy = policy
        # False when no earlier block merges (or prop_attn is off): all sizes are 1 here, so a block
        # with r = 0 runs the plain timm path (fused attention, no metric, no size bookkeeping)
        self.tome_sized = bool(sized)
        object.__setattr__(self, "_tome_state", state)  # shared, not a submodule

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
        """The sizes proportional attention weighs keys by; 0 for padding (log 0 = -inf masks it)."""
        st = self._tome_state
        size = st.size if st.prop_attn else None
        valid = st.tracked.get("valid")
        if valid is not None:
            size = valid if size is None else size * valid
        return size

    def _merge(self, x: torch.Tensor, metric: torch.Tensor) -> torch.Tensor:
        st = self._tome_state
        valid = st.tracked.get("valid")
        m = bipartite_soft_matching(metric, self.tome_r, st.num_protected,
                                    None if valid is None else valid[..., 0] > 0.5)
        if m is None:
            return x
        for name, t in st.tracked.items():  # before the sizes change: weighted by the sizes going in
            st.tracked[name] = merge_wavg(m, t, st.size)[0]
        x, st.size = merge_wavg(m, x, st.size)
        if st.source is not None:
            st.source = merge_source(m, st.source)
        return x

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._begin(x)
        out = self._tome_forward(x, *args, **kwargs)
        st = self._tome_state
        if st.sources is not None:  # forward_intermediates unmerges through the source after each block
            st.sources[self.tome_index] = st.source
        return out

    def _tome_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.tome_plain:
            return self._tome_prev.forward(self, x, *args, **kwargs)
        fam = block_family(self)
        ctx = fam.context(args, kwargs)
        mask, causal = ctx.pop("attn_mask", None), bool(ctx.pop("is_causal", False))
        if causal:
            raise ShrinkError("ToMe blocks take no is_causal (merging changes the tokens); remove_tome first")
        st = self._tome_state
        if mask is not None and "valid" not in st.tracked:  # a padded batch: padding follows the merges
            st.tracked["valid"] = key_validity(mask, x.shape[1]).unsqueeze(-1).to(torch.float32)
        free = isinstance(self, AttentionFreeBlock) or (isinstance(self, DilutedBlock) and not self.attn_active)
        if fam.layout == "parallel" and not isinstance(self, AttentionFreeBlock):
            return self._parallel_forward(fam, x, ctx, free)
        if free:
            if self.residual_scale != 1.0:
                x = x * self.residual_scale
            if self.tome_r > 0 and self.tome_policy == "hidden":
                x = self._merge(x, fam.merge_input(self, x))
            return x + fam.mlp_branch(self, x, ctx)
        metrics: list[torch.Tensor | None] = []
        call_info = AttentionCall(self._attn_size(), self.tome_r > 0, self.tome_index, ctx, self._tome_state)

        def call(attn: nn.Module, h: torch.Tensor, _ctx: dict) -> torch.Tensor:
            y, metric = attention_kernel(attn)(attn, h, call_info)
            metrics.append(metric)
            return y

        a = fam.attention_branch(self, x, ctx, attn_call=call)
        x = mix(x, a, self.lam, self.residual_scale) if isinstance(self, DilutedBlock) else x + a
        if self.tome_r > 0:  # several attention branches (ParallelThingsBlock): their keys averaged
            x = self._merge(x, metrics[0] if len(metrics) == 1 else torch.stack(metrics).mean(dim=0))
        return x + fam.mlp_branch(self, x, ctx)

    def _parallel_forward(self, fam: Any, x: torch.Tensor, ctx: dict, free: bool) -> torch.Tensor:
        """A block whose attention and MLP read the same normed input (ParallelScalingBlock): run it
        whole (proportional attention) and merge its output, matched on its keys; when its attention is
        gone (diluted to lambda 0) policy "hidden" matches on the shared normed input."""
        diluted = isinstance(self, DilutedBlock)
        lam = None if free else (self.lam if diluted else 1.0)
        scale = self.residual_scale if diluted else 1.0
        want = self.tome_r > 0 and not free
        call_info = AttentionCall(self._attn_size(), want, self.tome_index, ctx, self._tome_state)
        out, metric = fam.merged_forward(self, x, lam, scale, ctx, call_info)
        if self.tome_r > 0 and free and self.tome_policy == "hidden":
            metric = fam.merge_input(self, x)
        return self._merge(out, metric) if metric is not None and self.tome_r > 0 else out

    def extra_repr(self) -> str:
        base = self._tome_prev.extra_repr(self)
        policy = "" if not isinstance(self, (DilutedBlock, AttentionFreeBlock)) else f", policy={self.tome_policy}"
        return f"{base + ', ' if base else ''}r={self.tome_r}{policy}"


class ToMeDilutedBlock(ToMeBlock, DilutedBlock):
    """A diluted block under ToMe: merge after the lambda-weighted attention branch (keys metric);
    at lambda 0 it is attention-free and follows the policy."""


class ToMeAttentionFreeBlock(ToMeBlock, AttentionFreeBlock):
    """An attention-free block under ToMe: policy "none" passes tokens through, "hidden" merges
    ``tome_r`` tokens before the MLP, matched on the MLP's normalised input."""

    _tome_prev = AttentionFreeBlock


_TOME_CLASSES: dict[type, type] = {}


def tome_class(cls: type) -> type:
    """The ToMe subclass of block class ``cls`` (made once, cached)."""
    if cls is AttentionFreeBlock:
        return ToMeAttentionFreeBlock
    out = _TOME_CLASSES.get(cls)
    if out is None:
        mixin = ToMeDilutedBlock if issubclass(cls, DilutedBlock) else ToMeBlock
        attrs = {"_tome_prev": cls, "__module__": __name__}
        if not issubclass(cls, DilutedBlock):
            attrs["_shrink_base"] = cls
        out = type(f"ToMe{cls.__name__}", (mixin, cls), attrs)
        _TOME_CLASSES[cls] = out
    return out
