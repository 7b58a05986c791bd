"""models/vit_digits.py: the embedded demo ViT (timm's VisionTransformer for 8x8 digits) and its shipped weights.

timm's own model tests (with its pretrained-load test, offline through the cfg's ``file``) are in
test_timm_contract.py.
"""
import timm
import torch
from safetensors.torch import load_file

from shrink.models.vit_digits import DENSE_WEIGHTS

from ..conftest import (
    assert_pretrained_cfg,
    assert_save_load_round_trip,
    check_feature_api,
    check_script_and_trace,
    n_params,
    on_meta,
    registered,
)


def test_registered_model_and_cfg():
    assert registered("vit_digits") == {"vit_digits"}
    assert timm.list_pretrained("vit_digits*") == ["vit_digits.dense"]
    assert_pretrained_cfg("vit_digits", (1, 8, 8), ((0.5,), (0.5,)), 10)


def test_architecture_is_a_12_block_deit_style_vit():
    model = on_meta("vit_digits")
    assert len(model.blocks) == 12 and model.embed_dim == 48 and model.blocks[0].attn.num_heads == 3
    assert model.patch_embed.patch_size == (2, 2) and model.patch_embed.num_patches == 16
    assert n_params(model) == 229_210  # README: the dense model of the embedded run


def test_pretrained_loads_the_shipped_weights_offline():
    assert DENSE_WEIGHTS.is_file() and DENSE_WEIGHTS.parent.name == "weights"
    model = timm.create_model("vit_digits", pretrained=True)
    shipped = load_file(str(DENSE_WEIGHTS))
    assert set(shipped) == set(model.state_dict())
    assert all(torch.equal(v, shipped[k]) for k, v in model.state_dict().items())
    other = timm.create_model("vit_digits", pretrained=True, num_classes=5)  # a fresh head, the rest loaded
    assert other.head.out_features == 5
    assert torch.equal(other.blocks[11].mlp.fc2.weight, shipped["blocks.11.mlp.fc2.weight"])


def test_feature_api():
    check_feature_api("vit_digits", levels=12, tokens=True)


def test_torchscript_and_fx():
    check_script_and_trace("vit_digits")


def test_save_load_round_trip(tmp_path):
    assert_save_load_round_trip("vit_digits", tmp_path)
