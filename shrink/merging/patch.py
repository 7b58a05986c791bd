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
"""
from __future__ import annotations

import logging
import numbers
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from shrink.blocks.contract import (
    AttentionFreeBlock,
    DilutedBlock,
    block_family,
    classify_block,
    get_blocks,
    mix,
    unsupported_reason,
)
from shrink.errors import ShrinkError
from shrink.merging.kernels import (
    AttentionCall,
    ModelSupport,
    attention_kernel,
    attention_with_metric,
    bind_methods,
    model_support,
    register_model_support,
)
from shrink.merging.merge import (
    POLICIES,
    bipartite_soft_matching,
    init_source,
    merge_source,
    merge_wavg,
    tome_schedule,
    weighted_mean,
)
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
    "remove_tome",
    "tome_info",
    "tome_schedule",
    "tome_state",
    "tome_token_counts",
]

_logger = logging.getLogger(__name__)


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


def _tome_class(cls: type) -> type:
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


# --------------------------------------------------------------------------------------------------
# Model-level pieces: pooling by size, forward_intermediates guard.
# --------------------------------------------------------------------------------------------------

def _tome_pool(self: nn.Module, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
    """VisionTransformer.pool with the average weighted by token size (bound to the model)."""
    st: ToMeState = self._tome_state
    size = st.size
    if size is None or size.shape[:2] != x.shape[:2]:
        return type(self).pool(self, x, pool_type)
    if self.attn_pool is not None:  # MAP: proportional attention in the pool, log(size) on each key
        p = 0 if self.pool_include_prefix else self.num_prefix_tokens
        x, size = x[:, p:], size[:, p:]
        return self.attn_pool(x, attn_mask=size.log().to(x.dtype).transpose(1, 2).unsqueeze(1))
    pool_type = self.global_pool if pool_type is None else pool_type
    if pool_type not in ("avg", "avgmax"):
        return type(self).pool(self, x, pool_type)
    p = 0 if self.pool_include_prefix else self.num_prefix_tokens
    x, size = x[:, p:], size[:, p:]
    mean = weighted_mean(x, size)
    if pool_type == "avg":
        return mean
    return 0.5 * (x.amax(dim=1) + mean)


def _tome_forward_intermediates(
    self: nn.Module,
    x: torch.Tensor,
    indices: int | Sequence[int] | None = None,
    return_prefix_tokens: bool = False,
    norm: bool = False,
    stop_early: bool = False,
    output_fmt: str = "NCHW",
    intermediates_only: bool = False,
    output_dict: bool = False,
    unmerge: bool | None = None,
    **kwargs: Any,
):
    """timm's ``forward_intermediates`` under ToMe (bound to the model).

    While tokens merge, each intermediate is unmerged through the source map: every original patch
    takes the value of the token it was merged into, so ``NCHW`` always returns the full patch grid
    (dense heads work as on the plain model). ``NLC`` returns the merged tokens unless
    ``unmerge=True``. Prefix tokens never merge and come back as they are.
    """
    if output_fmt not in ("NCHW", "NLC"):
        raise ShrinkError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
    unmerge = output_fmt == "NCHW" if unmerge is None else bool(unmerge)
    st: ToMeState = self._tome_state
    plain = type(self).forward_intermediates
    if not (st.merging and unmerge):
        if output_dict:
            kwargs["output_dict"] = True
        return plain(self, x, indices=indices, return_prefix_tokens=return_prefix_tokens, norm=norm,
                     stop_early=stop_early, output_fmt=output_fmt, intermediates_only=intermediates_only, **kwargs)
    from timm.models._features import feature_take_indices

    take, _ = feature_take_indices(len(get_blocks(self)), indices)
    traced = st.trace_source
    st.trace_source, st.sources = True, {}
    try:
        out = plain(self, x, indices=indices, return_prefix_tokens=bool(st.num_protected), norm=norm,
                    stop_early=stop_early, output_fmt="NLC", intermediates_only=False, **kwargs)
        sources = st.sources
    finally:
        st.trace_source, st.sources = traced, None
    final, inter = out
    npt = st.num_protected  # prefix tokens of the block sequence (CaiT: none; its class token comes later)
    pairs = [(t, None) if not npt else t for t in inter]
    B, _, height, width = x.shape
    patches, prefixes = [], []
    for i, (tokens, prefix) in zip(sorted(take), pairs, strict=True):
        where = sources[i][:, npt:, npt:].argmax(dim=1)  # (B, patches): the token each patch is in now
        full = tokens.gather(1, where.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        if output_fmt == "NCHW":
            H, W = self.patch_embed.dynamic_feat_size((height, width))
            full = full.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous()
        patches.append(full)
        prefixes.append(prefix)
    if output_dict:
        result: dict[str, Any] = {"image_intermediates": patches}
        if npt and return_prefix_tokens:
            result["image_intermediates_prefix"] = prefixes
        if not intermediates_only:
            result["image_features"] = final
        return result
    if npt and return_prefix_tokens:
        patches = list(zip(patches, prefixes, strict=True))
    return patches if intermediates_only else (final, patches)


# --------------------------------------------------------------------------------------------------
# apply / remove
# --------------------------------------------------------------------------------------------------

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


def _check_attention_pool(pool: nn.Module | None) -> None:
    """ShrinkError unless merged tokens can go through ``pool``: none, or timm's attention-pool
    (MAP) head without a positional table of its own (it weighs merged tokens by size)."""
    from timm.layers import AttentionPoolLatent

    if pool is None:
        return
    if type(pool) is not AttentionPoolLatent or getattr(pool, "pos_embed", None) is not None:
        raise ShrinkError(f"attention pooling {type(pool).__name__} does not support merged tokens (timm's "
                          "MAP head without its own pos_embed does); use token or avg pooling (r = 0 works)")


def _install_vit(model: nn.Module, state: ToMeState):
    return bind_methods(model, pool=_tome_pool) if hasattr(type(model), "pool") else None


def _timm_vit_classes() -> tuple[type, ...]:
    from timm.models.vision_transformer import VisionTransformer

    return (VisionTransformer,)


register_model_support(ModelSupport(
    "vit", _timm_vit_classes(), check=lambda m: _check_attention_pool(getattr(m, "attn_pool", None)),
    install=_install_vit,
))


def _naflex_pool(self: nn.Module, x: torch.Tensor, pool_type: str | None = None,
                 patch_valid: torch.Tensor | None = None) -> torch.Tensor:
    """NaFlexVit._pool on merged tokens: weights = size, 0 for padding (bound to the model)."""
    st: ToMeState = self._tome_state
    size, valid = st.size, st.tracked.get("valid")
    if size is None and valid is None or (size if size is not None else valid).shape[1] != x.shape[1]:
        return type(self)._pool(self, x, pool_type, patch_valid)
    w = size if size is not None else torch.ones_like(valid)
    if valid is not None:
        w = w * valid
    npt = self.num_prefix_tokens
    p = 0 if self.pool_include_prefix else npt
    if self.attn_pool is not None:  # MAP: log(weight) on each key, -inf for padding
        return self.attn_pool(x[:, p:], attn_mask=w[:, p:].log().to(x.dtype).transpose(1, 2).unsqueeze(1))
    pool_type = self.global_pool if pool_type is None else pool_type
    if pool_type not in ("avg", "avgmax", "max"):
        return type(self)._pool(self, x, pool_type, None)
    x, w = x[:, p:], w[:, p:]
    mean = weighted_mean(x, w)
    if pool_type == "avg":
        return mean
    peak = x.masked_fill(w == 0, torch.finfo(x.dtype).min).amax(dim=1)
    return peak if pool_type == "max" else 0.5 * (mean + peak)


def _check_naflex(model: nn.Module) -> None:
    _check_attention_pool(getattr(model, "attn_pool", None))
    if getattr(model, "rope", None) is not None:
        raise ShrinkError("token merging (r > 0) is not implemented for NaFlexVit with RoPE (per-patch rotary "
                          "coordinates); r = 0 works")


def _naflex_classes() -> tuple[type, ...]:
    try:
        from timm.models.naflexvit import NaFlexVit
    except ImportError:
        return ()
    return (NaFlexVit,)


if _naflex_classes():
    register_model_support(ModelSupport(
        "naflexvit", _naflex_classes(), check=_check_naflex,
        install=lambda model, state: bind_methods(model, _pool=_naflex_pool),
    ))


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
    support = model_support(model)
    if merging:
        support = _check_merging(model, kinds, schedule)
    if is_tome(model):
        remove_tome(model)
    blocks = get_blocks(model)
    protected = support.num_protected(model) if support is not None else int(getattr(model, "num_prefix_tokens", 0))
    state = ToMeState(model, protected, prop_attn=prop_attn, trace_source=trace_source)
    state.merging = merging
    for i, b in enumerate(blocks):
        sized = prop_attn and any(v > 0 for v in schedule[:i])  # tokens may arrive merged
        b.__class__ = _tome_class(type(b))
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
            undo.append(bind_methods(model, forward_intermediates=_tome_forward_intermediates))
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


# the families' kernels and model supports register themselves on import
