"""The whole run: model -> select layers -> dilute -> train with a lambda schedule -> export -> save.

Read top to bottom: :func:`run` builds everything (nothing is written until all inputs are known to
be good), then loops over epochs. "best" is the best *deployable* model: the diluted blocks
evaluated at lambda = 0, saved as an attention-free model. When lambda reaches 0 for good, the
model is exported in place (the attention parameters leave the model and the optimizer), so the
last phase trains the deployable network itself and DDP never sees unused parameters.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
from accelerate.utils import broadcast_object_list, set_seed
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader

from .checkpoint import create_model, load, save
from .config import RunConfig
from .data import build_dataset, calibration_subset, count_classes, with_transform
from .dilution import attention_block_indices, deploy_mode, dilute, lambda_at, unwrap, validate_layers
from .engine import evaluate, train_one_epoch
from .errors import ShrinkError
from .export import attention_free_indices, export
from .io import (
    atomic_append_line,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    recover_dir,
    replace_dir,
)

_logger = logging.getLogger(__name__)
IN_MEMORY = ("digits", "synthetic")


def _plain(accelerator: Accelerator, model: nn.Module) -> nn.Module:
    """The bare model under the DDP / FSDP / torch.compile wrappers."""
    return unwrap(accelerator.unwrap_model(model))


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------

def build_model(cfg: RunConfig, num_classes: int) -> nn.Module:
    """The starting model: timm name + pretrained weights, or a local checkpoint."""
    kwargs: dict[str, Any] = {"num_classes": cfg.num_classes or num_classes}
    if cfg.drop_path:
        kwargs["drop_path_rate"] = cfg.drop_path
    if cfg.input_size is not None:
        kwargs["img_size"] = cfg.input_size
    try:
        return create_model(cfg.model, pretrained=cfg.pretrained and not cfg.finetune,
                            checkpoint=cfg.finetune, **kwargs)
    except ShrinkError:
        raise
    except TypeError as e:
        raise ShrinkError(f"cannot build {cfg.model}: {e}") from None


def build_datasets(cfg: RunConfig, model: nn.Module | None = None):
    """Train (augmented), calibration (train split, eval transform) and val data sets."""
    aug = {"auto_augment": None if (cfg.aa or "none").lower() == "none" else cfg.aa,
           "color_jitter": cfg.color_jitter, "re_prob": cfg.reprob}
    common = dict(data_path=cfg.data_path, input_size=cfg.input_size, model=model)
    train = build_dataset(cfg.data_set, "train", train_transform=True, aug=aug, **common)
    calib = with_transform(train, False, model, cfg.input_size)  # same files, eval transform, no second scan
    val = build_dataset(cfg.data_set, "val", train_transform=False, **common)
    return train, calib, val


def _loader(ds, cfg: RunConfig, *, train: bool, sampler=None) -> DataLoader:
    workers = 0 if cfg.data_set in IN_MEMORY else cfg.num_workers
    return DataLoader(ds, batch_size=cfg.batch_size, shuffle=train and sampler is None, sampler=sampler,
                      drop_last=train, num_workers=workers, pin_memory=torch.cuda.is_available(),
                      persistent_workers=workers > 0)


def resolve_layers(cfg: RunConfig, model: nn.Module, calib_ds, accelerator: Accelerator) -> dict[str, Any]:
    """Which blocks lose their attention: --remove-layers as given, or selected for --remove-ratio."""
    if cfg.remove_layers is not None:
        layers = validate_layers(model, cfg.remove_layers)
        return {"criterion": "manual", "layers": layers, "scores": {}}
    if cfg.remove_ratio == 0:
        return {"criterion": None, "layers": [], "scores": {}}
    if not attention_block_indices(model):  # get_blocks raises for models without transformer blocks
        raise ShrinkError(f"{cfg.model} has no attention layers to remove; use --remove-ratio 0")
    from .selection import select_layers

    result = [None]
    if accelerator.is_main_process:
        loader = DataLoader(calibration_subset(calib_ds, cfg.calib_images, seed=cfg.seed),
                            batch_size=max(cfg.batch_size, 64), shuffle=False)
        amp = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}[cfg.mixed_precision]
        sel = select_layers(model, loader, ratio=cfg.remove_ratio, criterion=cfg.criterion, seed=cfg.seed,
                            device=accelerator.device, amp_dtype=amp, progress=cfg.progress)
        result = [sel.to_json()]
    result = broadcast_object_list(result)
    return {"criterion": result[0]["criterion"], "layers": list(result[0]["layers"]), "scores": result[0]}


def _loss_fn(cfg: RunConfig, mixup_active: bool):
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if mixup_active:
        return SoftTargetCrossEntropy()
    if cfg.smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
    return nn.CrossEntropyLoss()


def _optimizer_and_scheduler(cfg: RunConfig, model: nn.Module, lr: float):
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay)
    scheduler, _ = create_scheduler_v2(optimizer, sched=cfg.sched, num_epochs=cfg.epochs,
                                       warmup_epochs=cfg.warmup_epochs, warmup_lr=cfg.warmup_lr,
                                       min_lr=cfg.min_lr)
    return optimizer, scheduler


@dataclass
class TrainerState:
    """What --resume needs beyond Accelerate's state (JSON, never pickled)."""

    epoch: int = -1  # last completed epoch
    best_acc: float = -1.0
    best_epoch: int = -1
    best_source: str = "model"
    dense_acc: float | None = None
    deploy_acc_start: float | None = None
    layers: list[int] = field(default_factory=list)
    selection: dict[str, Any] = field(default_factory=dict)
    params_dense: int = 0
    attention_free: bool = False


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------

