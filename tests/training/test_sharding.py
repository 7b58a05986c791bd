"""shrink.training.sharding: the lambda = 0 switch and whole-model saving, alone, under DDP and under FSDP2.

FSDP2 (``fully_shard``) runs on a CPU with gloo; Accelerate's FSDP plugin needs CUDA, so the library
is tested here under torch's own FSDP2 (tests/sharding_main.py), and the Accelerate path on a GPU by
scripts/gpu_check.sh.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import shrink
from shrink.training.sharding import export_for_training, is_sharded, mark_shard_units, whole_model
from tests.conftest import run
from tests.sharding_main import FSDP_YAML, fsdp_plugin_of, units

ROOT = Path(__file__).resolve().parents[2]


def test_plain_model_is_its_own_whole_model_and_switches_in_place():
    model = shrink.create_model("vit_digits", pretrained=True)
    shrink.dilute(model, [1, 4])
    assert not is_sharded(model) and whole_model(model) is model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 1, 8, 8)).sum().backward()
    opt.step()
    before = {n: opt.state[p]["exp_avg"].clone() for n, p in model.named_parameters()}
    prepared, bare, new_opt = export_for_training(model, opt, lambda m: (m, torch.optim.AdamW(m.parameters())))
    assert bare is model and prepared is model and shrink.attention_free_indices(model) == [1, 4]
    names = dict(model.named_parameters())
    assert not any(n.startswith(("blocks.1.attn.", "blocks.4.attn.", "blocks.1.norm1.")) for n in names)
    for n, p in names.items():  # every remaining parameter keeps its AdamW moments and step
        assert torch.equal(new_opt.state[p]["exp_avg"], before[n]) and new_opt.state[p]["step"] == 1


@pytest.fixture(scope="module")
def three_setups(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharding")
    results = {}
    for mode, n in (("single", 1), ("ddp", 2), ("fsdp", 2)):
        res = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n),
                    "tests/sharding_main.py", mode, str(root / mode)])
        assert res.returncode == 0, f"{mode}: {res.stderr[-3000:]}"
        results[mode] = (json.loads((root / mode / "losses.json").read_text()), shrink.load(root / mode / "model"))
    return results


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_sharded_and_ddp_runs_equal_the_single_process_run(three_setups, mode):
    (ref, ref_model), (got, model) = three_setups["single"], three_setups[mode]
    assert got["losses"] == pytest.approx(ref["losses"], abs=1e-5)  # fp32 reduction order only
    assert got["deploy"] == pytest.approx(ref["deploy"], abs=1e-4)
    a, b = ref_model.state_dict(), model.state_dict()
    assert a.keys() == b.keys() and not any(".attn." in k for k in a if k.startswith(("blocks.0.", "blocks.2.")))
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert shrink.attention_free_indices(model) == [0, 2]


# --- the shipped Accelerate FSDP config: its wrap policy, through Accelerate's own functions, in every phase

@pytest.mark.parametrize("version", [2, 1])
def test_shipped_fsdp_config_wraps_every_block_in_every_phase(version):
    """Issue 20: the shipped list (Block, DilutedBlock, AttentionFreeBlock) failed at the first prepare
    ("Could not find the transformer layer class AttentionFreeBlock"), and Accelerate keeps the names
    it resolved then, so the second prepare (after the lambda = 0 switch) looked for the diluted class."""
    plugin = fsdp_plugin_of(FSDP_YAML, version)
    model = shrink.create_model("vit_digits", pretrained=False)
    blocks = [f"blocks.{i}" for i in range(len(model.blocks))]
    shrink.dilute(model, [0, 2])
    # phase 1: dense + diluted blocks
    assert mark_shard_units(model, plugin) == sorted({type(b).__name__ for b in model.blocks})
    assert units(plugin, model) == blocks
    # phase 2: the switch, on the same plugin (Accelerate's state lives through the run)
    shrink.export(model, inplace=True)
    mark_shard_units(model, plugin)
    assert units(plugin, model) == blocks
    # resume after the switch: a fresh process, an attention-free model from the start
    plugin = fsdp_plugin_of(FSDP_YAML, version)
    mark_shard_units(model, plugin)
    assert units(plugin, model) == blocks
    # every block removed, and no block removed: one class each
    for remove in ([], list(range(len(model.blocks)))):
        model = shrink.create_model("vit_digits", pretrained=False)
        shrink.dilute(model, remove)
        shrink.export(model, inplace=True)
        plugin = fsdp_plugin_of(FSDP_YAML, version)
        assert len(mark_shard_units(model, plugin)) == 1 and units(plugin, model) == blocks


def test_mark_shard_units_reads_the_classes_from_the_model():
    """No hard-coded names: a block class made on the fly (as per-family blocks may be) is found too;
    through torch.compile's wrapper, and a model without blocks is one unit."""
    model = shrink.create_model("vit_digits", pretrained=False)
    Custom = type("FamilyBlockX", (type(model.blocks[1]),), {})
    model.blocks[1].__class__ = Custom
    plugin = fsdp_plugin_of(FSDP_YAML)
    assert mark_shard_units(torch.compile(model), plugin) == sorted({"FamilyBlockX", type(model.blocks[0]).__name__})
    assert model._no_split_modules == plugin.transformer_cls_names_to_wrap
    assert units(plugin, model) == [f"blocks.{i}" for i in range(len(model.blocks))]
    assert mark_shard_units(torch.nn.Linear(2, 2)) == []


def test_a_class_list_in_the_config_cannot_break_a_phase(tmp_path):
    """An older config that lists classes (the one shipped before) is overridden by the model's classes."""
    old = tmp_path / "fsdp.yaml"
    old.write_text(FSDP_YAML.read_text().replace(
        "fsdp_config:\n", "fsdp_config:\n  fsdp_transformer_layer_cls_to_wrap: Block,DilutedBlock,AttentionFreeBlock\n"))
    plugin = fsdp_plugin_of(old)
    assert plugin.transformer_cls_names_to_wrap == ["Block", "DilutedBlock", "AttentionFreeBlock"]
    model = shrink.create_model("vit_digits", pretrained=False)
    shrink.dilute(model, [0, 2])
    with pytest.raises(ValueError, match="Could not find the transformer layer class"):
        units(plugin, model)  # what Accelerate did with that list
    plugin = fsdp_plugin_of(old)
    mark_shard_units(model, plugin)
    assert units(plugin, model) == [f"blocks.{i}" for i in range(len(model.blocks))]
