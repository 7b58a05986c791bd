"""The pieces of a run, built from a RunConfig with timm's factories (the DeiT recipe).

Model, data sets and loaders, loss, optimizer and lr schedule, Mixup/CutMix, layer selection.
Nothing here touches a device: :mod:`shrink.training.trainer` hands all of it to Accelerate.
"""
from __future__ import annotations

import logging
import os
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from torch import nn
from torch.utils.data import DataLoader, Dataset

from shrink.blocks.dilution import get_blocks, has_attention_layers, validate_layers
from shrink.blocks.parts import set_drop_path
from shrink.data.datasets import WorkerSeeder, build_dataset, calibration_subset, reads_files, with_transform
from shrink.errors import ShrinkError
from shrink.modelio.create import create_model
from shrink.precision import dtype_of
from shrink.training.config import RunConfig

_logger = logging.getLogger(__name__)



def set_constant_drop_path(model: nn.Module, rate: float) -> None:
    """The same stochastic-depth rate in every block (the reference's DeiT-B recipe; timm ramps it)."""
    for block in get_blocks(model):
        set_drop_path(block, rate)


def build_model(cfg: RunConfig, num_classes: int, download: bool = True) -> nn.Module:
    """The starting model: timm name + pretrained weights, or a local checkpoint (file or saved directory).

    ``download=False`` skips the pretrained weights (a resumed run loads its own state over them)."""
    kwargs = cfg.model_kwargs(num_classes)
    try:
        model = create_model(cfg.model, pretrained=cfg.pretrained and download and not cfg.finetune,
                             checkpoint=cfg.finetune,
                             **kwargs)
    except ShrinkError:
        raise
    except TypeError as e:
        raise ShrinkError(f"cannot build {cfg.model}: {e}") from None
    if cfg.drop_path_schedule == "constant" and cfg.drop_path:
        set_constant_drop_path(model, cfg.drop_path)
    return model


def build_datasets(cfg: RunConfig, model: nn.Module | None = None) -> tuple[Dataset, Dataset, Dataset]:
    """Train (augmented), calibration (train split, eval transform) and val data sets."""
    aug = {"auto_augment": None if (cfg.aa or "none").lower() == "none" else cfg.aa,
           "color_jitter": cfg.color_jitter, "re_prob": cfg.reprob}
    common = dict(data_path=cfg.data_path, input_size=cfg.input_size, model=model,
                  synthetic_size=cfg.synthetic_images, num_classes=cfg.num_classes)
    train = build_dataset(cfg.data_set, "train", train_transform=True, aug=aug, **common)
    calib = with_transform(train, False, model, cfg.input_size)  # same files, eval transform, no second scan
    val = build_dataset(cfg.data_set, "val", train_transform=False, **common)
    return train, calib, val


def make_loader(ds: Dataset, cfg: RunConfig, *, train: bool) -> DataLoader:
    """A plain DataLoader, identical on every process; Accelerate shards it.

    Repeated augmentation uses timm's RepeatAugSampler for ONE replica: each image appears three
    times in the epoch's order, which depends only on the epoch, and Accelerate deals the batches
    out to the processes, so a multi-process run sees the same data as a single process.
    """
    workers = cfg.num_workers if reads_files(cfg.data_set) else 0  # in-memory sets need no workers
    sampler = None
    if train and cfg.repeated_aug:
        from timm.data.distributed_sampler import RepeatAugSampler

        sampler = RepeatAugSampler(ds, num_replicas=1, rank=0, shuffle=True, num_repeats=3)
    # Workers start afresh for every pass (not persistent) and are seeded from (seed, rank, worker, the
    # pass's base seed from this process's RNG): a resumed run's workers draw what the uninterrupted
    # run's drew (persistent workers keep streams that no saved state holds).
    rank = int(os.environ.get("RANK", "0"))
    return DataLoader(ds, batch_size=cfg.batch_size, shuffle=train and sampler is None, sampler=sampler,
                      drop_last=train, num_workers=workers, pin_memory=torch.cuda.is_available(),
                      persistent_workers=False, worker_init_fn=WorkerSeeder(cfg.seed, rank) if workers else None)


def resolve_layers(cfg: RunConfig, model: nn.Module, calib_ds: Dataset, accelerator: Accelerator) -> dict[str, Any]:
    """Which blocks lose their attention: --remove-layers as given, or selected for --remove-ratio.

    Selection runs on the main process and is broadcast, so every process removes the same blocks.
    """
    if cfg.remove_layers is not None:
        return {"criterion": "manual", "layers": validate_layers(model, cfg.remove_layers)}
    if cfg.remove_ratio == 0:
        return {"criterion": None, "layers": []}
    if not has_attention_layers(model):
        raise ShrinkError(f"{cfg.model} has no attention layers to remove; use --remove-ratio 0")
    from shrink.selection.layers import select_layers

    result = [None]
    if accelerator.is_main_process:
        loader = DataLoader(calibration_subset(calib_ds, cfg.calib_images, seed=cfg.seed),
                            batch_size=max(cfg.batch_size, 64), shuffle=False)
        sel = select_layers(model, loader, ratio=cfg.remove_ratio, criterion=cfg.criterion, seed=cfg.seed,
                            device=accelerator.device, amp_dtype=dtype_of(cfg.mixed_precision),
                            progress=cfg.progress)
        result = [sel.to_json()]
    result = broadcast_object_list(result)
    return {**result[0], "layers": list(result[0]["layers"])}


def build_loss(cfg: RunConfig, mixup_active: bool) -> nn.Module:
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if mixup_active:
        return SoftTargetCrossEntropy()
    if cfg.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
    return nn.CrossEntropyLoss()


def build_mixup(cfg: RunConfig, num_classes: int):
    """timm's Mixup/CutMix (with label smoothing folded into the soft targets), or None when both are off."""
    if cfg.mixup <= 0 and cfg.cutmix <= 0:
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.smoothing,
                 num_classes=num_classes)


def build_optimizer(cfg: RunConfig, model: nn.Module, lr: float):
    """AdamW (no decay on 1-D params, pos_embed, cls_token) and the per-epoch lr schedule, from timm."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay)
    scheduler, _ = create_scheduler_v2(optimizer, sched=cfg.sched, num_epochs=cfg.epochs,
                                       warmup_epochs=cfg.warmup_epochs, warmup_lr=cfg.warmup_lr,
                                       min_lr=cfg.min_lr)
    return optimizer, scheduler