def run(cfg: RunConfig) -> dict[str, Any]:
    """Train (or, with ``cfg.eval``, evaluate) and return the summary dict."""
    if cfg.eval:
        return evaluate_checkpoint(cfg)
    out = Path(cfg.output_dir)
    state_dir = recover_dir(out / "state") if cfg.resume else None
    if cfg.resume and state_dir is None:
        raise ShrinkError(f"nothing to resume: {out / 'state'} does not exist")
    if not cfg.resume and ((out / "summary.json").exists() or recover_dir(out / "state")):
        raise ShrinkError(f"{out} already holds a run; pass --resume to continue it or choose another --output-dir")

    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
        log_with=cfg.log_with, project_dir=str(out),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
        cpu=not torch.cuda.is_available())
    set_seed(cfg.seed)
    main = accelerator.is_main_process
    ts = TrainerState()
    if cfg.resume:
        ts = TrainerState(**json.loads((state_dir / "trainer_state.json").read_text()))

    # --- everything that can fail on bad input happens before the output directory exists ---
    # the class count comes from the data (digits: 10; folders: one class per sub-folder of train/)
    num_classes = count_classes(cfg.data_set, cfg.data_path, default=cfg.num_classes or 10)
    model = build_model(cfg, num_classes)
    train_ds, calib_ds, val_ds = build_datasets(cfg, model)
    if not cfg.resume:
        layers_info = resolve_layers(cfg, model, calib_ds, accelerator)
        ts.layers, ts.selection = layers_info["layers"], layers_info["scores"]
        ts.selection.setdefault("criterion", layers_info["criterion"])
        ts.params_dense = count_params(model)
    val_loader = _loader(val_ds, cfg, train=False)
    teacher = copy.deepcopy(model).eval().requires_grad_(False) if cfg.distill else None
    if ts.layers:
        dilute(model, ts.layers)

    sampler = None
    if cfg.repeated_aug:
        from timm.data.distributed_sampler import RepeatAugSampler

        sampler = RepeatAugSampler(train_ds, num_replicas=accelerator.num_processes, rank=accelerator.process_index)
    train_loader = _loader(train_ds, cfg, train=True, sampler=sampler)
    steps_per_epoch = math.ceil(len(train_loader) / (1 if sampler else accelerator.num_processes) / cfg.grad_accum)
    if steps_per_epoch == 0:
        raise ShrinkError(f"the train split ({len(train_ds)} images) is smaller than one batch of {cfg.batch_size}")
    global_batch = cfg.batch_size * accelerator.num_processes * cfg.grad_accum
    lr = cfg.lr if cfg.lr is not None else cfg.blr * global_batch / 512

    def lam_at(epoch: int, step: int = 0) -> float:
        return lambda_at(cfg.lambda_schedule, epoch, step // cfg.grad_accum, steps_per_epoch, cfg.dilution_epochs)

    start_epoch = ts.epoch + 1
    if ts.layers and (ts.attention_free or lam_at(start_epoch) == 0.0):
        export(model, inplace=True)  # resuming inside the lambda = 0 phase
        ts.attention_free = True

    ema = None
    if cfg.model_ema:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=cfg.model_ema_decay)
    optimizer, scheduler = _optimizer_and_scheduler(cfg, model, lr)

    mixup_fn = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        from timm.data import Mixup

        mixup_fn = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, label_smoothing=cfg.smoothing,
                         num_classes=num_classes)
    loss_fn = _loss_fn(cfg, mixup_fn is not None)

    if cfg.compile:
        model = torch.compile(model)
    raw_loaders = (train_loader, val_loader)  # the phase switch prepares these again (prepared ones are sharded)
    if sampler is None:
        model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    else:
        model, optimizer, val_loader = accelerator.prepare(model, optimizer, val_loader)
    if teacher is not None:
        teacher.to(accelerator.device)

    if cfg.resume:
        accelerator.load_state(str(state_dir))
        if ema is not None and (state_dir / "ema.safetensors").exists():
            ema.module.load_state_dict(load_file(str(state_dir / "ema.safetensors")))
        _logger.info("resumed from %s at epoch %d", state_dir, start_epoch)
    else:
        raw = _plain(accelerator, model)
        ts.dense_acc = _eval(raw, val_loader, accelerator, cfg, "dense", deploy=False)
        if ts.layers:
            ts.deploy_acc_start = _eval(raw, val_loader, accelerator, cfg, "deploy@start", deploy=True)
        # inputs are good: now the output directory may be created
        if main:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            (out / "metrics.jsonl").unlink(missing_ok=True)
    if main and cfg.resume:
        _truncate_metrics(out / "metrics.jsonl", start_epoch)
    if cfg.log_with:
        accelerator.init_trackers("shrink", config={k: v for k, v in cfg.to_dict().items()
                                                    if isinstance(v, (int, float, str, bool))})
    accelerator.wait_for_everyone()

    t_run = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs):
        if ts.layers and not ts.attention_free and lam_at(epoch) == 0.0:
            model, optimizer, scheduler, train_loader, val_loader = _enter_attention_free_phase(
                accelerator, model, optimizer, cfg, lr, ema, raw_loaders, train_loader, sampler)
            ts.attention_free = True
        scheduler.step(epoch)
        if sampler is not None:
            sampler.set_epoch(epoch)
        elif hasattr(train_loader, "set_epoch"):
            train_loader.set_epoch(epoch)
        raw = _plain(accelerator, model)
        stats = train_one_epoch(
            model, train_loader, optimizer, accelerator, loss_fn, epoch=epoch, lambda_fn=lam_at, raw_model=raw,
            mixup_fn=mixup_fn, clip_grad=cfg.clip_grad, ema=ema, teacher=teacher,
            distill_alpha=cfg.distill_alpha, distill_tau=cfg.distill_tau, progress=cfg.progress)
        row: dict[str, Any] = {"epoch": epoch,
                               "lambda": (0.0 if ts.attention_free else stats.lam_end) if ts.layers else None,
                               "lr": stats.lr, "train_loss": stats.loss}
        last_epoch = epoch == cfg.epochs - 1
        if (epoch + 1) % cfg.eval_every == 0 or last_epoch:
            row["acc"] = _eval(raw, val_loader, accelerator, cfg, f"eval {epoch}", deploy=False)
            row["acc_deploy"] = _eval(raw, val_loader, accelerator, cfg, f"deploy {epoch}", deploy=True) \
                if ts.layers and not ts.attention_free else row["acc"]
            candidates = [("model", row["acc_deploy"], raw)]
            if ema is not None:
                row["ema_acc_deploy"] = _eval(ema.module, val_loader, accelerator, cfg, f"ema {epoch}", deploy=True)
                candidates.append(("ema", row["ema_acc_deploy"], ema.module))
            source, acc, best_model = max(candidates, key=lambda c: c[1])
            if acc > ts.best_acc:
                ts.best_acc, ts.best_epoch, ts.best_source = acc, epoch, source
                if main:
                    save(export(best_model), out / "best", extra={"epoch": epoch, "acc_deploy": acc,
                                                                  "source": source, "removed_layers": ts.layers})
        row["seconds"] = round(stats.seconds, 3)
        if main:
            save(export(raw), out / "last", extra={"epoch": epoch, "removed_layers": ts.layers})
            atomic_append_line(out / "metrics.jsonl", json.dumps(row))
        if cfg.log_with:
            accelerator.log({k: v for k, v in row.items() if v is not None}, step=epoch)
        ts.epoch = epoch
        _save_state(accelerator, out, ts, ema)
        if main:
            _logger.info("epoch %d: %s", epoch, row)

    summary = _finish(accelerator, cfg, ts, out, val_loader, time.perf_counter() - t_run)
    if cfg.log_with:
        accelerator.end_training()
    return summary


