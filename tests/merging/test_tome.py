"""Token merging (ToMe) on timm 1.x ViTs: equivalences, matching properties, schedules, adapter guards."""
from __future__ import annotations

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import timm
import torch
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer

import shrink
from shrink.merging.block import ToMeAttentionFreeBlock, ToMeBlock, ToMeDilutedBlock
from shrink.merging.kernels import attention_kernel, attention_with_metric, register_attention_kernel
from shrink.merging.merge import ramp
from shrink.merging.patch import (
    apply_tome,
    is_tome,
    remove_tome,
    tome_info,
    tome_schedule,
    tome_state,
    tome_token_counts,
)

REPO = Path(__file__).resolve().parents[2]


IMG = 64  # 4x4 = 16 patches per image: fast


def _seed(s: int = 0) -> None:
    torch.manual_seed(s)


def _tiny_vit(**kw) -> VisionTransformer:
    args = dict(img_size=IMG, patch_size=8, embed_dim=64, depth=4, num_heads=4, num_classes=10)
    args.update(kw)
    return VisionTransformer(**args).eval()


def _randomise_layerscale(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("ls1.gamma", "ls2.gamma")):
                p.copy_(torch.rand_like(p) * 0.8 + 0.1)


def _exported_tiny() -> torch.nn.Module:
    m = timm.create_model("deit_tiny_patch16_224", img_size=IMG).eval()
    shrink.dilute(m, [0, 2])
    shrink.set_lambda(m, 0.0)
    return shrink.export(m)


def _variant(name: str) -> torch.nn.Module:
    _seed(0)
    if name == "deit3_small":
        m = timm.create_model("deit3_small_patch16_224", img_size=IMG).eval()
        _randomise_layerscale(m)
        return m
    if name == "qk_norm":
        return _tiny_vit(qk_norm=True)
    if name == "registers_avg":
        return _tiny_vit(reg_tokens=4, global_pool="avg", fc_norm=True)
    if name == "exported":
        return _exported_tiny()
    if name == "diluted_half":
        m = timm.create_model("deit_tiny_patch16_224", img_size=IMG).eval()
        return shrink.dilute(m, [1, 2], lam=0.5)
    return timm.create_model(f"{name}_patch16_224", img_size=IMG).eval()


VARIANTS = ["deit_tiny", "deit_tiny_distilled", "deit3_small", "qk_norm", "registers_avg", "exported", "diluted_half"]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


@pytest.mark.parametrize("name", VARIANTS)
def test_r0_equals_plain_and_remove_restores(name):
    model = _variant(name)
    x = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))
    keys = list(model.state_dict())
    with torch.no_grad():
        ref = model(x)
        apply_tome(model, 0)
        assert is_tome(model)
        assert list(model.state_dict()) == keys  # blocks took over the submodules, keys unchanged
        out0 = model(x)
        assert _max_diff(out0, ref) <= 1e-5
        apply_tome(model, 2, policy="hidden")  # re-applying replaces the settings
        merged = model(x)
        assert _max_diff(merged, ref) > 1e-4  # it really merges (guards against a no-op adapter)
        remove_tome(model)
        assert not is_tome(model)
        assert not any(type(b).__name__.startswith("ToMe") for b in model.blocks)
        assert "pool" not in model.__dict__
        assert torch.equal(model(x), ref)


def test_blocks_that_see_no_merged_tokens_run_the_plain_path():
    model = _variant("deit3_small")
    x = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)
        apply_tome(model, [0, 2, 0] + [0] * 9)
        merging = model(x)
        # block 0 (r=0, nothing merged yet) is plain; block 1 merges; blocks 2.. weigh by size
        assert [b.tome_plain for b in model.blocks[:3]] == [True, False, False]
        model.blocks[0].tome_sized = True  # force the ToMe path: same result
        assert _max_diff(model(x), merging) <= 1e-5
        apply_tome(model, [0, 2, 0] + [0] * 9, prop_attn=False)
        assert [b.tome_plain for b in model.blocks[:3]] == [True, False, True]
        apply_tome(model, 0)
        assert all(b.tome_plain for b in model.blocks)

        def no_metric(*a, **k):
            raise AssertionError("r = 0 must not compute the ToMe attention / metric")

        kernel = attention_kernel(model.blocks[0].attn)
        register_attention_kernel(Attention)(no_metric)  # the public registry: the kernel ToMe would call
        try:
            assert torch.equal(model(x), ref)  # the timm code itself: bit-identical
        finally:
            register_attention_kernel(Attention)(kernel)
        assert attention_kernel(model.blocks[0].attn) is kernel


