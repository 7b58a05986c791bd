"""models/bottleneck_mlp.py: BottleneckMLP (Scaling MLPs): registration, published sizes, training, timm's API.

Checkpoints of the original repository (and ``shrink.get_bottleneck_mlp`` with one) are in
test_checkpoint_formats.py; timm's own model tests in test_timm_contract.py.
"""
import math

import pytest
import timm
import torch

from shrink.models import bottleneck_mlp

from ..conftest import (
    IMAGENET_MEAN_STD,
    ROOT,
    assert_no_pretrained_weights,
    assert_pretrained_cfg,
    assert_removal_is_one_line_error,
    assert_save_load_round_trip,
    bottleneck_count,
    check_default_forward_and_train,
    check_mlp_config,
    check_nano_training,
    check_script_and_trace,
    n_params,
    on_meta,
    registered,
)

# name -> (input size, classes): Scaling MLPs' 64-px ImageNet-21k models (ImageNet mean / std), and the nano.
EXPECTED_CFG = {
    "bottleneck_mlp_b6_wi512": ((3, 64, 64), 11230),
    "bottleneck_mlp_b12_wi512": ((3, 64, 64), 11230),
    "bottleneck_mlp_b6_wi1024": ((3, 64, 64), 11230),
    "bottleneck_mlp_b12_wi1024": ((3, 64, 64), 11230),
    "bottleneck_mlp_nano": ((3, 16, 16), 10),
}


def test_registered_models_are_the_expected_ones():
    assert registered("bottleneck_mlp") == set(EXPECTED_CFG)


@pytest.mark.parametrize("name", sorted(EXPECTED_CFG))
def test_pretrained_cfg_input_size_mean_std(name):
    size, classes = EXPECTED_CFG[name]
    assert_pretrained_cfg(name, size, IMAGENET_MEAN_STD, classes)


def test_pretrained_true_fails_clearly_without_network():
    assert_no_pretrained_weights("bottleneck_mlp_nano")


@pytest.mark.parametrize("name, blocks, width, published_m", [
    ("bottleneck_mlp_b6_wi512", 6, 512, 24), ("bottleneck_mlp_b12_wi512", 12, 512, 37),
    ("bottleneck_mlp_b6_wi1024", 6, 1024, 74), ("bottleneck_mlp_b12_wi1024", 12, 1024, 124),
])
def test_matches_published_counts(name, blocks, width, published_m):
    count = n_params(on_meta(name))
    assert count == bottleneck_count(blocks, width)
    assert math.floor(count / 1e6) == published_m  # the README truncates to whole millions
    if name == "bottleneck_mlp_b12_wi1024":
        assert round(count / 1e5) / 10 == 124.8  # REFERENCE.md
        assert count == 124_843_998


def test_parse_architecture():
    assert bottleneck_mlp.parse_architecture("B_12-Wi_1024") == (12, 1024, 4)
    assert bottleneck_mlp.parse_architecture("B_6-Wi_512-Ex_2") == (6, 512, 2)
    with pytest.raises(ValueError, match="B_<blocks>-Wi_<width>"):
        bottleneck_mlp.parse_architecture("B12-Wi1024")


def test_images_and_flat_vectors_and_wrong_sizes():
    model = timm.create_model("bottleneck_mlp_nano").eval()
    flat = torch.randn(2, 3 * 16 * 16)  # the original feeds flattened (C, H, W) vectors
    with torch.no_grad():
        assert torch.equal(model(flat), model(flat.view(2, 3, 16, 16)))
    with pytest.raises(ValueError, match="expects 3x16x16 images"):
        model(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="flat vectors of 768 values"):
        model(torch.randn(1, 700))
    with pytest.raises(ValueError, match="expects 3x16x16 images"):  # the same message from the notrace helper
        bottleneck_mlp.flatten_input(torch.randn(1, 1, 16, 16), 3, 16, 16)


def test_timm_classifier_api_without_feature_maps():
    """A vector per image: forward_features is (B, width), pre_logits the same, no feature_info."""
    model = timm.create_model("bottleneck_mlp_nano").eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (2, model.num_features) == (2, model.head_hidden_size)
        assert torch.equal(model.forward_head(features, pre_logits=True), features)
        model.reset_classifier(7)
        assert model(x).shape == (2, 7)
        model.reset_classifier(0)
        assert torch.equal(model(x), features)
    assert not hasattr(model, "forward_intermediates") and not hasattr(model, "feature_info")
    assert model.pretrained_cfg["first_conv"] == "stem" and model.pretrained_cfg["fixed_input_size"]


def test_torchscript_and_fx():
    check_script_and_trace("bottleneck_mlp_nano")


def test_nano_forward_and_training_step(record_property):
    check_nano_training("bottleneck_mlp_nano", record_property)


def test_small_default_model_forward_and_train():
    check_default_forward_and_train("bottleneck_mlp_b6_wi512")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bottleneck_mlp_b12_wi512", "bottleneck_mlp_b6_wi1024", "bottleneck_mlp_b12_wi1024"])
def test_default_models_forward_and_train(name):
    check_default_forward_and_train(name)


def test_removal_is_a_one_line_error():
    assert_removal_is_one_line_error("bottleneck_mlp_nano")


def test_save_load_round_trip(tmp_path):
    assert_save_load_round_trip("bottleneck_mlp_nano", tmp_path)


def test_training_config():
    check_mlp_config(ROOT / "configs" / "mlp" / "bottleneck_mlp.yaml")
