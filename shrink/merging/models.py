"""The model-level pieces of ToMe: pooling weighted by token size, ``forward_intermediates`` that
unmerges through the source map, and the model supports of timm's VisionTransformer and NaFlexVit
(registered on import; :mod:`shrink.merging.cait`, ``rope`` and ``relpos`` register their own)."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from shrink.blocks.contract import get_blocks
from shrink.errors import ShrinkError
from shrink.merging.block import ToMeState
from shrink.merging.kernels import ModelSupport, bind_methods, register_model_support
from shrink.merging.merge import weighted_mean

__all__ = ["check_attention_pool", "tome_forward_intermediates", "tome_pool"]


def tome_pool(self: nn.Module, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
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


def tome_forward_intermediates(
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


def check_attention_pool(pool: nn.Module | None) -> None:
    """ShrinkError unless merged tokens can go through ``pool``: none, or timm's attention-pool
    (MAP) head without a positional table of its own (it weighs merged tokens by size)."""
    from timm.layers import AttentionPoolLatent

    if pool is None:
        return
    if type(pool) is not AttentionPoolLatent or getattr(pool, "pos_embed", None) is not None:
        raise ShrinkError(f"attention pooling {type(pool).__name__} does not support merged tokens (timm's "
                          "MAP head without its own pos_embed does); use token or avg pooling (r = 0 works)")


def _install_vit(model: nn.Module, state: ToMeState):
    return bind_methods(model, pool=tome_pool) if hasattr(type(model), "pool") else None


def _timm_vit_classes() -> tuple[type, ...]:
    from timm.models.vision_transformer import VisionTransformer

    return (VisionTransformer,)


register_model_support(ModelSupport(
    "vit", _timm_vit_classes(), check=lambda m: check_attention_pool(getattr(m, "attn_pool", None)),
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
    check_attention_pool(getattr(model, "attn_pool", None))
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
