"""train_one_epoch / evaluate on an Accelerator: one readable loop each."""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from .dilution import diluted_blocks, set_lambda, unwrap
from .errors import ShrinkError


class TrainingDiverged(ShrinkError):
    """The loss became NaN or infinite."""


@dataclass
class EpochStats:
    loss: float
    lam_start: float | None
    lam_end: float | None
    lr: float
    steps: int
    seconds: float


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """Soft-target KL divergence (Hinton), scaled by tau^2 so gradients keep their size."""
    s = F.log_softmax(student_logits / tau, dim=-1)
    t = F.log_softmax(teacher_logits / tau, dim=-1)
    return F.kl_div(s, t, reduction="batchmean", log_target=True) * tau * tau


def train_one_epoch(
    model: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    accelerator: Accelerator,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    *,
    epoch: int,
    lambda_fn: Callable[[int, int], float] | None = None,
    raw_model: nn.Module | None = None,
    mixup_fn=None,
    clip_grad: float | None = None,
    ema=None,
    teacher: nn.Module | None = None,
    distill_alpha: float = 0.5,
    distill_tau: float = 1.0,
    progress: bool = True,
) -> EpochStats:
    """One epoch. ``lambda_fn(epoch, step)`` sets lambda of the diluted blocks before each step."""
    model.train()
    raw_model = raw_model if raw_model is not None else unwrap(accelerator.unwrap_model(model))
    has_diluted = bool(diluted_blocks(raw_model))
    lam_start = lam = None
    total, count, steps = 0.0, 0, 0
    t0 = time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=not (progress and accelerator.is_main_process),
               dynamic_ncols=True)
    for step, (images, targets) in enumerate(bar):
        if has_diluted and lambda_fn is not None:
            new = lambda_fn(epoch, step)
            if new != lam:
                set_lambda(raw_model, new)
                lam = new
            if lam_start is None:
                lam_start = lam
        hard_targets = targets
        if mixup_fn is not None:
            images, targets = mixup_fn(images, targets)
        with accelerator.accumulate(model):
            with accelerator.autocast():
                logits = model(images)
                loss = loss_fn(logits, targets)
                if teacher is not None:
                    with torch.no_grad():
                        t_logits = teacher(images)
                    loss = (1 - distill_alpha) * loss + distill_alpha * distillation_loss(logits, t_logits, distill_tau)
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise TrainingDiverged(f"loss is {loss_value} at epoch {epoch}, step {step}; stopping "
                                       f"(the last good checkpoint is kept)")
            accelerator.backward(loss)
            if clip_grad is not None and accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if ema is not None and accelerator.sync_gradients:
            ema.update(raw_model)
        total += loss_value * hard_targets.shape[0]
        count += hard_targets.shape[0]
        steps += 1
        bar.set_postfix(loss=f"{loss_value:.4f}", lam=f"{lam:.3f}" if lam is not None else "-")
    bar.close()
    stats = torch.tensor([total, count], dtype=torch.float64, device=accelerator.device)
    stats = accelerator.reduce(stats, reduction="sum")
    return EpochStats(loss=float(stats[0] / max(stats[1], 1)), lam_start=lam_start, lam_end=lam,
                      lr=optimizer.param_groups[0]["lr"], steps=steps, seconds=time.perf_counter() - t0)


@torch.no_grad()
def evaluate(model: nn.Module, loader, accelerator: Accelerator, *, desc: str = "eval",
             progress: bool = True) -> float:
    """Top-1 accuracy in percent over the whole (sharded) loader, gathered across processes."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    seen = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    bar = tqdm(loader, desc=desc, leave=False, disable=not (progress and accelerator.is_main_process),
               dynamic_ncols=True)
    for images, targets in bar:
        with accelerator.autocast():
            logits = model(images)
        preds, targets = accelerator.gather_for_metrics((logits.argmax(-1), targets))
        correct += (preds == targets).sum()
        seen += targets.numel()
    bar.close()
    model.train(was_training)
    return float(100.0 * correct / seen.clamp(min=1))
