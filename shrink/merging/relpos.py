"""Token merging for relative-position-bias attention: timm's ``Beit`` (BEiT, BEiT v2: a bias table per
block, a shared one in ``model.rel_pos_bias``, or both) and ``VisionTransformerRelPos`` (``vit_relpos_*``,
``vit_srelpos_*``: ``RelPosMlp`` / ``RelPosBias`` / ``RelPosBiasTf`` per block or shared in
``model.shared_rel_pos``; pre-norm ``RelPosBlock`` and post-norm ``ResPostRelPosBlock``).

**The bias between merged tokens is the mean over their input tokens' pairs.** The attention of these
models adds a bias ``B[p, q]`` (per head) to the logit of every pair of input tokens ``p, q`` (class
token rows / columns included where the table has them). After merges, token ``i`` stands for the set
of input tokens ``S_i`` (``|S_i| = size_i``), and its bias to token ``j`` is

    B'[i, j] = sum_{p in S_i, q in S_j} B[p, q] / (size_i * size_j)

i.e. ``B' = S B S^T`` with ``S`` the row-normalised membership matrix. Prefix tokens never merge, so
their rows / columns are their own. This is the bias for which merging is exact in the case ToMe is
built on: two identical tokens whose bias rows and columns are equal merge into one token of size 2
with that same row / column, and proportional attention (``+ log(size_j)`` on each key, added to the
bias before the softmax) makes it attend and be attended exactly as the pair did. Otherwise it is the
average of the pairs' biases, a bias on the merged token's mean position in *bias space* (it does not
pick one representative patch; a learned table is not linear in the offset, so the bias "at the mean
offset" would be neither defined for a table nor more faithful).

Which input tokens each token holds is a tracked quantity (``state.tracked["relpos_members"]``,
``(B, N, N0)``: the identity at the start of a forward, merged by size-weighted mean with the tokens,
so row ``i`` is ``1 / size_i`` on ``S_i``). It is not the source map (``trace_source``): that is a
visualisation aid that deployment refuses, and this model needs it in every forward, exported ones
included. ``B'`` is computed by one scatter-add of the ``N0 x N0`` bias into the ``N x N`` token pairs
(each input token is in exactly one token), ``O(batch * heads * N0^2)`` per block, then divided by the
sizes; the dense ``S B S^T`` costs ``N`` times more (see :func:`merged_bias_dense`, kept as the
reference).

Until the first merge (as many tokens as the bias has rows) the kernels compute exactly what the
module's own forward computes (r = 0 is timm). Average pooling is weighted by token size
(``forward_head`` bound on the model); token pooling is unchanged. The ``vit_relpos`` attention with a
relative-position module of a class not known here is refused with a one-line ShrinkError.
"""
from __future__ import annotations

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
from shrink.merging.merge import init_source, proportional_bias, weighted_mean

__all__ = ["TRACKER", "merge_bias", "merged_bias", "merged_bias_dense"]

TRACKER = "relpos_members"  # (B, N, N0): row i is 1 / size_i on the input tokens token i holds


def _timm(module: str, name: str) -> Any:
    mod = __import__(module, fromlist=[name])
    return getattr(mod, name, None)


# --------------------------------------------------------------------------------------------------
# the merged bias
# --------------------------------------------------------------------------------------------------

def _batched(bias: torch.Tensor) -> torch.Tensor:
    """``bias`` as ``(b, H, N0, N0)`` (timm gives ``(H, N0, N0)`` or ``(1, H, N0, N0)``)."""
    if bias.dim() == 3:
        return bias.unsqueeze(0)
    if bias.dim() != 4:
        raise ShrinkError(f"a relative-position bias must be (heads, N, N) or (batch, heads, N, N), got {tuple(bias.shape)}")
    return bias


