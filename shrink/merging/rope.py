"""Token merging for rotary-embedding attention: timm's ``Eva`` model class (EVA-02, DINOv3, Perception
Encoder, RoPE ViTs incl. ``rope_mixed`` with learned per-depth frequencies; pre-norm ``EvaBlock`` and
post-norm ``EvaBlockPostNorm``; ``EvaAttention`` and ``AttentionRope``; MAP / avg pooling).

**Positions follow the tokens.** Every timm rotary class computes ``sin`` / ``cos`` of a phase that is
*linear* in a coordinate grid (``_build_grid``, ``get_mixed_grid``, ``make_coords_dinov3``, ...). Each
token carries its coordinates in that rope's own grid units as a tracked quantity
(``state.tracked["rope_coords"]``, ``(B, N, 2)``); a merge averages them with the tokens, weighted by
size, so a merged token sits at the size-weighted mean of its patches' coordinates, and the blocks after
it compute its rotary embedding *at that coordinate* with the rope class's own formula
(:func:`rope_embed_at`). The embedding cannot be averaged instead (or read back from the table): the
high-frequency bands alias, and a mean of unit rotations is not a rotation. Prefix tokens (class,
registers) never merge and never get a rotation, as in timm.

Until the first merge the blocks use the table timm passed as it is (r = 0 is exactly timm). The
matching metric is the keys *before* the rotation (after q/k-norm), averaged over heads: the content of
the tokens, so two identical patches at different positions match perfectly; the rotation would make
their similarity depend on the absolute frequencies of the bands.

``rope_mixed`` (learned frequencies per block and head): block ``i`` evaluates its own frequencies
``rope.freqs[:, i]`` at the merged coordinates, ``(B, heads, N', 2 * head_dim)``; the other kinds give
``(B, 1, N', 2 * head_dim)``.

Refused with a one-line :class:`~shrink.errors.ShrinkError`: merging while the rope's train-time
coordinate augmentation (shift / jitter / rescale) is active (its random grid is drawn inside timm and
cannot be reproduced for the merged tokens: call ``model.eval()`` or build the model without it), patch
dropout while training (the kept patches' positions are not known outside timm), a rope class without a
coordinate formula here, and an attention-pool head with a positional table of its own.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from shrink.errors import ShrinkError
from shrink.merging.kernels import (
    AttentionCall,
    ModelSupport,
    bind_methods,
    register_attention_kernel,
    register_model_support,
)
from shrink.merging.merge import proportional_attention, weighted_mean

__all__ = ["TRACKER", "rope_coords", "rope_embed_at", "rope_kinds"]

TRACKER = "rope_coords"  # the name of the tracked per-token coordinates in ToMeState


def _timm(module: str, name: str) -> Any:
    mod = __import__(module, fromlist=[name])
    return getattr(mod, name, None)


_SINCOS = "timm.layers.pos_embed_sincos"
# timm's functions, looked up once (the kernels run under torch.compile / torch.export)
_build_grid = _timm(_SINCOS, "_build_grid")
_rope_layout = _timm(_SINCOS, "_rope_layout")
_get_mixed_grid = _timm(_SINCOS, "get_mixed_grid")
_get_mixed_freqs = _timm(_SINCOS, "get_mixed_freqs")
_apply_rot_embed_cat = _timm(_SINCOS, "apply_rot_embed_cat")
_ROPE_NAMES = ("RotaryEmbeddingCat", "RotaryEmbeddingDinoV3", "RotaryEmbeddingMixed", "RotaryEmbeddingMRope")
_ROPES = {n: c for n in _ROPE_NAMES if (c := _timm(_SINCOS, n)) is not None}


def rope_kinds() -> dict[str, type]:
    """The rotary classes of this timm that merged tokens support, by name."""
    return dict(_ROPES)


def _kind(rope: nn.Module) -> str | None:
    for name, cls in _ROPES.items():
        if type(rope) is cls:
            return name
    return None


def rope_coords(rope: nn.Module, shape: tuple[int, int] | list[int]) -> torch.Tensor:
    """The coordinates ``(H * W, 2)`` (float32, token order) at which ``rope`` evaluates its embedding
    for an ``(H, W)`` patch grid, in its own units (timm's grid functions, unaugmented)."""
    shape = [int(shape[0]), int(shape[1])]
    kind = _kind(rope)
    if kind == "RotaryEmbeddingCat":
        grid_type = getattr(rope, "grid_type", None) or ("pixel" if rope.in_pixels else "index")
        kw = {"normalize_coords": rope.normalize_coords} if hasattr(rope, "normalize_coords") else {}
        grid = _build_grid(shape, grid_type=grid_type, ref_feat_shape=rope.ref_feat_shape,
                          grid_offset=rope.grid_offset, grid_indexing=rope.grid_indexing,
                          device=rope.bands.device, **kw)
    elif kind == "RotaryEmbeddingDinoV3":
        grid = _build_grid(shape, grid_type="centered", grid_offset=rope.grid_offset,
                          grid_indexing=rope.grid_indexing, normalize_coords=rope.normalize_coords,
                          device=rope.periods.device)
    elif kind == "RotaryEmbeddingMixed":
        t_x, t_y = _get_mixed_grid(shape, grid_indexing=rope.grid_indexing, device=rope.freqs.device)
        return torch.stack([t_x, t_y], dim=-1).float()
    elif kind == "RotaryEmbeddingMRope":
        grid = _build_grid(shape, grid_indexing=rope.grid_indexing, device=rope.inv_freq.device)
    else:
        raise ShrinkError(f"token merging (r > 0) has no coordinate formula for {type(rope).__name__} rotary "
                          "embeddings (Cat, DinoV3, Mixed and MRope are supported); r = 0 works")
    return grid.reshape(-1, 2).float()


def rope_embed_at(rope: nn.Module, coords: torch.Tensor, index: int = 0,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """The rotary embedding of ``rope`` at coordinates ``coords`` ``(B, N, 2)`` (any real values, in the
    units of :func:`rope_coords`): ``(B, 1, N, 2 * dim)`` (sin then cos, the layout timm's
    ``apply_rot_embed_cat`` takes), or ``(B, heads, N, 2 * head_dim)`` for the mixed rope, with the
    frequencies of block ``index``. At the integer grid it equals ``rope.get_embed`` (tested)."""
    layout = _rope_layout
    kind = _kind(rope)
    B, N, _ = coords.shape
    if kind == "RotaryEmbeddingCat":  # build_fourier_pos_embed + build_rotary_pos_embed, after the grid
        pos = coords.float().unsqueeze(-1) * rope.bands.float()  # (B, N, 2, bands)
        sin = layout(pos.sin().flatten(-2), rope.rotate_half)
        cos = layout(pos.cos().flatten(-2), rope.rotate_half)
        out = torch.cat([sin, cos], dim=-1).unsqueeze(1)
    elif kind == "RotaryEmbeddingDinoV3":
        sin, cos = rope._get_pos_embed_from_coords(coords.reshape(B * N, 2))
        out = torch.cat([sin, cos], dim=-1).reshape(B, 1, N, -1)
    elif kind == "RotaryEmbeddingMixed":
        freqs = rope.freqs[:, index]  # (2, heads, head_dim // 2): this block's learned frequencies
        t = coords.unsqueeze(1)  # (B, 1, N, 2): broadcast over heads
        out = _get_mixed_freqs(freqs, t[..., 0], t[..., 1])
    elif kind == "RotaryEmbeddingMRope":  # RotaryEmbeddingMRope.get_embed after the grid
        grid = coords.float()
        pos = torch.cat([torch.zeros_like(grid[..., :1]), grid], dim=-1).index_select(-1, rope.axis)
        angles = pos * rope.inv_freq
        out = torch.cat([layout(angles.sin(), rotate_half=True), layout(angles.cos(), rotate_half=True)], dim=-1)
        out = out.unsqueeze(1)
    else:
        rope_coords(rope, (1, 1))  # raises the one-line error
        raise AssertionError
    return out if dtype is None else out.to(dtype)


# --------------------------------------------------------------------------------------------------
# Model level: the tracked coordinates, the pool, the checks
# --------------------------------------------------------------------------------------------------

def _grid_shape(model: nn.Module, state: Any) -> tuple[int, int]:
    """The (H, W) grid the model's rope table is built for in this forward (as ``Eva._pos_embed``)."""
    rope = model.rope
    if getattr(model, "dynamic_img_size", False):
        if state.grid is None:
            raise ShrinkError("token merging could not record the patch grid of this input")
        return state.grid
    feat = getattr(rope, "feat_shape", None)
    return tuple(feat) if feat is not None else tuple(model.patch_embed.grid_size)


def _track_coords(x: torch.Tensor, state: Any) -> torch.Tensor:
    """Tracker: every token's rope coordinates ``(B, N0, 2)`` at the start of a forward (prefix: 0)."""
    model = state.model
    rope = model.rope
    if rope.training and getattr(rope, "aug_active", False):
        raise ShrinkError("token merging (r > 0) cannot follow the rope's train-time coordinate augmentation "
                          "(shift / jitter / rescale): call model.eval() or build the model without it")
    coords = rope_coords(rope, _grid_shape(model, state)).to(x.device)
    B, N0 = x.shape[:2]
    npt = state.num_protected
    if N0 - npt != coords.shape[0]:
        raise ShrinkError(f"token merging (r > 0) expects {coords.shape[0]} patch tokens after the "
                          f"{npt} prefix tokens, got {N0 - npt} (patch dropout while training?): call model.eval()")
    return torch.cat([coords.new_zeros(B, npt, 2), coords.unsqueeze(0).expand(B, -1, -1)], dim=1)


def _eva_pool(self: nn.Module, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
    """``Eva.pool`` with merged tokens weighed by size (bound to the model): the MAP head gets
    ``log(size)`` on every key (it pools every token, prefix included, as in timm); avg / avgmax
    average the patch tokens by size; token / max pooling need no weights."""
    size = self._tome_state.size
    if size is None or size.shape[:2] != x.shape[:2]:
        return type(self).pool(self, x, pool_type)
    if self.attn_pool is not None:
        return self.attn_pool(x, attn_mask=size.log().to(x.dtype).transpose(1, 2).unsqueeze(1))
    pool_type = self.global_pool if pool_type is None else pool_type
    if pool_type not in ("avg", "avgmax"):
        return type(self).pool(self, x, pool_type)
    p = self.num_prefix_tokens
    x, size = x[:, p:], size[:, p:]
    mean = weighted_mean(x, size)
    return mean if pool_type == "avg" else 0.5 * (x.amax(dim=1) + mean)


def _check_eva(model: nn.Module) -> None:
    rope = getattr(model, "rope", None)
    if rope is not None and _kind(rope) is None:
        raise ShrinkError(f"token merging (r > 0) has no coordinate formula for {type(rope).__name__} rotary "
                          "embeddings (Cat, DinoV3, Mixed and MRope are supported); r = 0 works")
    pool = getattr(model, "attn_pool", None)
    latent = _timm("timm.layers", "AttentionPoolLatent")
    if pool is not None and (type(pool) is not latent or getattr(pool, "pos_embed", None) is not None):
        raise ShrinkError(f"attention pooling {type(pool).__name__} does not support merged tokens (timm's "
                          "MAP head without its own pos_embed does); use token or avg pooling (r = 0 works)")


def _install_eva(model: nn.Module, state: Any) -> Callable[[], None]:
    if getattr(model, "rope", None) is not None:
        state.trackers[TRACKER] = _track_coords
    return bind_methods(model, pool=_eva_pool)  # the trackers go with the state (remove_tome drops it)


register_model_support(ModelSupport("eva", (_timm("timm.models.eva", "Eva"),), check=_check_eva,
                                    install=_install_eva))


# --------------------------------------------------------------------------------------------------
# The attention kernel (EvaAttention, AttentionRope)
# --------------------------------------------------------------------------------------------------

def _qkv(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v ``(B, heads, N, head_dim)`` after q/k-norm, as the module's own forward."""
    B, N, _ = x.shape
    if attn.qkv is not None:
        q_bias = getattr(attn, "q_bias", None)  # EvaAttention: q / v biases, no k bias
        if q_bias is None:
            qkv = attn.qkv(x)
        else:
            bias = torch.cat((q_bias, attn.k_bias, attn.v_bias))
            if attn.qkv_bias_separate:
                qkv = attn.qkv(x)
                qkv += bias
            else:
                qkv = F.linear(x, weight=attn.qkv.weight, bias=bias)
        q, k, v = qkv.reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        kv_heads = getattr(attn, "num_kv_heads", attn.num_heads)
        q = attn.q_proj(x).reshape(B, N, attn.num_heads, -1).transpose(1, 2)
        k = attn.k_proj(x).reshape(B, N, kv_heads, -1).transpose(1, 2)
        v = attn.v_proj(x).reshape(B, N, kv_heads, -1).transpose(1, 2)
    return attn.q_norm(q), attn.k_norm(k), v


def _merged_rope(table: torch.Tensor, call: AttentionCall, npt: int) -> torch.Tensor:
    """The rotary embedding at the merged tokens' coordinates, in the dtype of timm's table."""
    state = call.state
    coords = state.tracked.get(TRACKER) if state is not None else None
    if coords is None:
        raise ShrinkError("merged tokens reached a rotary attention without their coordinates "
                          "(apply_tome installs them on Eva models only)")
    return rope_embed_at(state.model.rope, coords[:, npt:], call.index, dtype=table.dtype)


def rope_attention(attn: nn.Module, x: torch.Tensor, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor | None]:
    """EvaAttention / AttentionRope forward on (possibly merged) tokens: proportional attention
    (``+ log(size)`` on each key), the rotation at each token's (merged) coordinates, and the matching
    metric (keys before the rotation, averaged over heads)."""
    B, N, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    q, k, v = _qkv(attn, x)
    metric = k.mean(dim=1) if call.metric else None
    rope = call.ctx.get("rope")
    npt = attn.num_prefix_tokens
    state = call.state
    if rope is not None and (call.merged or (state is not None and state.size is not None)):
        rope = _merged_rope(rope, call, npt)  # tokens have merged: timm's table no longer lines up
    if rope is not None:
        apply = _apply_rot_embed_cat
        half = getattr(attn, "rotate_half", False)
        q = torch.cat([q[:, :, :npt, :], apply(q[:, :, npt:, :], rope, half=half)], dim=2).type_as(v)
        k = torch.cat([k[:, :, :npt, :], apply(k[:, :, npt:, :], rope, half=half)], dim=2).type_as(v)
    groups = getattr(attn, "num_kv_groups", 1)
    if groups > 1:  # grouped-query attention: kv heads shared by groups of query heads
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    if attn.fused_attn:
        out = proportional_attention(q, k, v, call.size, fused=True,
                                     dropout_p=attn.attn_drop.p if attn.training else 0.0)
    else:
        out = proportional_attention(q, k, v, call.size, fused=False, scale=attn.scale, dropout=attn.attn_drop)
    out = attn.norm(out.transpose(1, 2).reshape(B, N, -1))
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), metric


register_attention_kernel(_timm("timm.models.eva", "EvaAttention"), _timm("timm.layers", "AttentionRope"))(
    rope_attention)
