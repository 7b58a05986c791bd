"""models/ms_mlp.py: MS-MLP: registration, published sizes, the shift-mix, timm's hierarchical-model API.

Its original (Swin-style) checkpoints are in test_checkpoint_formats.py; timm's own model tests in
test_timm_contract.py.
"""
import copy
import math

import pytest
import timm
import torch

from shrink.models import ms_mlp

from ..conftest import (
    CIFAR100_MEAN_STD,
    IMAGENET_MEAN_STD,
    ROOT,
    assert_no_pretrained_weights,
    assert_pretrained_cfg,
    assert_removal_is_one_line_error,
    assert_save_load_round_trip,
    check_default_forward_and_train,
    check_feature_api,
    check_mlp_config,
    check_nano_training,
    check_script_and_trace,
    linear,
    n_params,
    on_meta,
    registered,
)

EXPECTED_CFG = {  # name -> (input size, (mean, std), classes)
    "msmlp_tiny_patch4_shift5_224": ((3, 224, 224), IMAGENET_MEAN_STD, 1000),
    "msmlp_small_patch4_shift5_224": ((3, 224, 224), IMAGENET_MEAN_STD, 1000),
    "msmlp_base_patch4_shift5_224": ((3, 224, 224), IMAGENET_MEAN_STD, 1000),
    "msmlp_nano": ((3, 32, 32), CIFAR100_MEAN_STD, 10),
}


def test_registered_models_are_the_expected_ones():
    assert registered("ms_mlp") == set(EXPECTED_CFG)


@pytest.mark.parametrize("name", sorted(EXPECTED_CFG))
def test_pretrained_cfg_input_size_mean_std(name):
    assert_pretrained_cfg(name, *EXPECTED_CFG[name])


@pytest.mark.parametrize("name, pool", [("msmlp_tiny_patch4_shift5_224", (7, 7)), ("msmlp_nano", (2, 2))])
def test_cfg_pool_size_is_the_final_map_and_the_size_is_not_fixed(name, pool):
    model = timm.create_model(name).eval()
    cfg = model.pretrained_cfg
    assert cfg["pool_size"] == pool and not cfg["fixed_input_size"] and cfg["first_conv"] == "stem.proj"
    with torch.no_grad():
        assert model.forward_features(torch.randn(1, *cfg["input_size"])).shape[-2:] == pool


def test_pretrained_true_fails_clearly_without_network():
    assert_no_pretrained_weights("msmlp_tiny_patch4_shift5_224")


def msmlp_count(width: int, depths: tuple[int, ...], classes: int = 1000) -> int:
    mix = ((1, 1, 3, 5, 7), (1, 3, 3, 5, 7), (1, 5, 5, 5, 7), (1, 7, 7, 7, 7))
    total = 3 * 16 * width + width + 2 * width  # 4x4 conv stem + LayerNorm
    for i, depth in enumerate(depths):
        d = width * 2 ** i
        size = math.ceil(d / 5)
        chunks = [size] * 4 + [d - 4 * size]  # torch.chunk into 5 groups
        convs = 2 * sum(c * k * k + c for c, k in zip(chunks, mix[i], strict=True))  # two directions
        block = convs + 2 * d + linear(d, 4 * d) + linear(4 * d, d) + d  # + LayerNorm, MLP, LayerScale
        total += depth * block
        if i < len(depths) - 1:
            total += 4 * d * 2 * d + 2 * d + 2 * 2 * d  # 2x2 conv to 2d + LayerNorm
    f = width * 2 ** (len(depths) - 1)
    return total + 2 * f + linear(f, classes)


@pytest.mark.parametrize("name, width, depths, published_m", [
    ("msmlp_tiny_patch4_shift5_224", 96, (3, 3, 9, 3), 28),
    ("msmlp_small_patch4_shift5_224", 96, (3, 3, 27, 3), 50),
    ("msmlp_base_patch4_shift5_224", 128, (3, 3, 27, 3), 88),
])
def test_matches_published_counts(name, width, depths, published_m):
    count = n_params(on_meta(name))
    assert count == msmlp_count(width, depths)
    assert math.floor(count / 1e6) == published_m  # the README truncates (Base is 88.7M)
    if name.startswith("msmlp_tiny"):
        assert round(count / 1e5) / 10 == 28.7  # REFERENCE.md


