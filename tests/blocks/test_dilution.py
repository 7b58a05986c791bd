"""Dilution and export: exact equivalences, removed parameters, no attention work at lambda = 0."""
from __future__ import annotations

import copy
import math

import pytest
import timm
import torch

import shrink
from shrink.blocks.attention_free import removed_parameter_count
from shrink.blocks.dilution import lambda_at, lambda_cosine, lambda_linear, lambda_reference

from ..conftest import IMG, ROOT, accelerate, image_folder, make_vit, metrics, run, subprocess_env  # noqa: F401

LAYERS = [0, 2, 4]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@torch.no_grad()
def test_lambda_one_equals_timm(vit, images):
    ref = vit(images)
    shrink.dilute(vit, LAYERS)
    assert all(isinstance(vit.blocks[i], shrink.DilutedBlock) for i in LAYERS)
    assert max_diff(vit(images), ref) <= 1e-5


@torch.no_grad()
def test_lambda_zero_equals_export_and_params(vit, images):
    dense_params = sum(p.numel() for p in vit.parameters())
    removed = removed_parameter_count(vit, LAYERS)
    shrink.dilute(vit, LAYERS)
    shrink.set_lambda(vit, 0.0)
    ref = vit(images)
    small = shrink.export(vit)
    assert max_diff(small(images), ref) <= 1e-5
    assert sum(p.numel() for p in small.parameters()) == dense_params - removed
    keys = small.state_dict().keys()
    for i in LAYERS:
        assert not any(k.startswith((f"blocks.{i}.attn.", f"blocks.{i}.norm1.", f"blocks.{i}.ls1.")) for k in keys)
        assert f"blocks.{i}.mlp.fc1.weight" in keys
    # export leaves the original untouched
    assert isinstance(vit.blocks[0], shrink.DilutedBlock)


@torch.no_grad()
def test_intermediate_lambda_formula(images):
    m = make_vit("deit3_small")
    blk = copy.deepcopy(m.blocks[1])
    x = m._pos_embed(m.patch_embed(images))
    shrink.dilute(m, [1], lam=0.3)
    lam = 0.3
    want = (2 - lam) * x + lam * blk.ls1(blk.attn(blk.norm1(x)))
    want = want + blk.ls2(blk.mlp(blk.norm2(want)))
    assert max_diff(m.blocks[1](x), want) <= 1e-5


def test_no_attention_work_at_lambda_zero(images):
    m = make_vit("deit_tiny")
    calls = {i: 0 for i in range(len(m.blocks))}
    for i, b in enumerate(m.blocks):
        b.attn.register_forward_hook(lambda mod, inp, out, i=i: calls.__setitem__(i, calls[i] + 1))
    shrink.dilute(m, LAYERS, lam=0.0)
    with torch.no_grad():
        m(images)
    assert all(calls[i] == 0 for i in LAYERS)
    assert all(calls[i] == 1 for i in range(len(m.blocks)) if i not in LAYERS)
    shrink.set_lambda(m, 0.5)
    with torch.no_grad():
        m(images)
    assert all(calls[i] == 1 for i in LAYERS)


def test_lambda_is_module_state_and_saved(images):
    m = make_vit("deit_tiny")
    shrink.dilute(m, LAYERS)
    shrink.set_lambda(m, 0.25)
    sd = m.state_dict()
    assert all(float(sd[f"blocks.{i}.lam"]) == 0.25 for i in LAYERS)
    m2 = make_vit("deit_tiny")
    shrink.dilute(m2, LAYERS)
    m2.load_state_dict(sd)
    assert shrink.get_lambda(m2) == 0.25
    sd0 = {k: (torch.tensor(0.0) if k.endswith(".lam") else v) for k, v in sd.items()}
    m2.load_state_dict(sd0)  # loading lambda = 0 switches the attention off
    assert not m2.blocks[0].attn_active
    with torch.no_grad():
        shrink.set_lambda(m, 0.0)
        assert max_diff(m(images), m2(images)) == 0.0


@torch.no_grad()
def test_deploy_mode_restores_lambda(images):
    m = make_vit("deit_tiny")
    shrink.dilute(m, LAYERS, lam=0.7)
    with shrink.deploy_mode(m):
        assert shrink.get_lambda(m) == 0.0
        y_deploy = m(images)
    assert shrink.get_lambda(m) == pytest.approx(0.7)
    assert max_diff(y_deploy, shrink.export(m)(images)) <= 1e-5


def test_grad_checkpointing_gives_same_gradients(images):
    m1 = make_vit("deit_tiny").train()
    shrink.dilute(m1, LAYERS, lam=0.5)
    m2 = copy.deepcopy(m1)
    m2.set_grad_checkpointing(True)
    m1(images).sum().backward()
    m2(images).sum().backward()
    for (n, p1), (_, p2) in zip(m1.named_parameters(), m2.named_parameters(), strict=True):
        assert (p1.grad is None) == (p2.grad is None), n
        if p1.grad is not None:
            assert max_diff(p1.grad, p2.grad) <= 1e-5, n