def _eval(model, loader, accelerator, cfg, desc, *, deploy: bool) -> float:
    if deploy:
        with deploy_mode(model):
            return evaluate(model, loader, accelerator, desc=desc, progress=cfg.progress)
    return evaluate(model, loader, accelerator, desc=desc, progress=cfg.progress)


def _enter_attention_free_phase(accelerator, model, optimizer, cfg, lr, ema, raw_loaders, train_loader, sampler):
    """lambda is 0 from now on: export in place and rebuild the optimizer and the DDP wrapper."""
    raw = _plain(accelerator, model)
    old_opt = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
    old_state = {p: old_opt.state[p] for g in old_opt.param_groups for p in g["params"] if p in old_opt.state}
    export(raw, inplace=True)
    if ema is not None:
        export(ema.module, inplace=True)
    new_opt, scheduler = _optimizer_and_scheduler(cfg, raw, lr)
    for g in new_opt.param_groups:
        for p in g["params"]:
            if p in old_state:
                new_opt.state[p] = old_state[p]
    train_raw, val_raw = raw_loaders
    accelerator.free_memory()
    model = torch.compile(raw) if cfg.compile else raw
    if sampler is None:
        model, new_opt, train_loader, val_loader = accelerator.prepare(model, new_opt, train_raw, val_raw)
    else:
        model, new_opt, val_loader = accelerator.prepare(model, new_opt, val_raw)
    _logger.info("lambda reached 0: attention removed from blocks %s; training the deployable model",
                 attention_free_indices(raw))
    return model, new_opt, scheduler, train_loader, val_loader