def test_torch_export_of_a_merging_model():
    model = timm.create_model("deit_tiny_patch16_224", img_size=IMG).eval()
    apply_tome(model, (3, -0.5))
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        ref = model(x)
        ep = torch.export.export(model, (x,))
        state = tome_state(model)
        state.size, state.last_block = None, sys.maxsize  # tracing leaves fake tensors behind
        assert _max_diff(ep.module()(x), ref) <= 1e-5
        assert torch.equal(model(x), ref)


def test_remove_keeps_weight_changes_and_training_mode():
    model = _variant("diluted_half")
    apply_tome(model, 3)
    model.train()
    with torch.no_grad():
        model.blocks[0].attn.qkv.weight.mul_(1.5)
    shrink.set_lambda(model, 0.25)  # the ToMe diluted blocks are still DilutedBlocks
    remove_tome(model)
    assert model.training and all(b.training for b in model.blocks)
    assert isinstance(model.blocks[1], shrink.DilutedBlock) and not isinstance(model.blocks[1], ToMeDilutedBlock)
    assert model.blocks[1].lambda_value == 0.25
    ref = timm.create_model("deit_tiny_patch16_224", img_size=IMG)
    ref.load_state_dict({k: v for k, v in model.state_dict().items() if not k.endswith("lam")})
    assert torch.equal(ref.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_proportional_attention_equals_attention_over_repeated_keys(fused, qk_norm):
    _seed(0)
    attn = Attention(32, num_heads=4, qkv_bias=True, qk_norm=qk_norm, norm_layer=torch.nn.LayerNorm).eval()
    attn.fused_attn = fused
    x = torch.randn(2, 6, 32)
    size = torch.tensor([[1, 3, 1, 2, 4, 1], [2, 1, 1, 1, 5, 3]], dtype=torch.float32).unsqueeze(-1)
    with torch.no_grad():
        out, metric = attention_with_metric(attn, x, size)
        for b in range(2):
            reps = size[b, :, 0].long()
            x_rep = x[b].repeat_interleave(reps, dim=0).unsqueeze(0)  # token j repeated size_j times
            ref = attn(x_rep)[0]
            first = torch.cumsum(reps, 0) - reps  # first copy of every token
            assert _max_diff(out[b], ref[first]) <= 1e-5
    assert metric.shape == (2, 6, 8)  # keys averaged over the 4 heads


@pytest.mark.parametrize("name", ["deit_tiny_distilled", "registers_avg"])
def test_sizes_sum_to_token_count_after_every_block_and_prefix_is_kept(name):
    model = _variant(name)
    apply_tome(model, 3, trace_source=True)
    state = tome_state(model)
    n0 = model.patch_embed.num_patches + model.num_prefix_tokens
    seen = []

    def check(_m, _i, out):
        size = state.size if state.size is not None else torch.ones(out.shape[0], out.shape[1], 1)
        assert size.shape[:2] == out.shape[:2]
        assert torch.all(size.sum(dim=1) == n0)
        seen.append(out.shape[1])

    for b in model.blocks:
        b.register_forward_hook(check)
    with torch.no_grad():
        model(torch.randn(2, 3, IMG, IMG))
    assert seen[-1] < n0 and len(seen) == len(model.blocks)
    p = model.num_prefix_tokens
    assert torch.equal(state.source[:, :p, :p], torch.eye(p).expand(2, -1, -1))
    assert float(state.source[:, p:, :p].abs().sum()) == 0.0  # no other token contains a prefix token
    assert torch.equal(state.source.sum(dim=-1, keepdim=True), state.size)


@pytest.mark.parametrize("name", ["deit_tiny", "deit3_small", "qk_norm", "diluted_half"])
def test_fused_and_unfused_attention_agree(name):
    model = _variant(name)
    apply_tome(model, 3, start_idx=1)
    x = torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        fused = model(x)
        for b in model.blocks:
            if hasattr(b, "attn"):
                b.attn.fused_attn = False
        plain = model(x)
    assert tome_token_counts(model)[-1] < model.patch_embed.num_patches + 1
    assert _max_diff(fused, plain) <= 1e-5


def test_avg_pool_is_weighted_by_size():
    model = _variant("registers_avg")
    apply_tome(model, 4)
    with torch.no_grad():
        feats = model.forward_features(torch.randn(2, 3, IMG, IMG))
        size = tome_state(model).size
        p = model.num_prefix_tokens
        pooled = model.pool(feats)
        for b in range(2):
            expanded = feats[b, p:].repeat_interleave(size[b, p:, 0].long(), dim=0)
            assert expanded.shape[0] == model.patch_embed.num_patches
            torch.testing.assert_close(pooled[b], expanded.mean(dim=0))
        assert _max_diff(pooled, feats[:, p:].mean(dim=1)) > 1e-6  # differs from the unweighted mean


@pytest.mark.parametrize("policy", ["none", "hidden"])
def test_diluted_at_lambda0_matches_exported_under_tome(policy):
    _seed(0)
    dil = timm.create_model("deit_tiny_patch16_224", img_size=IMG).eval()
    shrink.dilute(dil, [0, 2], lam=0.0)
    exp = shrink.export(dil)
    apply_tome(dil, 2, start_idx=1, policy=policy)
    apply_tome(exp, 2, start_idx=1, policy=policy)
    assert isinstance(dil.blocks[0], ToMeDilutedBlock) and isinstance(exp.blocks[0], ToMeAttentionFreeBlock)
    assert tome_info(dil)["schedule"] == tome_info(exp)["schedule"]
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        assert _max_diff(dil(x), exp(x)) <= 1e-5
    assert tome_token_counts(dil) == tome_token_counts(exp)


def test_diluted_at_lambda1_matches_plain_blocks_under_tome():
    _seed(0)
    plain = timm.create_model("deit_tiny_patch16_224", img_size=IMG).eval()
    dil = shrink.dilute(timm.create_model("deit_tiny_patch16_224", img_size=IMG).eval(), [1, 3], lam=1.0)
    dil.load_state_dict(plain.state_dict(), strict=False)
    apply_tome(plain, 3)
    apply_tome(dil, 3)
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        assert _max_diff(plain(x), dil(x)) <= 1e-6


def test_attention_free_policy_hidden_merges_and_none_does_not():
    model = _exported_tiny()  # blocks 0 and 2 attention-free; attention blocks 1, 3, 4, ...
    apply_tome(model, 2, start_idx=0, policy="none")
    none = tome_token_counts(model)
    apply_tome(model, 2, start_idx=0, policy="hidden")
    hidden = tome_token_counts(model)
    assert isinstance(model.blocks[0], ToMeAttentionFreeBlock) and isinstance(model.blocks[1], ToMeBlock)
    # start_idx=0 starts at block 1 (the first block with attention): block 0 never merges
    assert none[:4] == [17, 15, 15, 13] and hidden[:4] == [17, 15, 13, 11]


def test_deit_base_reference_token_counts():
    # DeiT-B at 224: 1 class token + 14 * 14 = 196 patches = 197 tokens. Blocks [0, 1, 3, 4, 6] are
    # attention-free (policy "none": they pass tokens through), so the attention blocks are
    # 2, 5, 7, 8, 9, 10, 11. start_idx=1 counts attention blocks: merging starts at the second one,
    # block 5. Each merging block removes min(24, unprotected // 2) tokens:
    #   blocks 0-4: 197 (no merge)       block 5: 196 // 2 = 98 >= 24  -> 173
    #   block 6: attention-free -> 173   block 7: 172 // 2 = 86 >= 24  -> 149
    #   block 8: 148 // 2 = 74 -> 125    block 9: 124 // 2 = 62 -> 101
    #   block 10: 100 // 2 = 50 -> 77    block 11: 76 // 2 = 38 -> 53
    expected = [197, 197, 197, 197, 197, 173, 173, 149, 125, 101, 77, 53]
    _seed(0)
    model = timm.create_model("deit_base_patch16_224").eval()
    shrink.dilute(model, [0, 1, 3, 4, 6], lam=0.0)
    shrink.export(model, inplace=True)
    apply_tome(model, 24, start_idx=1)
    assert tome_info(model)["schedule"] == [0, 0, 0, 0, 0, 24, 0, 24, 24, 24, 24, 24]
    assert tome_token_counts(model, batch=1) == expected


def test_state_resets_without_block0_and_survives_deepcopy():
    _seed(0)
    model = timm.create_model("deit_tiny_patch16_224", img_size=IMG).eval()
    shrink.dilute(model, [0], lam=0.0)
    apply_tome(model, 2)
    shrink.export(model, inplace=True)  # block 0 becomes a plain AttentionFreeBlock, the others stay ToMe
    assert not isinstance(model.blocks[0], ToMeAttentionFreeBlock) and isinstance(model.blocks[1], ToMeBlock)
    x = torch.randn(1, 3, IMG, IMG)
    with torch.no_grad():
        first, second = model(x), model(x)  # a stale state would break the second forward
        assert torch.equal(first, second)
        twin = copy.deepcopy(model)
        assert tome_state(twin) is not tome_state(model) and tome_state(twin).model is twin
        assert torch.equal(twin(x), first)
    assert tome_token_counts(model) == [17, 15, 13, 11, 9, 7, 5, 3, 2, 2, 2, 2]


def test_schedule_forms():
    kinds = ["attn", "free", "attn", "attn", "free", "attn"]
    assert tome_schedule(kinds, 5) == [5, 0, 5, 5, 0, 5]
    assert tome_schedule(kinds, 5, start_idx=1) == [0, 0, 5, 5, 0, 5]
    assert tome_schedule(kinds, 5, start_idx=1, policy="hidden") == [0, 0, 5, 5, 5, 5]
    assert tome_schedule(kinds, (4, -1.0)) == [8, 0, 5, 2, 0, 0]
    assert tome_schedule(kinds, (4, 0.0)) == [4, 0, 4, 4, 0, 4]
    assert tome_schedule(kinds, [1, 0, 2, 3, 0, 4]) == [1, 0, 2, 3, 0, 4]
    assert ramp(10, 0.5, 3) == [5, 10, 15]
    for bad in [dict(r=-1), dict(r=[1, 2]), dict(r=(4, 2.0)), dict(r=1.5), dict(r=3, start_idx=4),
                dict(r=3, policy="mlp"), dict(r=[0, 1, 0, 0, 0, 0]), dict(r=[0] * 6, start_idx=1)]:
        with pytest.raises(shrink.ShrinkError):
            tome_schedule(kinds, **bad)


@pytest.mark.parametrize("make", [
    lambda: timm.create_model("mixer_s16_224", img_size=IMG, num_classes=10),
    lambda: timm.create_model("resnet18", num_classes=10),
    lambda: _tiny_vit(global_pool="prr"),  # a MAP head ("map") merges: tests/blocks/test_blocks.py
])
def test_apply_on_unsupported_models_raises(make):
    model = make()
    with pytest.raises(shrink.ShrinkError) as e:
        apply_tome(model, 4)
    assert "\n" not in str(e.value)
    assert not is_tome(model)


def test_fully_attention_free_model_needs_policy_hidden():
    model = _tiny_vit(depth=2)
    shrink.dilute(model, [0, 1], lam=0.0)
    shrink.export(model, inplace=True)
    with pytest.raises(shrink.ShrinkError):
        apply_tome(model, 2)
    apply_tome(model, 2, policy="hidden")
    assert tome_token_counts(model) == [1 + 64 - 2, 1 + 64 - 4]


def test_gradient_checkpointing_is_refused_and_training_works_without_it():
    model = _tiny_vit()
    apply_tome(model, 3)
    model.train()
    x = torch.randn(2, 3, IMG, IMG)
    model(x).sum().backward()  # merging is differentiable for the tokens
    assert model.blocks[0].attn.qkv.weight.grad is not None
    model.set_grad_checkpointing(True)
    with pytest.raises(shrink.ShrinkError, match="gradient checkpointing"):
        model(x)
    with torch.no_grad():
        model(x)  # no recomputation without gradients: allowed
    apply_tome(model, 0)  # nothing merges: checkpointing is fine
    model(x).sum().backward()


def test_forward_intermediates_nlc_merged_nchw_unmerged_to_the_full_grid():
    model = _tiny_vit()
    x = torch.randn(1, 3, IMG, IMG)
    with torch.no_grad():
        apply_tome(model, 0)  # r = 0: exactly timm's
        ref_final, ref = model.forward_intermediates(x)
        remove_tome(model)
        plain_final, plain = model.forward_intermediates(x)
        assert torch.equal(ref_final, plain_final) and all(torch.equal(a, b) for a, b in zip(ref, plain, strict=True))
        apply_tome(model, 3)
        final, inter = model.forward_intermediates(x, output_fmt="NLC")
        assert [t.shape[1] for t in inter] == [61, 58, 55, 52]  # 64 patches - 3 per block, class token split off
        _, full = model.forward_intermediates(x, output_fmt="NLC", unmerge=True)
        assert [t.shape[1] for t in full] == [64] * 4
        final2, grid = model.forward_intermediates(x)  # NCHW: always the whole grid
        assert torch.equal(final, final2) and [t.shape for t in grid] == [(1, 64, 8, 8)] * 4
        # every patch holds the value of the token it went into: the unmerged grid has as many
        # distinct columns as the merged sequence has tokens, and they are those tokens
        for merged, g in zip(inter, grid, strict=True):
            cols = g.flatten(2).transpose(1, 2)[0]
            assert torch.equal(torch.unique(cols, dim=0), torch.unique(merged[0], dim=0))
        feats = model.forward_intermediates(x, indices=[1], intermediates_only=True, return_prefix_tokens=True)
        assert feats[0][0].shape == (1, 64, 8, 8) and feats[0][1].shape == (1, 1, 64)


def test_unmerging_a_merge_of_identical_tokens_is_exact():
    """All patch tokens equal (constant patch embedding, no position table): merged or not, every
    patch of every intermediate is the same vector, so the unmerged grid equals the plain model's."""
    model = _tiny_vit()
    with torch.no_grad():
        model.patch_embed.proj.weight.zero_()
        model.patch_embed.proj.bias.normal_()
        model.pos_embed.zero_()
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        _, plain = model.forward_intermediates(x)
        apply_tome(model, 8)
        _, grid = model.forward_intermediates(x)
    assert max((a - b).abs().max().item() for a, b in zip(grid, plain, strict=True)) <= 1e-5


def test_bad_reapply_keeps_the_previous_settings():
    model = _tiny_vit()
    apply_tome(model, 3)
    with pytest.raises(shrink.ShrinkError):
        apply_tome(model, 3, start_idx=10)
    assert is_tome(model) and tome_info(model)["schedule"] == [3, 3, 3, 3]
    assert tome_token_counts(model) == [62, 59, 56, 53]


def test_only_padding_masks_are_taken_and_remove_without_apply_raises():
    model = _tiny_vit()
    with pytest.raises(shrink.ShrinkError):
        remove_tome(model)
    apply_tome(model, 1)
    x = torch.randn(1, 17, 64)
    with torch.no_grad():
        plain = model.blocks[0](x)
        assert torch.equal(model.blocks[0](x, attn_mask=torch.zeros(17, 17)), plain)  # pads nothing
        with pytest.raises(shrink.ShrinkError, match="padding masks only"):  # a bias is not a padding mask
            model.blocks[0](x, attn_mask=torch.randn(17, 17))
        with pytest.raises(shrink.ShrinkError, match="is_causal"):
            model.blocks[0](x, is_causal=True)
    assert isinstance(model.blocks[0], Block)  # ToMe blocks remain timm Blocks for isinstance checks


def test_official_comparison_script_needs_the_official_code(tmp_path, capsys):
    """scripts/tome_vs_official.py never ships the official code: without it, one line and exit 2."""
    spec = importlib.util.spec_from_file_location("tome_vs_official", REPO / "scripts" / "tome_vs_official.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for argv in (["--official-path", str(tmp_path), "logits"], ["speed"]):
        assert mod.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ")


def test_features_only_models_give_full_maps_under_tome():
    fm = timm.create_model("vit_tiny_patch16_224", features_only=True, img_size=32, patch_size=8, embed_dim=32,
                           depth=3, num_heads=2, out_indices=(1, 2)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = fm(x)
        apply_tome(fm.model, 0)
        assert all(torch.equal(a, b) for a, b in zip(fm(x), ref, strict=True))
        apply_tome(fm.model, 2)
        assert [t.shape for t in fm(x)] == [t.shape for t in ref]  # the full 4x4 grid after merging
