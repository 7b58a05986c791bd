"""shrink.sharding: the lambda = 0 switch and whole-model saving, alone, under DDP and under FSDP2.

FSDP2 (``fully_shard``) runs on a CPU with gloo; Accelerate's FSDP plugin needs CUDA, so the library
is tested here under torch's own FSDP2 (tests/sharding_main.py), and the Accelerate path on a GPU by
scripts/gpu_check.sh.
"""
from __future__ import annotations

import json
import sys

import pytest
import torch

import shrink
from shrink.sharding import export_for_training, is_sharded, whole_model
from tests.conftest import run


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
