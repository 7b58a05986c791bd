"""The block families shrink knows: one :class:`~shrink.blocks.contract.Family` adapter per timm
block family, each registered with :func:`~shrink.blocks.contract.register_family`.

A family whose timm classes this timm lacks is not registered. A new family is one decorated
class here (or in the user's own module): docs/extending.md.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shrink.blocks.contract import Family, register_family

__all__ = ["DiffParallelScalingFamily", "ParallelScalingFamily", "ParallelThingsFamily", "PostNormFamily",
           "WindowedFamily"]

_VIT_CTX = ("attn_mask", "is_causal")
_EVA_CTX = ("rope", "attn_mask", "is_causal")


class PostNormFamily(Family):
    """``x + drop1(norm1(attn(x)))``, then ``x + drop2(norm2(mlp(x)))`` (norm after each branch)."""

    layout = "post-norm"
    residual_scale = 1.0

    def attention_branch(self, blk, x, ctx, attn_call=None):
        attn = getattr(blk, self.attn)
        y = attn(x, **ctx) if attn_call is None else attn_call(attn, x, ctx)
        return getattr(blk, self.drop1)(getattr(blk, self.norm1)(y))

    def mlp_branch(self, blk, x, ctx):
        return getattr(blk, self.drop2)(getattr(blk, self.norm2)(getattr(blk, self.mlp_name)(x)))

    def merge_input(self, blk, x):
        return x

    def output_projections(self, blk, attention_free):
        return [None]  # a norm follows each branch: folding does not apply


class WindowedFamily(Family):
    """The SAM ViT's block: tokens as ``(B, H, W, C)``, attention inside windows (window partition
    and unpartition around it when ``window_size > 0``), the MLP over ``(B, H*W, C)``."""

    tome_refusal = ("its tokens are a (B, H, W, C) grid cut into attention windows, and a merged token "
                    "has no place in the grid")

    def attention_branch(self, blk, x, ctx, attn_call=None):
        from timm.models.vision_transformer_sam import window_partition, window_unpartition

        B, H, W, _ = x.shape
        h = getattr(blk, self.norm1)(x)
        pad_hw = None
        if blk.window_size > 0:
            h, pad_hw = window_partition(h, blk.window_size)
        attn = getattr(blk, self.attn)
        h = attn(h, **ctx) if attn_call is None else attn_call(attn, h, ctx)
        h = getattr(blk, self.drop1)(self._scale(blk, self.scale1, h))
        if blk.window_size > 0:
            h = window_unpartition(h, blk.window_size, (H, W), pad_hw)
        return h

    def mlp_branch(self, blk, x, ctx):
        B, H, W, C = x.shape
        m = super().mlp_branch(blk, x.reshape(B, H * W, C), ctx)
        return m.reshape(B, H, W, C)


class ParallelThingsFamily(Family):
    """``ParallelThingsBlock``: several pre-norm attention branches summed, then several MLP branches
    summed. All attention branches of a block are removed together (``attns``)."""

    def __init__(self, name, classes, **kw):
        super().__init__(name, classes, context=("attn_mask", "is_causal"), **kw)

    @property
    def removed(self):
        return ("attns",)

    def attention_modules(self, blk):
        return [branch.attn for branch in blk.attns]

    def attention_branch(self, blk, x, ctx, attn_call=None):
        outs = []
        for branch in blk.attns:
            h = branch.norm(x)
            y = branch.attn(h, **ctx) if attn_call is None else attn_call(branch.attn, h, ctx)
            outs.append(branch.drop_path(branch.ls(y)))
        return torch.stack(outs).sum(dim=0)

    def mlp_branch(self, blk, x, ctx):
        return torch.stack([ffn(x) for ffn in blk.ffns]).sum(dim=0)

    def merge_input(self, blk, x):
        return blk.ffns[0].norm(x)

    def output_projections(self, blk, attention_free):
        projs = [] if attention_free else [getattr(b.attn, "proj", None) for b in blk.attns]
        return [*projs, *(getattr(f.mlp, "fc2", None) for f in blk.ffns)]


class ParallelScalingFamily(Family):
    """``ParallelScalingBlock`` (ViT-22B style): attention and MLP read one ``in_norm`` and one fused
    ``in_proj``; their outputs meet in ``out_proj`` (fused) or ``attn_out_proj + mlp_out_proj``,
    then one LayerScale and drop path. Removal keeps the MLP rows / columns, the shared norm, layer
    scale and biases; it drops the q / k / v rows, the q / k norms and the attention columns."""

    layout = "parallel"
    attention_only = ("q_norm", "k_norm", "attn_drop", "attn_out_proj")

    def __init__(self, name, classes, **kw):
        super().__init__(name, classes, context=("attn_mask", "is_causal"), **kw)

    @property
    def removed(self):
        return self.attention_only

    def attention_modules(self, blk):
        return [blk]  # attention is inlined in the block

    def _attend(self, blk, q, k, v, B, N, C, ctx):
        q = blk.q_norm(q.view(B, N, blk.num_heads, blk.head_dim)).transpose(1, 2)
        k = blk.k_norm(k.view(B, N, blk.num_heads, blk.head_dim)).transpose(1, 2)
        v = v.view(B, N, blk.num_heads, blk.head_dim).transpose(1, 2)
        if ctx.get("_keys") is not None:  # ToMe's matching metric: the keys averaged over heads
            ctx["_keys"].append(k.mean(dim=1))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.get("attn_mask"),
                                           dropout_p=blk.attn_drop.p if blk.training else 0.0,
                                           is_causal=bool(ctx.get("is_causal", False)))
        return y.transpose(1, 2).reshape(B, N, C)

    @staticmethod
    def _mlp_hidden(blk, h):
        if blk.mlp_bias is not None:
            h = h + blk.mlp_bias
        return blk.mlp_drop(blk.mlp_act(h))

    def forward(self, blk, x, lam, scale, ctx, probe=None):
        B, N, C = x.shape
        hidden = blk.in_split[0]
        xn = blk.in_norm(x)
        if lam is None:
            m = self._mlp_out(blk, self._mlp_hidden(blk, F.linear(xn, blk.in_proj.weight[:hidden],
                              None if blk.in_proj.bias is None else blk.in_proj.bias[:hidden])), full=True)
            y = blk.drop_path(blk.ls(m))
            if probe is not None:
                probe.mlp(y)
            return (x * scale if scale != 1.0 else x) + y
        x_mlp, q, k, v = torch.split(blk.in_proj(xn), blk.in_split, dim=-1)
        x_mlp = self._mlp_hidden(blk, x_mlp)
        x_attn = self._attend(blk, q, k, v, B, N, C, ctx)
        if blk.out_proj is not None:
            y = blk.out_proj(torch.cat((lam * x_attn, x_mlp), dim=-1))
            if probe is not None:
                a = F.linear(x_attn, blk.out_proj.weight[:, :C])
                probe.attention(x, blk.ls(a))
                probe.mlp(blk.ls(y - lam * a))
        else:
            a = blk.attn_out_proj(x_attn)
            m = blk.mlp_out_proj(x_mlp)
            y = lam * a + m
            if probe is not None:
                probe.attention(x, blk.ls(a))
                probe.mlp(blk.ls(m))
        y = blk.drop_path(blk.ls(y))
        if scale == 1.0:
            return x + y
        return (scale - (scale - 1.0) * lam) * x + y

    def merged_forward(self, blk, x, lam, scale, ctx, call):
        """The block on merged tokens (ToMe): proportional attention (``log(size)`` added to every key's
        logit, as an additive mask of the fused attention); returns (output, keys averaged over heads,
        or None when ``call.metric`` is False or the attention is gone, ``lam`` None)."""
        keys: list[torch.Tensor] = []
        ctx = {**ctx, "_keys": keys if call.metric else None}
        if call.size is not None:  # (B, 1, 1, N): the same bias for every query and head
            ctx["attn_mask"] = call.size.log().to(x.dtype).squeeze(-1)[:, None, None, :]
        out = self.forward(blk, x, lam, scale, ctx)
        return out, (keys[0] if keys else None)

    @staticmethod
    def _mlp_out(blk, h, full: bool):
        """MLP output projection; ``full``: out_proj still has the attention columns in front."""
        if getattr(blk, "out_proj", None) is not None:
            w = blk.out_proj.weight
            if full:
                w = w[:, w.shape[1] - h.shape[-1]:]
            return F.linear(h, w, blk.out_proj.bias)
        return blk.mlp_out_proj(h)

    def mlp_branch(self, blk, x, ctx):  # the attention-free block: in_proj / out_proj already hold MLP rows only
        h = self._mlp_hidden(blk, blk.in_proj(blk.in_norm(x)))
        return blk.drop_path(blk.ls(self._mlp_out(blk, h, full=False)))

    def merge_input(self, blk, x):
        return blk.in_norm(x)

    def strip(self, blk):
        parts = {n: getattr(blk, n) for n in self.kept_names(blk)}
        cuts = self.export_slices(blk)
        for name in ("in_proj", "out_proj"):  # new linears holding the MLP rows / columns only
            old = getattr(blk, name, None)
            if old is None:
                continue
            w = old.weight[cuts[f"{name}.weight"]]
            b = None if old.bias is None else old.bias[cuts.get(f"{name}.bias", (slice(None),))]
            new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
            with torch.no_grad():
                new.weight.copy_(w)
                if b is not None:
                    new.bias.copy_(b)
            new.requires_grad_(old.weight.requires_grad)
            parts[name] = new
        return parts

    def export_slices(self, blk):
        hidden = blk.in_split[0]
        out = {"in_proj.weight": (slice(0, hidden),)}
        if blk.in_proj.bias is not None:
            out["in_proj.bias"] = (slice(0, hidden),)
        if blk.out_proj is not None:
            out["out_proj.weight"] = (slice(None), slice(blk.out_proj.weight.shape[1] - hidden, None))
        return out

    def removed_parameters(self, blk):
        dim = blk.in_proj.in_features
        hidden = blk.in_split[0]
        n = 3 * dim * dim + (3 * dim if blk.in_proj.bias is not None else 0)
        if blk.out_proj is not None:
            n += blk.out_proj.weight.shape[0] * (blk.out_proj.weight.shape[1] - hidden)
        return n + super().removed_parameters(blk)  # q / k norms, attn_out_proj, lambdas

    def output_projections(self, blk, attention_free):
        if getattr(blk, "out_proj", None) is not None:
            return [blk.out_proj]
        return [blk.mlp_out_proj] if attention_free else [blk.attn_out_proj, blk.mlp_out_proj]


class DiffParallelScalingFamily(ParallelScalingFamily):
    """``DiffParallelScalingBlock``: the parallel block with differential attention (two softmax
    maps, ``sub_norm``, the learned lambda parameters); always a fused ``out_proj``."""

    attention_only = ("q_norm", "k_norm", "attn_drop", "sub_norm",
                      "lambda_a", "lambda_b", "lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")

    def _attend(self, blk, q, k, v, B, N, C, ctx):
        H, hd = blk.num_heads, blk.head_dim
        q = q.reshape(B, N, 2 * H, hd).transpose(1, 2)
        k = k.reshape(B, N, 2 * H, hd).transpose(1, 2)
        v = v.reshape(B, N, H, 2 * hd).transpose(1, 2)
        q, k = blk.q_norm(q), blk.k_norm(k)
        if ctx.get("_keys") is not None:  # ToMe's matching metric: the keys averaged over both maps' heads
            ctx["_keys"].append(k.mean(dim=1))
        lambda_full = blk._compute_lambda().type_as(q)
        q1, q2 = q.reshape(B, H, 2, N, hd).unbind(2)
        k1, k2 = k.reshape(B, H, 2, N, hd).unbind(2)
        p = blk.attn_drop_p if blk.training else 0.0
        mask, causal = ctx.get("attn_mask"), bool(ctx.get("is_causal", False))
        a1 = F.scaled_dot_product_attention(q1, k1, v, attn_mask=mask, dropout_p=p, is_causal=causal)
        a2 = F.scaled_dot_product_attention(q2, k2, v, attn_mask=mask, dropout_p=p, is_causal=causal)
        y = blk.sub_norm(a1 - lambda_full * a2) * (1 - blk.lambda_init)
        return y.transpose(1, 2).reshape(B, N, C)


# --------------------------------------------------------------------------------------------------
# The registered families (the order is the order of FAMILIES)
# --------------------------------------------------------------------------------------------------


@register_family("vit", blocks=["vision_transformer.Block"], context=_VIT_CTX,
                 examples=("vit_*", "deit_*", "naflexvit_*", "vit_*_resnet*"),
                 notes="timm's pre-norm Block: ls1 / ls2 LayerScale, qk-norm, registers")
class VitFamily(Family):
    """timm's pre-norm ``Block`` (``VisionTransformer``)."""


