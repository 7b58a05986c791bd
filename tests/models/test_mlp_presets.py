"""models/mlp_presets.py: 32-px CIFAR presets of timm's own MLP-Mixer, ResMLP and gMLP.

Nothing is re-implemented, so the checks are that each preset is timm's model with the documented
arguments, its cfg, and that it trains and keeps timm's feature API. Checkpoints in timm's format
are in test_checkpoint_formats.py; timm's own model tests in test_timm_contract.py.
"""
import pytest

from ..conftest import (
    CIFAR100_MEAN_STD,
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
    n_params,
    on_meta,
    registered,
)

EXPECTED_CFG = {  # name -> (input size, (mean, std), classes)
    "mixer_s4_cifar": ((3, 32, 32), CIFAR100_MEAN_STD, 100),
    "resmlp_12_cifar": ((3, 32, 32), CIFAR100_MEAN_STD, 100),
    "gmlp_s4_cifar": ((3, 32, 32), CIFAR100_MEAN_STD, 100),
    "mixer_nano_cifar": ((3, 32, 32), CIFAR100_MEAN_STD, 10),
    "resmlp_nano_cifar": ((3, 32, 32), CIFAR100_MEAN_STD, 10),
    "gmlp_nano_cifar": ((3, 32, 32), CIFAR100_MEAN_STD, 10),
}
NANO = ["mixer_nano_cifar", "resmlp_nano_cifar", "gmlp_nano_cifar"]
# preset -> (timm's ImageNet model it copies, parameters as in docs/mlp_families.md)
TIMM_ORIGINAL = {
    "mixer_s4_cifar": ("mixer_s16_224", 17_156_196),
    "resmlp_12_cifar": ("resmlp_12_224", 14_314_468),
    "gmlp_s4_cifar": ("gmlp_s16_224", 17_973_476),
}


def test_registered_models_are_the_expected_ones():
    assert registered("mlp_presets") == set(EXPECTED_CFG)


@pytest.mark.parametrize("name", sorted(EXPECTED_CFG))
def test_pretrained_cfg_input_size_mean_std(name):
    assert_pretrained_cfg(name, *EXPECTED_CFG[name])


def test_pretrained_true_fails_clearly_without_network():
    assert_no_pretrained_weights("mixer_s4_cifar")


@pytest.mark.parametrize("name", sorted(TIMM_ORIGINAL))
def test_preset_is_timms_model_at_32_px_with_4_px_patches(name):
    """Same class, same layers, same widths as timm's ImageNet model; only tokens, patch and classes differ."""
    original, count = TIMM_ORIGINAL[name]
    preset, theirs = on_meta(name), on_meta(original)
    assert type(preset) is type(theirs)
    ours = {k: tuple(v.shape) for k, v in preset.state_dict().items()}
    imagenet = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert ours.keys() == imagenet.keys()
    for key, shape in imagenet.items():
        if key == "stem.proj.weight":  # 16x16 patches there, 4x4 here
            assert ours[key] == (*shape[:2], 4, 4), key
        else:  # 196 tokens there, 64 here; 1000 classes there, 100 here
            assert ours[key] == tuple({196: 64, 1000: 100}.get(d, d) for d in shape), key
    assert n_params(preset) == count


@pytest.mark.parametrize("name", NANO)
def test_feature_api_on_nano(name):
    check_feature_api(name, levels=3, tokens=True)


@pytest.mark.parametrize("name", NANO)
def test_torchscript_and_fx(name):
    check_script_and_trace(name)


@pytest.mark.parametrize("name", NANO)
def test_nano_forward_and_training_step(name, record_property):
    check_nano_training(name, record_property)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TIMM_ORIGINAL))
def test_default_models_forward_and_train(name):
    check_default_forward_and_train(name)


@pytest.mark.parametrize("name", NANO)
def test_removal_is_a_one_line_error(name):
    assert_removal_is_one_line_error(name)


@pytest.mark.parametrize("name", NANO)
def test_save_load_round_trip(name, tmp_path):
    assert_save_load_round_trip(name, tmp_path)


@pytest.mark.parametrize("config", ["mixer_cifar.yaml", "resmlp_cifar.yaml", "gmlp_cifar.yaml"])
def test_training_configs(config):
    check_mlp_config(ROOT / "configs" / "mlp" / config)