def _save_state(accelerator: Accelerator, out: Path, ts: TrainerState, ema) -> None:
    """Accelerate state + trainer_state.json into out/state, swapped in atomically."""
    tmp = out / ".state.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        atomic_write_json(tmp / "trainer_state.json", ts.__dict__)
        if ema is not None:
            sd = {k: v.detach().cpu().contiguous() for k, v in ema.module.state_dict().items()}
            atomic_write(tmp / "ema.safetensors", lambda p: save_file(sd, str(p)))
        replace_dir(tmp, out / "state")
    accelerator.wait_for_everyone()


def _truncate_metrics(path: Path, start_epoch: int) -> None:
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    keep = [r for r in rows if json.loads(r)["epoch"] < start_epoch]
    if len(keep) != len(rows):
        atomic_write_text(path, "".join(r + "\n" for r in keep))


def _finish(accelerator, cfg: RunConfig, ts: TrainerState, out: Path, val_loader, seconds: float) -> dict[str, Any]:
    """Evaluate the saved best model, write summary.json and the plot (main process)."""
    best_acc_reloaded = None
    params_after = None
    if (out / "best").is_dir():
        best = load(out / "best", device=accelerator.device)
        params_after = count_params(best)
        best_acc_reloaded = evaluate(best, val_loader, accelerator, desc="best", progress=cfg.progress)
    final = _read_metrics(out / "metrics.jsonl")
    summary = {
        "model": cfg.model, "data_set": cfg.data_set, "epochs": cfg.epochs,
        "removed_layers": ts.layers, "criterion": ts.selection.get("criterion"),
        "selection": ts.selection,
        "dense_acc": ts.dense_acc, "deploy_acc_start": ts.deploy_acc_start,
        "deploy_acc_best": ts.best_acc, "best_epoch": ts.best_epoch, "best_source": ts.best_source,
        "best_acc_reloaded": best_acc_reloaded,
        "final_acc": final[-1].get("acc") if final else None,
        "final_acc_deploy": final[-1].get("acc_deploy") if final else None,
        "params_dense": ts.params_dense, "params_deploy": params_after,
        "seconds_training": round(seconds, 1),
        "num_processes": accelerator.num_processes,
        "paths": {"summary": str(out / "summary.json"), "best": str(out / "best"), "last": str(out / "last"), "state": str(out / "state"),
                  "metrics": str(out / "metrics.jsonl"), "plot": str(out / "metrics.png"),
                  "config": str(out / "config.yaml")},
    }
    if accelerator.is_main_process:
        atomic_write_json(out / "summary.json", summary)
        plot_metrics(final, out / "metrics.png")
    accelerator.wait_for_everyone()
    return summary


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_metrics(rows: list[dict[str, Any]], path: Path) -> None:
    """PNG of lambda, train loss and both accuracies per epoch."""
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [r["epoch"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(ep, [r["lambda"] if r.get("lambda") is not None else float("nan") for r in rows], color="C3")
    axes[0].set(title="lambda", xlabel="epoch", ylim=(-0.05, 1.05))
    axes[1].plot(ep, [r["train_loss"] for r in rows], color="C0")
    axes[1].set(title="train loss", xlabel="epoch")
    ev = [r for r in rows if "acc" in r]
    axes[2].plot([r["epoch"] for r in ev], [r["acc"] for r in ev], label="acc @ current lambda")
    axes[2].plot([r["epoch"] for r in ev], [r["acc_deploy"] for r in ev], label="acc deployable (lambda=0)")
    if any("ema_acc_deploy" in r for r in ev):
        axes[2].plot([r["epoch"] for r in ev], [r.get("ema_acc_deploy") for r in ev], label="EMA deployable")
    axes[2].set(title="val top-1 (%)", xlabel="epoch")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110))
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Evaluation of a saved model (with and without ToMe)
# ----------------------------------------------------------------------------------------------