def test_shift_mix_rolls_each_group_by_its_distance():
    mix = ms_mlp.ShiftMix(10, shift_dist=(-2, -1, 0, 1, 2), mix_size=(1, 1, 3, 5, 7))
    with torch.no_grad():  # every depthwise conv becomes the identity
        for conv in [*mix.conv_w, *mix.conv_h]:
            conv.weight.zero_()
            conv.weight[:, :, conv.kernel_size[0] // 2, conv.kernel_size[1] // 2] = 1.0
            conv.bias.zero_()
    x = torch.randn(1, 10, 6, 6)
    out = mix(x)
    for g, s in enumerate((-2, -1, 0, 1, 2)):
        xg = x[:, 2 * g: 2 * g + 2]
        expected = torch.roll(xg, s, dims=3) + torch.roll(xg, s, dims=2)
        assert (out[:, 2 * g: 2 * g + 2] - expected).abs().max() <= 1e-6


def test_chunk_sizes_are_torch_chunks():
    for dim in (10, 96, 192, 384, 768, 13):
        x = torch.zeros(dim)
        assert ms_mlp.chunk_sizes(dim, 5) == [c.numel() for c in torch.chunk(x, 5)]


def test_rejects_widths_torch_chunk_cannot_split():
    with pytest.raises(ValueError, match="do not split"):
        timm.create_model("msmlp_nano", embed_dim=8)  # 8 channels chunk into 4 groups of 2, not 5


def test_img_size_override_updates_cfg_and_runs():
    model = timm.create_model("msmlp_nano", img_size=64)
    assert model.pretrained_cfg["input_size"] == (3, 64, 64) and model.pretrained_cfg["pool_size"] == (4, 4)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)


def test_feature_api_on_nano():
    check_feature_api("msmlp_nano", levels=3, tokens=False)


def test_stages_are_tapped_before_downsampling_and_pruning_ends_there():
    torch.manual_seed(0)
    model = timm.create_model("msmlp_nano").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        _, maps = model.forward_intermediates(x)
        assert [tuple(m.shape[1:]) for m in maps] == [(10, 8, 8), (20, 4, 4), (40, 2, 2)]
        final, early = model.forward_intermediates(x, indices=[1], stop_early=True)
        assert torch.equal(final, maps[1]) and torch.equal(early[0], maps[1])  # no downsampling after the tap
        pruned = copy.deepcopy(model)
        pruned.prune_intermediate_layers([1])
        assert pruned.num_features == pruned.head_hidden_size == 20
        assert torch.equal(pruned.forward_features(x), maps[1])
        pruned.reset_classifier(5, "avg")  # a new head on the kept width
        assert pruned(x).shape == (2, 5)


def test_heads_pool_then_norm_or_norm_each_position():
    model = timm.create_model("msmlp_nano", num_classes=0).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fmap = model.forward_features(x)
        assert torch.equal(model(x), model.norm(fmap.mean(dim=(2, 3))))  # as the original: pool, then norm
        model.reset_classifier(0, "")
        out = model(x)
        assert out.shape == fmap.shape
        torch.testing.assert_close(out[:, :, 0, 0], model.norm(fmap[:, :, 0, 0]))


def test_any_input_size_runs():
    model = timm.create_model("msmlp_nano").eval()
    with torch.no_grad():
        for size in (32, 48, 40):
            assert model(torch.randn(1, 3, size, size)).shape == (1, 10)


def test_torchscript_and_fx():
    check_script_and_trace("msmlp_nano")


def test_nano_forward_and_training_step(record_property):
    check_nano_training("msmlp_nano", record_property)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["msmlp_tiny_patch4_shift5_224", "msmlp_small_patch4_shift5_224",
                                  "msmlp_base_patch4_shift5_224"])
def test_default_models_forward_and_train(name):
    check_default_forward_and_train(name)


def test_removal_is_a_one_line_error():
    assert_removal_is_one_line_error("msmlp_nano")


def test_save_load_round_trip(tmp_path):
    assert_save_load_round_trip("msmlp_nano", tmp_path)


def test_training_config():
    check_mlp_config(ROOT / "configs" / "mlp" / "ms_mlp.yaml")