@register_family("eva", blocks=["eva.EvaBlock"], context=_EVA_CTX, scale1="gamma_1", scale2="gamma_2",
                 examples=("eva02_*", "vit_*_dinov3", "vit_pe_*", "vit_*_rope_*"),
                 notes="RoPE passed to the attention; gamma_1 / gamma_2 layer scale; SwiGLU MLPs")
class EvaFamily(Family):
    """``EvaBlock``: RoPE in the context, ``gamma_1`` / ``gamma_2`` layer scale."""


@register_family("beit", blocks=["beit.Block"], context=("shared_rel_pos_bias",),
                 scale1="gamma_1", scale2="gamma_2", examples=("beit_*", "beitv2_*"),
                 notes="relative-position bias per block or shared (model.rel_pos_bias)")
class BeitFamily(Family):
    """BEiT's ``Block``: relative-position bias per block or shared."""


@register_family("cait", blocks=["cait.LayerScaleBlock"], scale1="gamma_1", scale2="gamma_2",
                 drop1="drop_path", drop2="drop_path", examples=("cait_*",),
                 notes="talking-heads self-attention blocks; the class-attention blocks (blocks_token_only) are kept")
class CaitFamily(Family):
    """CaiT's ``LayerScaleBlock`` (talking heads); one ``drop_path`` for both branches."""


