"""models/ff_vit.py: the feed-forward-only ViT: registration, published sizes, timm's feature API, training.

Its original checkpoints (DeiT-style, ``mlp1`` / ``mlp2``, split position embedding) are in
test_checkpoint_formats.py; timm's own model tests in test_timm_contract.py.
"""
import pytest
import timm
import torch

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
    "ffvit_tiny_patch16_224": ((3, 224, 224), IMAGENET_MEAN_STD, 1000),
    "ffvit_base_patch16_224": ((3, 224, 224), IMAGENET_MEAN_STD, 1000),
    "ffvit_nano": ((3, 16, 16), CIFAR100_MEAN_STD, 10),
}


def test_registered_models_are_the_expected_ones():
    assert registered("ff_vit") == set(EXPECTED_CFG)


@pytest.mark.parametrize("name", sorted(EXPECTED_CFG))
def test_pretrained_cfg_input_size_mean_std(name):
    assert_pretrained_cfg(name, *EXPECTED_CFG[name])


def test_pretrained_true_fails_clearly_without_network():
    assert_no_pretrained_weights("ffvit_nano")


def ffvit_count(width: int, depth: int = 12, tokens: int = 197, classes: int = 1000) -> int:
    embed = linear(3 * 16 * 16, width) + width + tokens * width  # conv, class token, positions
    block = (2 * width + linear(width, 4 * width) + linear(4 * width, width)
             + 2 * tokens + linear(tokens, 4 * tokens) + linear(4 * tokens, tokens))
    return embed + depth * block + 2 * width + linear(width, classes)


@pytest.mark.parametrize("name, width, published", [
    ("ffvit_tiny_patch16_224", 192, 7.7), ("ffvit_base_patch16_224", 768, 62),
])
def test_matches_published_counts(name, width, published):
    count = n_params(on_meta(name))
    assert count == ffvit_count(width)
    assert (round(count / 1e5) / 10 if published < 10 else round(count / 1e6)) == published


def test_feature_api_on_nano():
    check_feature_api("ffvit_nano", levels=3, tokens=True)


def test_heads_pool_the_class_token_the_patches_or_nothing():
    model = timm.create_model("ffvit_nano", num_classes=0).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        tokens = model.forward_features(x)
        assert tokens.shape == (2, 1 + 16, 32)
        assert torch.equal(model(x), tokens[:, 0])
        model.reset_classifier(0, "avg")
        assert torch.equal(model(x), tokens[:, 1:].mean(dim=1))
        model.reset_classifier(0, "")
        assert torch.equal(model(x), tokens)
    with pytest.raises(AssertionError, match="global_pool"):  # timm's error for a pooling it lacks
        model.reset_classifier(0, "max")
    # the class token pairs with the patch maps when asked for
    maps = model.forward_intermediates(x, indices=1, return_prefix_tokens=True, intermediates_only=True)
    assert maps[0][0].shape == (2, 32, 4, 4) and maps[0][1].shape == (2, 1, 32)


def test_input_size_is_fixed_by_the_token_mlps():
    model = timm.create_model("ffvit_nano")
    assert model.pretrained_cfg["fixed_input_size"]
    with pytest.raises(AssertionError):  # timm's PatchEmbed refuses another size
        model(torch.randn(1, 3, 32, 32))


def test_torchscript_and_fx():
    check_script_and_trace("ffvit_nano")


def test_nano_forward_and_training_step(record_property):
    check_nano_training("ffvit_nano", record_property)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ffvit_tiny_patch16_224", "ffvit_base_patch16_224"])
def test_default_models_forward_and_train(name):
    check_default_forward_and_train(name)


def test_removal_is_a_one_line_error():
    assert_removal_is_one_line_error("ffvit_nano")


def test_save_load_round_trip(tmp_path):
    assert_save_load_round_trip("ffvit_nano", tmp_path)


def test_training_config():
    check_mlp_config(ROOT / "configs" / "mlp" / "ff_vit.yaml")
