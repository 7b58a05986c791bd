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

from shrink.errors import ShrinkError


class TrainingDiverged(ShrinkError):
    """The loss became NaN or infinite."""

    def __init__(self, message: str, epoch: int, step: int):
        super().__init__(message)
        self.epoch, self.step = epoch, step


@dataclass
class TrainParts:
    """What a training step needs. ``model`` / ``optimizer`` / ``raw`` may be replaced by the
    ``before_step`` hook of :func:`train_one_epoch` (the run's switch to the attention-free model)."""

    model: nn.Module           # as prepared by Accelerate (DDP / compiled wrappers)
    raw: nn.Module             # the bare model under the wrappers
    optimizer: torch.optim.Optimizer
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    mixup_fn: Callable | None = None
    clip_grad: float | None = None
    ema: object | None = None  # timm ModelEmaV3, on accelerator.device
    teacher: nn.Module | None = None
    distill_alpha: float = 0.5
    distill_tau: float = 1.0


@dataclass
class EpochStats:
    loss: float         # mean train loss over the epoch's images, all processes
    lam: float | None   # lambda of the diluted blocks at the last step (None without dilution)
    acc: float          # top-1 (%) on the training batches as trained (augmented, at the lambda in force),
                        # against the unmixed labels; all processes
    lr: float
    seconds: float


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    """Soft-target KL divergence (Hinton), scaled by tau^2 so gradients keep their size."""
    s = F.log_softmax(student_logits / tau, dim=-1)
    t = F.log_softmax(teacher_logits / tau, dim=-1)
    return F.kl_div(s, t, reduction="batchmean", log_target=True) * tau * tau


def train_one_epoch(
    parts: TrainParts,
    loader,
    accelerator: Accelerator,
    *,
    epoch: int,
    before_step: Callable[[int], float | None] | None = None,
    progress: bool = True,
) -> EpochStats:
    """One epoch over ``loader`` (prepared by Accelerate, so batches are on ``accelerator.device``).

    ``before_step(update)`` runs before the first micro-batch of every optimizer update (``update``
    counts updates within the epoch) and returns the lambda in force; it sets lambda and may swap
    ``parts.model`` / ``parts.optimizer`` / ``parts.raw``, which is why they are read on every step.
    """
    lam = None
    total, count, correct = 0.0, 0, 0
    parts.model.train()  # a model swapped in by before_step is a fresh wrapper, in train mode too
    t0 = time.perf_counter()
    bar = tqdm(loader, desc=f"epoch {epoch}", leave=False, disable=not (progress and accelerator.is_main_process),
               dynamic_ncols=True)
    for step, (images, targets) in enumerate(bar):
        if before_step is not None and step % accelerator.gradient_accumulation_steps == 0:
            lam = before_step(step // accelerator.gradient_accumulation_steps)
        model, optimizer = parts.model, parts.optimizer
        n = targets.shape[0]
        labels = targets
        if parts.mixup_fn is not None:
            images, targets = parts.mixup_fn(images, targets)
        with accelerator.accumulate(model):
            with accelerator.autocast():
                logits = model(images)
                loss = parts.loss_fn(logits, targets)
                if parts.teacher is not None:
                    with torch.no_grad():
                        t_logits = parts.teacher(images)
                    loss = (1 - parts.distill_alpha) * loss + parts.distill_alpha * distillation_loss(
                        logits, t_logits, parts.distill_tau)
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise TrainingDiverged(f"loss is {loss_value} at epoch {epoch}, step {step}", epoch, step)
            accelerator.backward(loss)
            if parts.clip_grad is not None and accelerator.sync_gradients:
                accelerator.clip_grad_norm_(model.parameters(), parts.clip_grad)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if parts.ema is not None and accelerator.sync_gradients:
            parts.ema.update(parts.raw)
        total += loss_value * n
        count += n
        if labels.ndim == 1:
            correct += int((logits.detach().argmax(-1) == labels).sum())
        bar.set_postfix(loss=f"{loss_value:.4f}", acc=f"{100.0 * correct / max(count, 1):.1f}",
                        lam="-" if lam is None else f"{lam:.3f}")
    bar.close()
    stats = torch.tensor([total, count, correct], dtype=torch.float64, device=accelerator.device)
    stats = accelerator.reduce(stats, reduction="sum")
    return EpochStats(loss=float(stats[0] / stats[1].clamp(min=1)), lam=lam,
                      acc=float(100.0 * stats[2] / stats[1].clamp(min=1)),
                      lr=parts.optimizer.param_groups[0]["lr"], seconds=time.perf_counter() - t0)


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
        if not bar.disable:  # a running top-1 on the bar (a device sync per batch, so only when it is shown)
            bar.set_postfix(acc=f"{float(100.0 * correct / seen.clamp(min=1)):.2f}")
    bar.close()
    model.train(was_training)
    return float(100.0 * correct / seen.clamp(min=1))