@register_family("relpos", blocks=["vision_transformer_relpos.RelPosBlock"], context=("shared_rel_pos",),
                 examples=("vit_relpos_*", "vit_srelpos_*"),
                 notes="relative-position bias per block, or shared (model.shared_rel_pos)")
class RelPosFamily(Family):
    """``RelPosBlock``: relative-position bias per block or shared."""


@register_family("sam", blocks=["vision_transformer_sam.Block"], examples=("samvit_*",),
                 notes="(B, H, W, C) tokens; windowed or global attention with relative positions")
class SamFamily(WindowedFamily):
    """The SAM ViT's windowed block."""


@register_family("respost", blocks=["vision_transformer.ResPostBlock"], context=_VIT_CTX,
                 examples=("vit_*_respost*",), notes="post-norm: a norm after each branch")
class ResPostFamily(PostNormFamily):
    """``ResPostBlock``: post-norm ViT block."""


@register_family("eva-postnorm", blocks=["eva.EvaBlockPostNorm"], context=_EVA_CTX,
                 examples=("eva02 (use_post_norm=True)",), notes="post-norm Eva block")
class EvaPostNormFamily(PostNormFamily):
    """``EvaBlockPostNorm``."""


@register_family("relpos-respost", blocks=["vision_transformer_relpos.ResPostRelPosBlock"],
                 context=("shared_rel_pos",), examples=("vit_relpos_*_respost*",),
                 notes="post-norm relative-position block")
class RelPosResPostFamily(PostNormFamily):
    """``ResPostRelPosBlock``."""


register_family("parallel-things", blocks=["vision_transformer.ParallelThingsBlock"],
                examples=("vit_*_parallel*",), notes="several attention / MLP branches in parallel")(ParallelThingsFamily)
register_family("parallel-scaling", blocks=["vision_transformer.ParallelScalingBlock"],
                examples=("vit_*_pscan*",),
                notes="one in_norm / in_proj for attention and MLP, fused or split out_proj")(ParallelScalingFamily)
register_family("diff-parallel-scaling", blocks=["vision_transformer.DiffParallelScalingBlock"],
                examples=("vit_*_pscan_diff*",),
                notes="parallel block with differential attention")(DiffParallelScalingFamily)
