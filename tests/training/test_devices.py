"""Device placement without a GPU: the DeiT recipe under a fake accelerator (tests/fake_device.py).

The fake device tells host tensors from device tensors on a CPU, so a forgotten
``.to(accelerator.device)`` or ``accelerator.prepare`` fails here as it would on the first GPU.
"""
from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
from accelerate.data_loader import prepare_data_loader
from torch.utils.data import DataLoader, TensorDataset

from shrink.training.config import RunConfig
from shrink.training.parts import make_loader
from tests.conftest import accelerate, run
from tests.fake_device import DeviceMismatch, FakeDevice, check_on_device, is_host

RECIPE = ["--data-set", "synthetic", "--remove-layers", "0,2", "--epochs", "3", "--dilution-epochs", "1.5",
          "--lambda-schedule", "linear", "--model-ema", "--model-ema-decay", "0.9", "--repeated-aug",
          "--mixup", "0.8", "--cutmix", "1.0", "--distill", "--grad-accum", "2", "--clip-grad", "1.0",
          "--batch-size", "16", "--drop-path", "0.1", "--drop-path-schedule", "constant", "--no-progress"]


# ------------------------------------------------------------------------------------------------
# The fake device itself: it must catch each kind of mistake, and pass correct code.

def test_fake_device_catches_an_input_that_was_not_moved():
    with FakeDevice():
        model = torch.nn.Linear(4, 3).to(torch.device("cpu"))
        assert not is_host(model.weight)
        with pytest.raises(DeviceMismatch, match="linear"):
            model(torch.randn(2, 4))
        assert not is_host(model(torch.randn(2, 4).to("cpu")))


def test_fake_device_catches_an_ema_copied_before_the_model_moved():
    with FakeDevice():
        model = torch.nn.Linear(4, 3)
        ema = copy.deepcopy(model)  # the bug: a copy of the host model
        model.to("cpu")
        assert is_host(ema.weight) and not is_host(model.weight)
        with pytest.raises(DeviceMismatch), torch.no_grad():
            for e, m in zip(ema.parameters(), model.parameters(), strict=True):
                e.lerp_(m, 0.1)
        with pytest.raises(DeviceMismatch, match="EMA"):
            check_on_device("EMA", ema)
        check_on_device("model", model)


def test_fake_device_catches_a_loader_accelerate_did_not_prepare():
    from accelerate import Accelerator

    with FakeDevice():
        ds = TensorDataset(torch.randn(8, 4), torch.arange(8))
        model = torch.nn.Linear(4, 3)
        acc = Accelerator(cpu=True)
        model, prepared = acc.prepare(model, DataLoader(ds, batch_size=4))
        x, _ = next(iter(prepared))
        model(x)  # prepared: on the device
        x, _ = next(iter(DataLoader(ds, batch_size=4)))
        with pytest.raises(DeviceMismatch):
            model(x)  # the repeated-augmentation loader of the landed main was never prepared


def test_fake_device_passes_a_correct_training_step():
    import timm

    with FakeDevice():
        model = timm.create_model("deit_tiny_patch16_224", img_size=32, num_classes=4).to("cpu")
        opt = torch.optim.AdamW(model.parameters())
        loss = model(torch.randn(2, 3, 32, 32).to("cpu")).logsumexp(-1).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        check_on_device("model", model)


# ------------------------------------------------------------------------------------------------
# The whole recipe under the fake device, one process and two

def _recipe(tmp_path, processes: int) -> list[dict]:
    prefix = tmp_path / "report"
    launcher = [sys.executable] if processes == 1 else accelerate(processes)
    res = run([*launcher, "tests/fake_device_main.py", str(prefix), *RECIPE, "--output-dir", str(tmp_path / "o")])
    assert res.returncode == 0, res.stderr[-4000:]
    return [json.loads((tmp_path / f"report.{rank}.json").read_text()) for rank in range(processes)]


def _check_report(report: dict) -> None:
    for key in ("model_checks", "ema_checks", "input_checks", "loss_checks", "teacher_checks"):
        assert report[key] > 0, key  # the checks ran
    lams = report["lambdas"]
    assert 0.0 in lams and lams[0] == 1.0
    first_zero = lams.index(0.0)
    steps = [a - b for a, b in zip(lams[:first_zero], lams[1:first_zero + 1], strict=True)]
    assert max(steps) - min(steps) < 1e-9, "lambda skipped or repeated a step (per-epoch step count)"


@pytest.mark.slow
def test_deit_recipe_on_the_fake_device_one_process(tmp_path):
    (report,) = _recipe(tmp_path, 1)
    _check_report(report)


@pytest.mark.slow
def test_deit_recipe_on_the_fake_device_two_processes(tmp_path):
    reports = _recipe(tmp_path, 2)
    for r in reports:
        _check_report(r)
    assert reports[0]["lambdas"] == reports[1]["lambdas"]  # the switch (mid-epoch) happened together
    seeds = [r["augment_seed"] for r in reports]
    assert seeds[0] != seeds[1], "every process draws the same augmentations (per-rank seed missing)"


# ------------------------------------------------------------------------------------------------
# Data order: a multi-process run sees the single-process order, dealt out batch by batch

@pytest.mark.parametrize("repeated_aug", [False, True])
def test_two_processes_see_the_single_process_order(repeated_aug):
    ds = TensorDataset(torch.arange(300).float().unsqueeze(1), torch.arange(300))
    cfg = RunConfig(batch_size=8, repeated_aug=repeated_aug, data_set="digits")

    def batches(num_processes, rank, seed_before):
        torch.manual_seed(seed_before)  # the per-process seed must not change the order
        loader = prepare_data_loader(make_loader(ds, cfg, train=True), torch.device("cpu"),
                                     num_processes=num_processes, process_index=rank, put_on_device=False,
                                     use_seedable_sampler=True, data_seed=0)
        loader.set_epoch(3)
        return [b[1].tolist() for b in loader]

    single = batches(1, 0, 11)
    rank0, rank1 = batches(2, 0, 11), batches(2, 1, 12)
    assert len(rank0) == len(rank1) == len(single) // 2
    interleaved = [b for pair in zip(rank0, rank1, strict=True) for b in pair]
    assert interleaved == single[: len(interleaved)]
    if repeated_aug:  # each image three times per epoch, the copies side by side
        flat = [i for b in single for i in b]
        assert flat[0] == flat[1] == flat[2]
    assert batches(1, 0, 11) != batches_at_epoch(ds, cfg, 4)


def batches_at_epoch(ds, cfg, epoch):
    loader = prepare_data_loader(make_loader(ds, cfg, train=True), torch.device("cpu"), num_processes=1,
                                 process_index=0, put_on_device=False, use_seedable_sampler=True, data_seed=0)
    loader.set_epoch(epoch)
    return [b[1].tolist() for b in loader]