def merged_bias(bias: torch.Tensor, where: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """The mean bias between merged tokens, ``(B, H, N, N)``.

    ``bias`` ``(H, N0, N0)`` or ``(1 | B, H, N0, N0)`` over input tokens; ``where`` ``(B, N0)`` long: the
    token each input token is in now; ``size`` ``(B, N)`` or ``(B, N, 1)``: input tokens per token.
    ``B'[i, j] = sum_{where[p] = i, where[q] = j} B[p, q] / (size_i * size_j)``, by one scatter-add over
    the ``N0^2`` input pairs (summed in float32)."""
    bias = _batched(bias)
    B, N0 = where.shape
    size = size.reshape(B, -1)
    N = size.shape[1]
    H = bias.shape[1]
    pair = (where.unsqueeze(2) * N + where.unsqueeze(1)).reshape(B, 1, N0 * N0).expand(B, H, N0 * N0)
    src = bias.to(torch.float32).reshape(bias.shape[0], H, N0 * N0).expand(B, H, N0 * N0)
    total = torch.zeros(B, H, N * N, dtype=torch.float32, device=bias.device).scatter_add(2, pair, src)
    inv = size.to(torch.float32).reciprocal()
    out = total.reshape(B, H, N, N) * inv[:, None, :, None] * inv[:, None, None, :]
    return out.to(bias.dtype)


def merged_bias_dense(bias: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
    """The same mean as :func:`merged_bias` as ``S B S^T`` with ``members`` ``S`` ``(B, N, N0)`` (rows
    ``1 / size`` on each token's input tokens): the reference, ``N`` times the cost."""
    bias = _batched(bias).to(torch.float32)
    s = members.to(torch.float32).unsqueeze(1)  # (B, 1, N, N0)
    return (s @ bias @ s.transpose(-1, -2)).to(bias.dtype)


def merge_bias(bias: torch.Tensor | None, num_tokens: int, call: AttentionCall) -> torch.Tensor | None:
    """``bias`` over the input tokens, made the mean bias of the ``num_tokens`` tokens of this block; as
    it is while nothing has merged (as many tokens as the bias has rows)."""
    if bias is None or bias.shape[-1] == num_tokens:
        return bias
    state = call.state
    members = None if state is None else state.tracked.get(TRACKER)
    if members is None or members.shape[1] != num_tokens or members.shape[2] != bias.shape[-1]:
        raise ShrinkError(f"the relative-position bias covers {bias.shape[-1]} tokens but the block sees "
                          f"{num_tokens}, and this model does not track merged tokens (apply_tome on the model)")
    where = members.argmax(dim=1)  # (B, N0): every input token is in exactly one token
    size = state.size if state.size is not None else (members > 0).sum(dim=-1).to(torch.float32)
    return merged_bias(bias, where, size)


def _attention_bias(bias: torch.Tensor | None, size: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """The additive attention mask: (merged) bias plus ``log(size)`` on every key (proportional attention)."""
    prop = proportional_bias(size, dtype)
    if bias is None:
        return prop
    bias = bias.to(dtype)
    return bias if prop is None else bias + prop


def _merge_heads(out: torch.Tensor) -> torch.Tensor:
    """``(B, H, N, D) -> (B, N, H * D)`` through a contiguous copy: the layout of a fused attention's output
    differs between tracing and the ONNX decomposition, and a ``reshape`` traced as a view fails there."""
    B, _, N, _ = out.shape
    return out.transpose(1, 2).clone(memory_format=torch.contiguous_format).reshape(B, N, -1)


def _attend(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
            scale: float) -> torch.Tensor:
    if attn.fused_attn:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                              dropout_p=attn.attn_drop.p if attn.training else 0.0)
    a = (q * scale) @ k.transpose(-2, -1)
    if mask is not None:
        a = a + mask
    return attn.attn_drop(a.softmax(dim=-1)) @ v


def _attend_merged(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                   call: AttentionCall) -> torch.Tensor:
    """Attention over merged tokens: the bias merged like the tokens, plus ``log(size)`` on every key."""
    mask = _attention_bias(merge_bias(bias, q.shape[-2], call), call.size, q.dtype)
    return _attend(attn, q, k, v, mask, attn.scale)


def _project(attn: nn.Module, out: torch.Tensor, k: torch.Tensor, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The heads joined and projected, and the keys metric (mean over heads) when the call wants it."""
    return attn.proj_drop(attn.proj(_merge_heads(out))), (k.mean(dim=1) if call.metric else None)


# --------------------------------------------------------------------------------------------------
# BEiT
# --------------------------------------------------------------------------------------------------

def _beit_qkv(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if attn.q_bias is None:
        return attn.qkv(x)
    qkv_bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
    if attn.qkv_bias_separate:
        return attn.qkv(x) + qkv_bias
    return F.linear(x, weight=attn.qkv.weight, bias=qkv_bias)


@register_attention_kernel(_timm("timm.models.beit", "Attention"))
def beit_kernel(attn: nn.Module, x: torch.Tensor, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor | None]:
    """timm ``beit.Attention`` on merged tokens: its own table plus the shared one (``shared_rel_pos_bias``)
    as the mean bias of the merged tokens, and proportional attention."""
    B, N, _ = x.shape
    qkv = _beit_qkv(attn, x).reshape(B, N, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    shared = call.ctx.get("shared_rel_pos_bias")
    own = attn._get_rel_pos_bias() if attn.relative_position_bias_table is not None else None
    bias = own if shared is None else shared if own is None else own + shared
    if call.size is None and (bias is None or bias.shape[-1] == N):
        # nothing merged: timm's own computation, term by term
        if attn.fused_attn:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                                 dropout_p=attn.attn_drop.p if attn.training else 0.0)
        else:
            a = (q * attn.scale) @ k.transpose(-2, -1)
            if own is not None:
                a = a + own
            if shared is not None:
                a = a + shared
            out = attn.attn_drop(a.softmax(dim=-1)) @ v
    else:
        out = _attend_merged(attn, q, k, v, bias, call)
    return _project(attn, out, k, call)


# --------------------------------------------------------------------------------------------------
# vision_transformer_relpos
# --------------------------------------------------------------------------------------------------

_POS_EMBED_REL = "timm.layers.pos_embed_rel"


def _rel_pos_classes() -> tuple[type, ...]:
    """The relative-position modules whose bias is ``get_bias()``, added to the logits (``forward``)."""
    names = ("RelPosMlp", "RelPosBias", "RelPosBiasTf")
    return tuple(c for n in names if (c := _timm(_POS_EMBED_REL, n)) is not None)


@register_attention_kernel(_timm("timm.models.vision_transformer_relpos", "RelPosAttention"))
def relpos_kernel(attn: nn.Module, x: torch.Tensor, call: AttentionCall) -> tuple[torch.Tensor, torch.Tensor | None]:
    """timm ``RelPosAttention`` on merged tokens: its ``rel_pos`` bias, or else the shared one
    (``shared_rel_pos``), as the mean bias of the merged tokens, and proportional attention."""
    B, N, _ = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    shared = call.ctx.get("shared_rel_pos")
    bias = attn.rel_pos.get_bias() if attn.rel_pos is not None else shared
    if call.size is None and (bias is None or bias.shape[-2] == N):
        # nothing merged: timm's own computation
        if attn.fused_attn:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                                 dropout_p=attn.attn_drop.p if attn.training else 0.0)
        else:
            a = (q * attn.scale) @ k.transpose(-2, -1)
            if attn.rel_pos is not None:
                a = attn.rel_pos(a, shared_rel_pos=shared)
            elif shared is not None:
                a = a + shared
            out = attn.attn_drop(a.softmax(dim=-1)) @ v
    else:
        out = _attend_merged(attn, q, k, v, bias, call)
    return _project(attn, out, k, call)


# --------------------------------------------------------------------------------------------------
# model supports
# --------------------------------------------------------------------------------------------------

def _tome_forward_head(self: nn.Module, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
    """``Beit`` / ``VisionTransformerRelPos`` ``forward_head`` with the average weighted by token size
    (bound to the model); token pooling and unmerged tokens go to timm's own."""
    size = self._tome_state.size
    if self.global_pool != "avg" or size is None or size.shape[:2] != x.shape[:2]:
        return type(self).forward_head(self, x, pre_logits)
    p = self.num_prefix_tokens
    x = weighted_mean(x[:, p:], size[:, p:])
    x = self.head_drop(self.fc_norm(x))
    return x if pre_logits else self.head(x)


def _members(x: torch.Tensor, state: Any) -> torch.Tensor:
    """The tracker: at the start of a forward every token holds itself."""
    return init_source(x.shape[0], x.shape[1], x.device)


def _after_merges_take_the_kernel(model: nn.Module) -> None:
    """Without proportional attention (``prop_attn=False``) apply_tome runs the blocks after a merge as
    plain timm blocks (nothing to weigh); here the bias must still follow the merged tokens, so they take
    the kernel (with no size: ``log(size)`` is left out as asked)."""
    blocks = sorted((m for m in model.modules() if hasattr(m, "tome_sized") and hasattr(m, "tome_r")),
                    key=lambda m: m.tome_index)
    merged = False
    for b in blocks:
        if merged:
            b.tome_sized = True
        merged = merged or b.tome_r > 0


def _install(model: nn.Module, state: Any):
    state.trackers[TRACKER] = _members
    if not state.prop_attn:
        _after_merges_take_the_kernel(model)
    return bind_methods(model, forward_head=_tome_forward_head)  # the tracker goes with the state


def _check_relpos(model: nn.Module) -> None:
    known = _rel_pos_classes()
    attn_cls = _timm("timm.models.vision_transformer_relpos", "RelPosAttention")
    tables = [getattr(model, "shared_rel_pos", None)]
    tables += [m.rel_pos for m in model.modules() if attn_cls is not None and isinstance(m, attn_cls)]
    for t in tables:
        if t is not None and type(t) not in known:
            raise ShrinkError(f"token merging (r > 0) is not implemented for the relative-position module "
                              f"{type(t).__name__} (known: {', '.join(c.__name__ for c in known)}); r = 0 works")


def _classes(module: str, name: str) -> tuple[type, ...]:
    c = _timm(module, name)
    return (c,) if c is not None else ()


if _classes("timm.models.beit", "Beit"):
    register_model_support(ModelSupport("beit", _classes("timm.models.beit", "Beit"), install=_install))
if _classes("timm.models.vision_transformer_relpos", "VisionTransformerRelPos"):
    register_model_support(ModelSupport(
        "relpos", _classes("timm.models.vision_transformer_relpos", "VisionTransformerRelPos"),
        check=_check_relpos, install=_install,
    ))
