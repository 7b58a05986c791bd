"""Token merging on CaiT (shrink/tome_cait.py): talking-heads self-attention blocks merge with
proportional attention, the class-attention blocks and 'avg' pooling weigh the merged patch tokens
by size; r = 0 exact, token counts, exported models, forward_intermediates, compile, ONNX / pt2."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
from timm.models.cait import ClassAttn, TalkingHeadAttn

import shrink
from shrink.blocks.contract import get_blocks
from shrink.merging.cait import talking_heads_with_metric
from shrink.merging.kernels import attention_kernel
from shrink.merging.merge import proportional_bias
from shrink.merging.patch import tome_state

from .._families import CASES, build, images

KEY = "cait"
SIZES = torch.tensor([[1, 3, 1, 2, 4, 1], [2, 1, 1, 1, 5, 3]], dtype=torch.float32).unsqueeze(-1)


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def _repeat(x: torch.Tensor, b: int, size: torch.Tensor = SIZES) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``b`` of ``x`` with token j repeated size_j times, and the index of each token's first copy."""
    reps = size[b, :, 0].long()
    return x[b].repeat_interleave(reps, dim=0).unsqueeze(0), torch.cumsum(reps, 0) - reps


def _talking_heads(seed: int = 0) -> TalkingHeadAttn:
    torch.manual_seed(seed)
    attn = TalkingHeadAttn(32, num_heads=4, qkv_bias=True).eval()
    with torch.no_grad():  # sizeable head-mixing biases: a wrong treatment of them shows
        attn.proj_l.bias.normal_(0, 0.5)
        attn.proj_w.bias.normal_(0, 0.5)
    return attn


# ---- the two equalities with repeated tokens -------------------------------------------------------

def test_talking_heads_on_merged_tokens_equals_attention_over_repeated_tokens():
    attn = _talking_heads()
    x = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out, metric = talking_heads_with_metric(attn, x, SIZES)
        naive_diff = 0.0
        for b in range(2):
            x_rep, first = _repeat(x, b)
            ref = attn(x_rep)[0]
            assert maxdiff(out[b], ref[first]) <= 1e-5
            # log(size) alone (proj_w's bias counted once per key) is not the repeated sequence: the test can fail
            naive = _naive_talking_heads(attn, x[b:b + 1], SIZES[b:b + 1])[0]
            naive_diff = max(naive_diff, maxdiff(naive, ref[first]))
        assert naive_diff > 1e-3
        assert metric.shape == (2, 6, 8)  # keys averaged over the 4 heads
        k = attn.qkv(x).reshape(2, 6, 3, 4, 8)[:, :, 1]
        assert maxdiff(metric, k.mean(dim=2)) <= 1e-6
        # no sizes: exactly the module's forward; all-ones sizes: the same within rounding
        plain, none = talking_heads_with_metric(attn, x, None, metric=False)
        assert none is None and torch.equal(plain, attn(x))
        assert maxdiff(talking_heads_with_metric(attn, x, torch.ones(2, 6, 1))[0], attn(x)) <= 1e-6
    assert attention_kernel(attn) is not None


def _naive_talking_heads(attn: TalkingHeadAttn, x: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    B, N, C = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, C // attn.num_heads).permute(2, 0, 3, 1, 4)
    logits = (qkv[0] * attn.scale) @ qkv[1].transpose(-2, -1)
    logits = attn.proj_l(logits.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) + proportional_bias(size, x.dtype)
    probs = attn.proj_w(logits.softmax(dim=-1).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    return attn.proj((probs @ qkv[2]).transpose(1, 2).reshape(B, N, C))


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("pool", ["token", "avg"])
def test_class_attention_and_pooling_on_merged_tokens_equal_repeated_tokens(fused, pool):
    """forward_cls + norm + forward_head on patch tokens of sizes s equal the plain model on the
    sequence in which every patch token is repeated s times (class attention and 'avg' pooling)."""
    model = build(KEY)
    model.reset_classifier(5, pool)
    for m in model.modules():
        if isinstance(m, ClassAttn):
            m.fused_attn = fused
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # a class token that really reads the patches
        for p in model.blocks_token_only.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g))
    x = torch.randn(2, 6, model.embed_dim, generator=torch.Generator().manual_seed(2))
    shrink.apply_tome(model, 1)
    state = tome_state(model)
    with torch.no_grad():
        state.size = SIZES
        merged = model.forward_head(model.norm(model.forward_cls(x)), pre_logits=True)
        shrink.remove_tome(model)
        for b in range(2):
            x_rep, _ = _repeat(x, b)
            ref = model.forward_head(model.norm(model.forward_cls(x_rep)), pre_logits=True)
            assert maxdiff(merged[b], ref[0]) <= 1e-5
            unweighted = model.forward_head(model.norm(model.forward_cls(x[b:b + 1])), pre_logits=True)
            assert maxdiff(unweighted[0], ref[0]) > 1e-2  # sizes matter: the test can fail


# ---- the family's acceptance ----------------------------------------------------------------------

