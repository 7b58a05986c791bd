"""models/fnet.py: FNet for images: registration, the Keras configuration's size, the Fourier mixing, timm's API.

timm's own model tests are in test_timm_contract.py; FNet has no original checkpoint format to map.
"""
import math

import pytest
import timm
import torch

from shrink.models import fnet

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
    "fnet_keras_cifar100": ((3, 64, 64), CIFAR100_MEAN_STD, 100),
    "fnet_base_patch16_224": ((3, 224, 224), IMAGENET_MEAN_STD, 1000),
    "fnet_nano": ((3, 16, 16), CIFAR100_MEAN_STD, 10),
}


def test_registered_models_are_the_expected_ones():
    assert registered("fnet") == set(EXPECTED_CFG)


@pytest.mark.parametrize("name", sorted(EXPECTED_CFG))
def test_pretrained_cfg_input_size_mean_std(name):
    assert_pretrained_cfg(name, *EXPECTED_CFG[name])


def test_pretrained_true_fails_clearly_without_network():
    assert_no_pretrained_weights("fnet_nano")


def test_keras_configuration_count():
    count = n_params(on_meta("fnet_keras_cifar100"))
    d, tokens = 256, (64 // 8) ** 2
    expected = linear(8 * 8 * 3, d) + tokens * d + 4 * (2 * linear(d, d) + 4 * d) + linear(d, 100)
    assert count == expected == 621_924
    assert round(count / 1e4) / 100 == 0.62


def test_fourier_mix_is_real_part_of_dft_over_tokens_and_channels():
    x = torch.randn(2, 6, 5, dtype=torch.float64)
    n, d = torch.arange(6.0, dtype=torch.float64), torch.arange(5.0, dtype=torch.float64)
    fn = torch.exp(-2j * math.pi * torch.outer(n, n) / 6)
    fd = torch.exp(-2j * math.pi * torch.outer(d, d) / 5)
    expected = (fn @ x.to(torch.complex128) @ fd).real
    assert (fnet.FourierMix()(x) - expected).abs().max() <= 1e-9


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_fourier_mix_keeps_the_dtype_and_runs_narrow_types_in_fp32(dtype):
    x = torch.randn(2, 6, 5).to(dtype)
    out = fnet.FourierMix()(x)
    assert out.dtype == dtype
    wide = torch.promote_types(dtype, torch.float32)
    assert torch.equal(out, torch.fft.fft2(x.to(wide), dim=(-2, -1)).real.to(dtype))


def test_feature_api_on_nano():
    check_feature_api("fnet_nano", levels=3, tokens=True)


def test_heads_average_the_tokens_or_keep_them():
    model = timm.create_model("fnet_nano", num_classes=0).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        tokens = model.forward_features(x)
        assert tokens.shape == (2, 16, 32)
        assert torch.equal(model(x), tokens.mean(dim=1))
        model.reset_classifier(0, "")
        assert torch.equal(model(x), tokens)


def test_torchscript_and_fx():
    check_script_and_trace("fnet_nano")


def test_nano_forward_and_training_step(record_property):
    check_nano_training("fnet_nano", record_property)


def test_small_default_model_forward_and_train():
    check_default_forward_and_train("fnet_keras_cifar100")


@pytest.mark.slow
def test_base_model_forward_and_train():
    check_default_forward_and_train("fnet_base_patch16_224")


def test_removal_is_a_one_line_error():
    assert_removal_is_one_line_error("fnet_nano")


def test_save_load_round_trip(tmp_path):
    assert_save_load_round_trip("fnet_nano", tmp_path)


def test_training_config():
    check_mlp_config(ROOT / "configs" / "mlp" / "fnet.yaml")
