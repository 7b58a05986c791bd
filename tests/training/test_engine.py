"""shrink.training.loop: one training epoch and one evaluation on an Accelerator, through the public functions."""
from __future__ import annotations

import math

import pytest
import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from shrink.training.loop import TrainingDiverged, TrainParts, distillation_loss, evaluate, train_one_epoch


def _loader(n: int = 32, batch: int = 8, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x[:, 0] > 0).long()
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)


def test_distillation_loss_is_zero_for_equal_logits_and_scales_with_tau_squared():
    s = torch.randn(4, 5)
    assert distillation_loss(s, s.clone(), tau=2.0).item() == pytest.approx(0.0, abs=1e-7)
    t = torch.randn(4, 5)
    p = torch.log_softmax(s, -1)
    q = torch.log_softmax(t, -1)
    kl = (q.exp() * (q - p)).sum(-1).mean()
    assert distillation_loss(s, t, tau=1.0).item() == pytest.approx(kl.item(), rel=1e-5)


def test_evaluate_counts_top1_exactly():
    accelerator = Accelerator(cpu=True)
    model = nn.Linear(6, 2)
    with torch.no_grad():  # predicts class 1 exactly when x[:, 0] > 0: 100%
        model.weight.zero_()
        model.bias.zero_()
        model.weight[1, 0] = 1.0
    model, loader = accelerator.prepare(model, _loader())
    assert evaluate(model, loader, accelerator, progress=False) == pytest.approx(100.0)
    with torch.no_grad():
        model.weight.neg_()  # now always wrong, except where x[:, 0] == 0 exactly (never here)
    assert evaluate(model, loader, accelerator, progress=False) == pytest.approx(0.0)


def test_train_one_epoch_lowers_the_loss_and_reports_the_mean():
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True)
    model = nn.Linear(6, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model, optimizer, loader = accelerator.prepare(model, optimizer, _loader())
    parts = TrainParts(model=model, raw=model, optimizer=optimizer, loss_fn=nn.CrossEntropyLoss())
    first = train_one_epoch(parts, loader, accelerator, epoch=0, progress=False)
    for epoch in range(1, 4):
        last = train_one_epoch(parts, loader, accelerator, epoch=epoch, progress=False)
    assert math.isfinite(first.loss) and last.loss < first.loss
    assert first.lam is None and first.lr == pytest.approx(0.5)


def test_lambda_at_runs_once_per_update_and_its_lambda_is_reported():
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = nn.Linear(6, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer, loader = accelerator.prepare(model, optimizer, _loader(n=32, batch=4))  # 8 micro-batches
    parts = TrainParts(model=model, raw=model, optimizer=optimizer, loss_fn=nn.CrossEntropyLoss())
    calls = []

    def lambda_at(update: int) -> float:
        calls.append(update)
        return 1.0 - update / 4

    stats = train_one_epoch(parts, loader, accelerator, epoch=0, lambda_at=lambda_at, progress=False)
    assert calls == [0, 1, 2, 3] and stats.lam == pytest.approx(0.25)


def test_a_non_finite_loss_stops_training():
    accelerator = Accelerator(cpu=True)
    model = nn.Linear(6, 2)
    with torch.no_grad():
        model.weight.fill_(float("nan"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model, optimizer, loader = accelerator.prepare(model, optimizer, _loader())
    parts = TrainParts(model=model, raw=model, optimizer=optimizer, loss_fn=nn.CrossEntropyLoss())
    with pytest.raises(TrainingDiverged):
        train_one_epoch(parts, loader, accelerator, epoch=0, progress=False)
