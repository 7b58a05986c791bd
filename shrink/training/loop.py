"""On an Accelerator (:func:`make_accelerator`): the one way onto the device (:func:`prepare_on_device`),
one training step (:func:`train_step`), one epoch (:class:`EpochMeter`, :func:`train_one_epoch`), one
evaluation (:func:`evaluate`)."""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
from torch import nn
from tqdm.auto import tqdm

from shrink.errors import ShrinkError
from shrink.training.config import RunConfig
from shrink.training.sharding import mark_shard_units


class TrainingDiverged(ShrinkError):
    """The loss became NaN or infinite."""

    def __init__(self, message: str, epoch: int, step: int):
        super().__init__(message)
        self.epoch, self.step = epoch, step


@dataclass
class TrainParts:
    """What a training step needs. :func:`train_step` reads ``model`` / ``optimizer`` / ``raw`` on every
    call: the Trainer replaces them, in its own loop, at the switch to the attention-free model."""

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


def make_accelerator(cfg: RunConfig, project_dir: Path) -> Accelerator:
    """The run's Accelerator: precision, gradient accumulation, trackers, a seeded data order, DDP
    without unused parameters (the switch removes them from the model), the GPU when there is one."""
    return Accelerator(
        mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
        log_with=cfg.log_with, project_dir=str(project_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
        cpu=not torch.cuda.is_available())


def prepare_on_device(accelerator: Accelerator, raw: nn.Module, optimizer, *loaders, compile: bool = False):
    """The one path by which the training objects reach the device: at the start (with the loaders)
    and at the switch to the attention-free model (model and optimizer only; the loaders stay).
    Returns (prepared model, prepared optimizer, [prepared loaders])."""
    accelerator.free_memory()  # forget the objects of the previous phase (their DDP wrapper, optimizer)
    mark_shard_units(raw, getattr(accelerator.state, "fsdp_plugin", None))  # FSDP: each block its own unit
    model = torch.compile(raw) if compile else raw
    model, optimizer, *loaders = accelerator.prepare(model, optimizer, *loaders)
    return model, optimizer, loaders



class EpochMeter:
    """An epoch's progress bar and running totals: iterate it for ``(step, (images, targets))``,
    :meth:`add` each micro-batch, :meth:`result` at the end (gathered over all processes)."""

    def __init__(self, loader, accelerator: Accelerator, desc: str, progress: bool = True):
        self.accelerator = accelerator
        self.lam: float | None = None  # the lambda in force, shown on the bar and reported
        self.total, self.count, self.correct = 0.0, 0, 0
        self.t0 = time.perf_counter()
        self.bar = tqdm(loader, desc=desc, leave=False, disable=not (progress and accelerator.is_main_process),
                        dynamic_ncols=True)

    def __iter__(self):
        return enumerate(self.bar)

    def add(self, loss_value: float, n: int, correct: int) -> None:
        self.total += loss_value * n
        self.count += n
        self.correct += correct
        self.bar.set_postfix(loss=f"{loss_value:.4f}", acc=f"{100.0 * self.correct / max(self.count, 1):.1f}",
                             lam="-" if self.lam is None else f"{self.lam:.3f}")

    def result(self, optimizer: torch.optim.Optimizer) -> EpochStats:
        self.bar.close()
        stats = torch.tensor([self.total, self.count, self.correct], dtype=torch.float64,
                             device=self.accelerator.device)
        stats = self.accelerator.reduce(stats, reduction="sum")
        return EpochStats(loss=float(stats[0] / stats[1].clamp(min=1)), lam=self.lam,
                          acc=float(100.0 * stats[2] / stats[1].clamp(min=1)),
                          lr=optimizer.param_groups[0]["lr"], seconds=time.perf_counter() - self.t0)


def train_step(parts: TrainParts, images: torch.Tensor, targets: torch.Tensor, accelerator: Accelerator, *,
               epoch: int, step: int) -> tuple[float, int, int]:
    """One micro-batch: forward (with Mixup/CutMix and distillation), backward, and the optimizer update
    when it completes an accumulation; the EMA follows each update. Returns (loss, images, correct)."""
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
    correct = int((logits.detach().argmax(-1) == labels).sum()) if labels.ndim == 1 else 0
    return loss_value, n, correct


def train_one_epoch(
    parts: TrainParts,
    loader,
    accelerator: Accelerator,
    *,
    epoch: int,
    lambda_at: Callable[[int], float | None] | None = None,
    progress: bool = True,
) -> EpochStats:
    """One epoch of one fixed model over ``loader`` (prepared by Accelerate, so batches are on
    ``accelerator.device``).

    ``lambda_at(update)`` runs before the first micro-batch of every optimizer update (``update``
    counts updates within the epoch) and returns the lambda in force, for the report; it may set
    lambda, and must not replace ``parts``' model or optimizer. A run whose model changes within an
    epoch (the lambda = 0 switch) owns its loop: :meth:`shrink.training.trainer.Trainer.train_epoch`,
    made of the same :class:`EpochMeter` and :func:`train_step`.
    """
    meter = EpochMeter(loader, accelerator, f"epoch {epoch}", progress)
    parts.model.train()
    for step, (images, targets) in meter:
        if lambda_at is not None and step % accelerator.gradient_accumulation_steps == 0:
            meter.lam = lambda_at(step // accelerator.gradient_accumulation_steps)
        meter.add(*train_step(parts, images, targets, accelerator, epoch=epoch, step=step))
    return meter.result(parts.optimizer)


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