def test_torch_compile_matches_eager(images):
    pytest.importorskip("torch._dynamo")
    m = make_vit("deit_tiny")
    shrink.dilute(m, LAYERS, lam=0.5)
    compiled = torch.compile(m, backend="aot_eager")
    with torch.no_grad():
        assert max_diff(compiled(images), m(images)) <= 1e-5
        shrink.set_lambda(m, 0.0)
        assert max_diff(compiled(images), m(images)) <= 1e-5


@pytest.mark.parametrize("layers, match", [([12], "out of range"), ([-1], "out of range"), ([1, 1], "more than once"),
                                           (["a"], "not an integer"), ([1.5], "not an integer")])
def test_bad_layers(layers, match):
    m = make_vit("deit_tiny")
    with pytest.raises(shrink.ShrinkError, match=match) as e:
        shrink.dilute(m, layers)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan"), "x"])
def test_bad_lambda(value):
    m = make_vit("deit_tiny")
    shrink.dilute(m, [0])
    with pytest.raises(shrink.ShrinkError, match="lambda"):
        shrink.set_lambda(m, value)


def test_not_a_vit():
    m = timm.create_model("resnet18", num_classes=10)
    with pytest.raises(shrink.ShrinkError, match="not a ViT"):
        shrink.dilute(m, [0])
    mixer = timm.create_model("mixer_s16_224", img_size=IMG, num_classes=10)
    with pytest.raises(shrink.ShrinkError, match="has no attention sublayer shrink can remove"):
        shrink.dilute(mixer, [0])


def test_set_lambda_without_diluted_blocks():
    with pytest.raises(shrink.ShrinkError, match="no diluted blocks"):
        shrink.set_lambda(make_vit("deit_tiny"), 0.5)


def test_schedules():
    # the reference: max(0, 1 - e/299) within 400 epochs -> the last 101 epochs at lambda = 0
    values = [lambda_reference(e, 299) for e in range(400)]
    assert values[0] == 1.0 and values[298] > 0 and values[299] == 0.0
    assert sum(v == 0.0 for v in values) == 101
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
    assert lambda_linear(0, 0, 10, 2) == 1.0
    assert lambda_linear(1, 0, 10, 2) == pytest.approx(0.5)
    assert lambda_linear(5, 3, 10, 2) == 0.0
    assert lambda_cosine(1, 0, 10, 2) == pytest.approx(0.5)
    assert lambda_cosine(0, 5, 10, 2) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    assert lambda_at("reference", 10, dilution_epochs=20) == pytest.approx(0.5)
    with pytest.raises(shrink.ShrinkError):
        lambda_at("nope", 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_bf16_autocast_on_gpu(vit, images):
    vit = vit.cuda()
    x = images.cuda()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        ref = vit(x).float()
        shrink.dilute(vit, LAYERS)
        d1 = (vit(x).float() - ref).abs().max().item()
        shrink.set_lambda(vit, 0.0)
        y0 = vit(x).float()
        d0 = (shrink.export(vit)(x).float() - y0).abs().max().item()
    print(f"bf16 max diff: lambda=1 vs timm {d1:.3g}, lambda=0 vs export {d0:.3g}")
    assert d1 == 0.0 and d0 == 0.0


def test_reference_schedule_keeps_a_fractional_length():
    assert [lambda_reference(e, 2.5) for e in range(4)] == pytest.approx([1.0, 0.6, 0.2, 0.0])
    assert [shrink.lambda_at("reference", e, dilution_epochs=2.5) for e in range(4)] == pytest.approx(
        [1.0, 0.6, 0.2, 0.0])


def test_a_registered_schedule_is_used_by_lambda_at_and_listed():
    from shrink.blocks.dilution import SCHEDULES, register_schedule, unregister_schedule

    @register_schedule("half_then_zero")
    def half_then_zero(epoch, step, steps_per_epoch, dilution_epochs):
        return 0.5 if epoch < dilution_epochs else 0.0

    try:
        assert "half_then_zero" in SCHEDULES  # argparse choices see it
        assert lambda_at("half_then_zero", 0, dilution_epochs=2) == 0.5
        assert lambda_at("half_then_zero", 2, dilution_epochs=2) == 0.0
    finally:
        unregister_schedule("half_then_zero")
    assert "half_then_zero" not in SCHEDULES
    assert tuple(SCHEDULES) == ("reference", "linear", "cosine", "constant")


def test_an_unknown_schedule_is_one_line():
    with pytest.raises(shrink.ShrinkError) as e:
        lambda_at("cosin", 0)
    assert str(e.value) == ("unknown lambda schedule 'cosin'; choose one of reference, linear, cosine, constant")