def test_r0_is_timm_and_merging_counts_finite_exported_and_removable():
    model, x = build(KEY), images(KEY)
    with torch.no_grad():
        ref = model(x)
        shrink.apply_tome(model, 0)
        assert torch.equal(model(x), ref)
        for b in get_blocks(model):  # r = 0 through the kernels (every block weighs by size): timm's result
            b.tome_sized = True
        assert maxdiff(model(x), ref) <= 1e-5
        # 4 patches, no protected token (the class token joins only in forward_cls): 4 -> 3 -> 2 -> 1
        shrink.apply_tome(model, 1)
        assert tome_state(model).num_protected == 0
        assert shrink.tome_token_counts(model, input_size=CASES[KEY][2]) == [3, 2, 1]
        y = model(x)
        assert torch.isfinite(y).all() and maxdiff(y, ref) > 0
        twin = copy.deepcopy(model)  # the class-attention modules follow the copy's state
        assert torch.equal(twin(x), y)
        shrink.remove_tome(model)
        assert torch.equal(model(x), ref)
        assert all(type(m) is ClassAttn for m in model.modules() if isinstance(m, ClassAttn))
        assert "forward_head" not in model.__dict__ and "forward_intermediates" not in model.__dict__
        small = shrink.export(shrink.dilute(copy.deepcopy(model), [0], lam=0.0))
        y0 = small(x)
        shrink.apply_tome(small, 0)
        assert torch.equal(small(x), y0)
        shrink.apply_tome(small, 1)  # policy "none": the attention-free block 0 passes the tokens on
        assert shrink.tome_token_counts(small, input_size=CASES[KEY][2]) == [4, 3, 2]
        shrink.apply_tome(small, [1, 1, 1], policy="hidden")  # block 0 merges on its MLP input
        assert shrink.tome_token_counts(small, input_size=CASES[KEY][2]) == [3, 2, 1]
        assert torch.isfinite(small(x)).all()
        half = shrink.dilute(copy.deepcopy(model), [1], lam=0.5)  # a diluted talking-heads block merges too
        shrink.apply_tome(half, 1)
        assert shrink.tome_token_counts(half, input_size=CASES[KEY][2]) == [3, 2, 1]
        assert torch.isfinite(half(x)).all()
    model.train()
    shrink.apply_tome(model, 1)
    model(x).sum().backward()
    assert all(p.grad is not None for p in model.blocks_token_only.parameters())


def test_forward_intermediates_unmerge_to_the_full_grid():
    model = timm.create_model("cait_xxs24_224", img_size=32, patch_size=8, depth_token_only=1, embed_dim=32,
                              depth=3, num_heads=2, num_classes=5).eval()
    x = images(KEY)
    with torch.no_grad():
        ref_final, ref = model.forward_intermediates(x)
        shrink.apply_tome(model, 3, trace_source=True)
        final, grid = model.forward_intermediates(x)
        assert [t.shape for t in grid] == [t.shape for t in ref]  # NCHW: the whole 4 x 4 grid
        assert final.shape == (2, 1 + 16 - 9, 32)  # merged tokens after the class token
        assert maxdiff(final, model.forward_features(x)) <= 1e-6
        _, tokens = model.forward_intermediates(x, output_fmt="NLC")
        assert [t.shape[1] for t in tokens] == [13, 10, 7]
        last = model.forward_intermediates(x, indices=[2], output_fmt="NLC", unmerge=True, intermediates_only=True)
        where = tome_state(model).source.argmax(dim=1)  # (B, 16): the token each patch went into
        expect = tokens[-1].gather(1, where.unsqueeze(-1).expand(-1, -1, 32))
        assert len(last) == 1 and torch.equal(last[0], expect)
        fm = timm.create_model("cait_xxs24_224", features_only=True, out_indices=(1, 2), img_size=32, patch_size=8,
                               embed_dim=32, depth=3, num_heads=2).eval()
        plain = fm(x)
        shrink.apply_tome(fm.model, 2)
        assert [t.shape for t in fm(x)] == [t.shape for t in plain]


def test_unsupported_cait_settings_are_refused_in_one_line():
    model = build(KEY)
    model.blocks_token_only[0].attn = torch.nn.Identity()  # no ClassAttn: merged tokens would be unweighted
    with pytest.raises(shrink.ShrinkError, match="class-attention") as e:
        shrink.apply_tome(model, 1)
    assert "\n" not in str(e.value) and "r = 0 works" in str(e.value)
    shrink.apply_tome(model, 0)  # r = 0 needs nothing

    class Custom(TalkingHeadAttn):
        def forward(self, x):
            return super().forward(x)

    model = build(KEY)
    model.blocks[1].attn.__class__ = Custom  # an unknown forward has no kernel
    with pytest.raises(shrink.ShrinkError, match="Custom") as e:
        shrink.apply_tome(model, 1)
    assert "\n" not in str(e.value)


# ---- compile and deployment -----------------------------------------------------------------------

@pytest.mark.slow  # ~35 s on a shared 2-core CPU, mostly the ONNX exporter
def test_merged_cait_exports_to_pt2_and_onnx():
    """The dense model with 'avg' pooling (class attention over merged tokens, the size-weighted
    head): pt2 and ONNX equal eager. (The exported model is tests/blocks/test_blocks.py's MERGING case.)"""
    pytest.importorskip("onnxruntime")
    from shrink import deploy

    model, x = build(KEY), images(KEY)
    model.reset_classifier(5, "avg")
    prep = deploy.prepare_model(model, tome_r=1)
    with torch.no_grad():
        y = prep(x)
    assert shrink.tome_token_counts(prep, input_size=CASES[KEY][2]) == [3, 2, 1]
    ep = deploy.export_program(prep, input_size=tuple(x.shape[1:]), batch_size=2)
    assert maxdiff(ep.module()(x), y) <= 1e-5
    proto = deploy.to_onnx(prep, input_size=tuple(x.shape[1:]), batch_size=2)
    sess = deploy.load_onnx_session(proto.SerializeToString())
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert abs(out - y.numpy()).max() <= 1e-5