def evaluate_checkpoint(cfg: RunConfig) -> dict[str, Any]:
    """Accuracy of a saved model on the val split; with ``tome_r`` > 0 also with token merging."""
    model = load(cfg.checkpoint)
    val_ds = build_dataset(cfg.data_set, "val", data_path=cfg.data_path, input_size=cfg.input_size, model=model)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())
    loader = accelerator.prepare(_loader(val_ds, cfg, train=False))
    model = model.to(accelerator.device)
    result: dict[str, Any] = {"checkpoint": cfg.checkpoint, "params": count_params(model),
                              "attention_free_blocks": attention_free_indices(model) if hasattr(model, "blocks") else []}
    result["acc"] = evaluate(model, loader, accelerator, desc="eval", progress=cfg.progress)
    if cfg.tome_r > 0:
        from .tome import apply_tome, remove_tome, tome_token_counts

        apply_tome(model, r=cfg.tome_r, start_idx=cfg.tome_start_idx, policy=cfg.tome_policy)
        result["tome"] = {"r": cfg.tome_r, "start_idx": cfg.tome_start_idx, "policy": cfg.tome_policy}
        result["acc_tome"] = evaluate(model, loader, accelerator, desc="eval+tome", progress=cfg.progress)
        result["tokens_per_block"] = tome_token_counts(model)
        remove_tome(model)
    return result
