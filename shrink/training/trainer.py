"""The whole run: model -> select layers -> dilute -> train with a lambda schedule -> export -> save.

Read :func:`run` top to bottom. Everything that can fail on bad input is checked before any
weights are read; the output folder is created (with its ``config.yaml``) only once the model and
the data are known to be good. Everything that lives on a device reaches it through one function,
:func:`_prepare`: at the start, and again when lambda reaches 0 for good and the model is exported
in place (the attention parameters leave the model and the optimizer, the last phase trains the
deployable network itself, and DDP never sees unused parameters). That switch happens at the
first optimizer update whose lambda is 0, at an epoch start or within an epoch.

"best" is the best *deployable* model: the diluted blocks evaluated at lambda = 0, saved as an
attention-free model. A run resumes (``--resume``) from the state saved after its last completed
epoch, or after its set-up; see :func:`_restore`.

Token merging (``--tome-r``): the deployable model's merging schedule (:func:`shrink.training.config.tome_schedule_for`)
is fixed once. With ``--tome-train`` it is applied to the training model (after dilution) and to the
EMA, so every forward merges, and again after the switch to the attention-free model; best/ and
last/ are saved without the ToMe classes, the settings recorded in their config.json. Without
``--tome-train`` the run trains as usual and evaluates a merging copy of the deployable model too.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs
from accelerate.utils import DistributedType, set_seed
from safetensors.torch import load_file, save_file
from torch import nn

from shrink.blocks.attention_free import attention_free_indices, export
from shrink.blocks.dilution import deploy_mode, dilute, lambda_at, set_lambda
from shrink.cli.runner import apply_threads
from shrink.data.datasets import build_dataset, count_classes
from shrink.errors import ShrinkError
from shrink.io import (
    atomic_append_line,
    atomic_write,
    atomic_write_json,
    atomic_write_text,
    clean_leftovers,
    replace_dir,
)
from shrink.merging.patch import apply_tome, is_tome, remove_tome, tome_token_counts
from shrink.modelio.create import load, read_config, save
from shrink.training.config import RunConfig, tome_r_arg, tome_schedule_for
from shrink.training.loop import TrainingDiverged, TrainParts, evaluate, train_one_epoch
from shrink.training.parts import (
    build_datasets,
    build_loss,
    build_mixup,
    build_model,
    build_optimizer,
    count_params,
    make_loader,
    resolve_layers,
)
from shrink.training.run_folder import (
    check_resume_settings,
    check_shared_output_dir,
    create_run_dir,
    inspect_output_dir,
    remove_run_dir,
)
from shrink.training.sharding import export_for_training, mark_shard_units, whole_model
from shrink.unwrap import unwrap

_logger = logging.getLogger(__name__)


@dataclass
class TrainerState:
    """What --resume needs beyond Accelerate's state (JSON, never pickled)."""

    epoch: int = -1  # last completed epoch (-1: the set-up is done, no epoch yet)
    best_acc: float = -1.0
    best_epoch: int = -1
    best_source: str = "model"
    dense_acc: float | None = None
    deploy_acc_start: float | None = None
    layers: list[int] = field(default_factory=list)
    selection: dict[str, Any] = field(default_factory=dict)
    params_dense: int = 0
    attention_free: bool = False  # the model was exported (lambda = 0 for good) when the state was saved
    num_processes: int = 1
    weights: dict[str, Any] = field(default_factory=dict)  # where the starting weights came from (_weights_record)
    warnings: list[str] = field(default_factory=list)  # the run's warnings, one line each, for summary.json


def run(cfg: RunConfig) -> dict[str, Any]:
    """Train (or, with ``cfg.eval``, evaluate) and return the summary dict."""
    apply_threads(cfg.threads)
    if cfg.eval:
        return evaluate_checkpoint(cfg)
    rd = inspect_output_dir(cfg.output_dir, cfg.resume)
    changes = check_resume_settings(rd.saved_config, cfg.to_dict()) if cfg.resume else []
    out = rd.path
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
        log_with=cfg.log_with, project_dir=str(out),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
        cpu=not torch.cuda.is_available())
    main = accelerator.is_main_process
    _save_bare_model_state(accelerator)
    if cfg.model_ema and accelerator.distributed_type == DistributedType.FSDP:
        raise ShrinkError("--model-ema is not supported with FSDP (the EMA would be a copy of a sharded model); "
                          "leave it out")
    set_seed(cfg.seed)  # the same on every process: model init, selection, data order
    if cfg.resume and main:
        for what in clean_leftovers(out) + clean_leftovers(out / "state"):
            _logger.info("%s: %s", out, what)
    accelerator.wait_for_everyone()
    state_dir = out / "state"
    resumed = (state_dir / "trainer_state.json").is_file()
    ts = _read_trainer_state(state_dir, accelerator) if resumed else TrainerState(num_processes=accelerator.num_processes)

    # --- the model and the data (RunConfig.validate already checked the architecture on the meta device)
    num_classes = count_classes(cfg.data_set, cfg.data_path, default=cfg.num_classes or 10)
    model = build_model(cfg, num_classes, download=not resumed or cfg.distill)  # resume: the state has the weights
    if not resumed:
        ts.weights = _weights_record(cfg, model, num_classes, ts, main)
    train_ds, calib_ds, val_ds = build_datasets(cfg, model)
    if len(train_ds) < cfg.batch_size * accelerator.num_processes:
        raise ShrinkError(f"the train split ({len(train_ds)} images) is smaller than one batch of {cfg.batch_size} "
                          f"per process ({accelerator.num_processes} process(es))")
    if main and not rd.started:
        create_run_dir(rd, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    try:
        check_shared_output_dir(out, accelerator)  # several machines: every process must see the same folder
        return _train(cfg, accelerator, out, ts, resumed, changes, model, num_classes, train_ds, calib_ds, val_ds)
    except BaseException as e:
        # a new run that completed no epoch owns nothing worth keeping: leave the folder as it was found
        discard = main and not rd.started and ts.epoch < 0
        if discard:
            remove_run_dir(rd)
        if isinstance(e, TrainingDiverged):
            kept = "nothing was kept" if discard else f"the state after epoch {ts.epoch} is kept in {state_dir}"
            raise TrainingDiverged(f"{e}; stopping ({kept})", e.epoch, e.step) from None
        raise


def _train(cfg, accelerator, out, ts, resumed, changes, model, num_classes, train_ds, calib_ds, val_ds) -> dict[str, Any]:
    main = accelerator.is_main_process
    if not resumed:
        ts.params_dense = count_params(model)
        info = resolve_layers(cfg, model, calib_ds, accelerator)
        ts.layers, ts.selection = info["layers"], info
        used = info.get("calib_images")
        if isinstance(used, int) and used < cfg.calib_images:
            _warn(ts, main, f"--calib-images {cfg.calib_images}: the train split has {len(calib_ds)} images, so the "
                            f"layer selection used {used} (summary.json: calib_images_used)")
    teacher = copy.deepcopy(model).eval().requires_grad_(False) if cfg.distill else None  # the dense model
    if ts.layers:
        dilute(model, ts.layers)
    if ts.attention_free:
        export(model, inplace=True)
    tome = _tome_setup(cfg, model, ts.layers)  # None without --tome-r; with --tome-train the model merges from here on

    global_batch = cfg.batch_size * accelerator.num_processes * cfg.grad_accum
    lr = cfg.lr if cfg.lr is not None else cfg.blr * global_batch / 512
    optimizer, scheduler = build_optimizer(cfg, model, lr)
    mixup_fn = build_mixup(cfg, num_classes)
    parts = TrainParts(model=model, raw=model, optimizer=optimizer, loss_fn=build_loss(cfg, mixup_fn is not None),
                       mixup_fn=mixup_fn, clip_grad=cfg.clip_grad,
                       distill_alpha=cfg.distill_alpha, distill_tau=cfg.distill_tau)
    parts.model, parts.optimizer, (train_loader, val_loader) = _prepare(
        accelerator, cfg, model, optimizer, make_loader(train_ds, cfg, train=True), make_loader(val_ds, cfg, train=False))
    parts.raw = unwrap(accelerator.unwrap_model(parts.model))  # the module that was prepared (sharded under FSDP)
    if cfg.model_ema:
        from timm.utils import ModelEmaV3

        parts.ema = ModelEmaV3(parts.raw, decay=cfg.model_ema_decay)  # a copy of the model already on the device
        _merge_as_trained(cfg, tome, parts.ema.module)
    if teacher is not None:
        parts.teacher = teacher.to(accelerator.device)
    steps_per_epoch = math.ceil(len(train_loader) / cfg.grad_accum)  # optimizer updates per epoch, per process

    if resumed:
        _restore(accelerator, out / "state", ts, parts.ema)
        if main:
            say(f"resumed after epoch {ts.epoch} of {cfg.epochs}" if ts.epoch >= 0 else
                f"resumed after the set-up (layer selection and the first evaluations), before epoch 0 of {cfg.epochs}")
    # settings that run but surprise (after the state loaded, so a resume that cannot load says only that)
    if ts.layers and not ts.attention_free and cfg.dilution_epochs >= cfg.epochs:
        _warn(ts, main, f"--dilution-epochs {cfg.dilution_epochs:g} >= --epochs {cfg.epochs}: lambda never reaches 0 in "
                        f"this run, so the attention-free model is never trained (best/ is the diluted model "
                        f"evaluated at lambda = 0)")
    if cfg.warmup_epochs >= cfg.epochs:
        _warn(ts, main, f"--warmup-epochs {cfg.warmup_epochs} >= --epochs {cfg.epochs}: the run ends inside the "
                        f"warm-up, so the learning rate never reaches {lr:.3g} (metrics.jsonl: lr)")
    if main and tome is not None:
        how = "in every forward of the run" if cfg.tome_train else \
            "in an extra evaluation of the deployable model (acc_deploy_tome)"
        say(f"token merging {how}: r per block {tome['r_per_block']}, tokens after each block "
            f"{tome['tokens_per_block']}")
    if main and changes:  # the state loaded: record the allowed changes (more epochs, ...) of this resume
        atomic_write_text(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        _logger.info("resuming with changed settings: %s", ", ".join(changes))
    if not resumed:
        ts.dense_acc = _eval(parts.raw, val_loader, accelerator, cfg, "dense", deploy=False)
        if ts.layers:
            ts.deploy_acc_start = _eval(parts.raw, val_loader, accelerator, cfg, "deploy@start", deploy=True)
        set_seed(cfg.seed, device_specific=True)  # from here on each process draws its own augmentations
        _save_state(accelerator, out, ts, parts.ema)  # the set-up is done: a kill from now on resumes here
    if main:
        _truncate_metrics(out / "metrics.jsonl", ts.epoch + 1)
    if cfg.log_with:
        accelerator.init_trackers("logs", config={k: v for k, v in cfg.to_dict().items()
                                                  if isinstance(v, (int, float, str, bool))})
    accelerator.wait_for_everyone()

    def switch_to_attention_free(epoch: int) -> None:
        """lambda is 0 from now on: the attention leaves the model (and the EMA), training goes on."""
        nonlocal scheduler

        def prepare(model: nn.Module):
            nonlocal scheduler
            _merge_as_trained(cfg, tome, model)  # the exported blocks are new objects: merge as before the switch
            optimizer, scheduler = build_optimizer(cfg, model, lr)
            scheduler.step(epoch)
            prepared, optimizer, _ = _prepare(accelerator, cfg, model, optimizer)
            return prepared, optimizer

        parts.model, parts.raw, parts.optimizer = export_for_training(parts.raw, parts.optimizer, prepare)
        if parts.ema is not None:
            export(parts.ema.module, inplace=True)
            _merge_as_trained(cfg, tome, parts.ema.module)
        ts.attention_free = True
        _logger.info("lambda reached 0 at epoch %d: attention removed from blocks %s", epoch,
                     attention_free_indices(parts.raw))

    t_run = time.perf_counter()
    for epoch in range(ts.epoch + 1, cfg.epochs):
        t_epoch = time.perf_counter()
        scheduler.step(epoch)

        def before_step(update: int, epoch: int = epoch) -> float | None:
            if not ts.layers:
                return None
            lam = lambda_at(cfg.lambda_schedule, epoch, update, steps_per_epoch, cfg.dilution_epochs)
            if lam == 0.0 and not ts.attention_free:
                switch_to_attention_free(epoch)
            if not ts.attention_free:
                set_lambda(parts.raw, lam)
            return 0.0 if ts.attention_free else lam

        train_loader.set_epoch(epoch)
        stats = train_one_epoch(parts, train_loader, accelerator, epoch=epoch, before_step=before_step,
                                progress=cfg.progress)
        row: dict[str, Any] = {"epoch": epoch, "lambda": stats.lam, "lr": stats.lr, "train_loss": stats.loss,
                               "train_acc": stats.acc}
        if (epoch + 1) % cfg.eval_every == 0 or epoch == cfg.epochs - 1:
            _evaluate_epoch(cfg, accelerator, parts, val_loader, ts, epoch, row, out, tome)
        row["seconds"] = round(stats.seconds, 3)
        whole = whole_model(parts.raw)  # under FSDP a collective: every process takes part
        if main:
            save(deployable(whole), out / "last", extra={"epoch": epoch, "removed_layers": ts.layers,
                                                         "weights": ts.weights, **_tome_extra(tome)})
            atomic_append_line(out / "metrics.jsonl", json.dumps(row))
        if cfg.log_with:
            accelerator.log({k: v for k, v in row.items() if v is not None}, step=epoch)
        ts.epoch = epoch
        _save_state(accelerator, out, ts, parts.ema)
        if main:
            phase = "attention-free" if ts.attention_free else "diluted" if ts.layers else "dense"
            phase += " + ToMe" if cfg.tome_train else ""
            say(epoch_line(row, cfg.epochs, phase, time.perf_counter() - t_epoch))

    summary = _finish(accelerator, cfg, ts, out, val_loader, time.perf_counter() - t_run, tome)
    if cfg.log_with:
        accelerator.end_training()
    return summary


def say(line: str) -> None:
    """One line of a run's report on stdout (around the progress bars, which are on stderr)."""
    from tqdm.auto import tqdm

    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()


def epoch_line(row: dict[str, Any], epochs: int, phase: str, seconds: float) -> str:
    """The one line printed after each epoch: epoch, phase, lambda, loss, top-1 on the training batches /
    at the current lambda / deployable (lambda = 0; and the EMA's), lr, wall seconds of the epoch."""
    def pct(key: str) -> str:
        v = row.get(key)
        return "-" if v is None else f"{v:.2f}"

    lam = row.get("lambda")
    ema = f" ema {pct('ema_acc_deploy')}" if "ema_acc_deploy" in row else ""
    tome = f" (with ToMe {pct('acc_deploy_tome')})" if "acc_deploy_tome" in row else ""
    return (f"epoch {row['epoch']}/{epochs} {phase}: lambda {'-' if lam is None else f'{lam:.3f}'}, "
            f"loss {row['train_loss']:.4f}, top-1 train {pct('train_acc')} eval {pct('acc')} "
            f"deployable {pct('acc_deploy')}{tome}{ema}, lr {row['lr']:.3g}, {seconds:.1f} s")


def _warn(ts: TrainerState, main: bool, line: str) -> None:
    """A surprise worth a line: printed once (main process), kept in the run's warnings (summary.json)."""
    if line in ts.warnings:
        return
    ts.warnings.append(line)
    if main:
        _logger.warning(line)


def _weights_record(cfg: RunConfig, model: nn.Module, num_classes: int, ts: TrainerState, main: bool) -> dict:
    """Where the starting weights came from (summary.json, best/ and last/ config.json): ``pretrained``
    (timm's weights), ``finetune`` (--finetune PATH) or ``random``; and whether the classifier head was
    re-initialised because the class count differs (a warning too)."""
    if cfg.finetune is not None:
        rec = {"pretrained": False, "source": "finetune", "path": str(cfg.finetune)}
        reinit = list(getattr(model, "shrink_head_reinitialised", []))
        had = "the --finetune checkpoint's"
    elif cfg.pretrained:
        pc = getattr(model, "pretrained_cfg", None) or {}
        where = pc.get("hf_hub_id") or pc.get("url") or pc.get("file")
        rec = {"pretrained": True, "source": "pretrained", "path": str(where) if where else None}
        n = pc.get("num_classes")
        reinit = ["head"] if isinstance(n, int) and n > 0 and n != num_classes else []
        had = f"the pretrained {n}-class"
    else:
        rec, reinit, had = {"pretrained": False, "source": "random", "path": None}, [], ""
    rec["head_reinitialised"] = bool(reinit)
    if reinit:
        _warn(ts, main, f"{had} classifier head does not fit the {num_classes} classes of the data: it starts "
                        f"re-initialised ({', '.join(reinit)})")
    return rec


def _prepare(accelerator: Accelerator, cfg: RunConfig, raw: nn.Module, optimizer, *loaders):
    """The one path by which the training objects reach the device: at the start (with the loaders)
    and at the switch to the attention-free model (model and optimizer only; the loaders stay)."""
    accelerator.free_memory()  # forget the objects of the previous phase (their DDP wrapper, optimizer)
    mark_shard_units(raw, getattr(accelerator.state, "fsdp_plugin", None))  # FSDP: each block its own unit
    model = torch.compile(raw) if cfg.compile else raw
    model, optimizer, *loaders = accelerator.prepare(model, optimizer, *loaders)
    return model, optimizer, loaders


def _eval(model, loader, accelerator, cfg, desc, *, deploy: bool) -> float:
    if deploy:
        with deploy_mode(model):
            return evaluate(model, loader, accelerator, desc=desc, progress=cfg.progress)
    return evaluate(model, loader, accelerator, desc=desc, progress=cfg.progress)


def _evaluate_epoch(cfg, accelerator, parts: TrainParts, val_loader, ts: TrainerState, epoch: int,
                    row: dict[str, Any], out: Path, tome: dict[str, Any] | None = None) -> None:
    """Accuracy at the current lambda and deployable (lambda = 0); keep the best deployable model.

    With --tome-train the model (and the EMA) merge, so every accuracy is with merging; with --tome-r
    alone ``acc_deploy_tome`` is the deployable model's accuracy with merging (a merging copy of it)."""
    raw = parts.raw
    row["acc"] = _eval(raw, val_loader, accelerator, cfg, f"eval {epoch}", deploy=False)
    diluted = ts.layers and not ts.attention_free
    row["acc_deploy"] = _eval(raw, val_loader, accelerator, cfg, f"deploy {epoch}", deploy=True) if diluted \
        else row["acc"]
    if tome is not None and not cfg.tome_train:
        merging = deployable(whole_model(raw)).to(accelerator.device)  # under FSDP a collective, as below
        apply_tome(merging, tome["r_per_block"], policy=cfg.tome_policy)
        row["acc_deploy_tome"] = evaluate(merging, val_loader, accelerator, desc=f"deploy+tome {epoch}",
                                          progress=cfg.progress)
        del merging
    candidates = [("model", row["acc_deploy"], raw)]
    if parts.ema is not None:
        row["ema_acc_deploy"] = _eval(parts.ema.module, val_loader, accelerator, cfg, f"ema {epoch}", deploy=True)
        candidates.append(("ema", row["ema_acc_deploy"], parts.ema.module))
    source, acc, best_model = max(candidates, key=lambda c: c[1])
    if acc > ts.best_acc:
        ts.best_acc, ts.best_epoch, ts.best_source = acc, epoch, source
        whole = whole_model(best_model)  # under FSDP a collective: every process takes part
        if accelerator.is_main_process:
            save(deployable(whole), out / "best", extra={"epoch": epoch, "acc_deploy": acc, "source": source,
                                                         "removed_layers": ts.layers, "weights": ts.weights,
                                                         **_tome_extra(tome)})


# ----------------------------------------------------------------------------------------------
# Token merging in a run (--tome-r, --tome-train)
# ----------------------------------------------------------------------------------------------

def _tome_setup(cfg: RunConfig, model: nn.Module, layers: list[int]) -> dict[str, Any] | None:
    """The run's merging settings (None without --tome-r): the deployable model's r per block and the
    tokens left after each block. With --tome-train the (diluted) model merges from here on."""
    if cfg.tome_r <= 0:
        return None
    schedule = tome_schedule_for(cfg, model, layers)
    tome = {"r": cfg.tome_r, "inflection": cfg.tome_inflection, "start_idx": cfg.tome_start_idx,
            "policy": cfg.tome_policy, "train": cfg.tome_train, "r_per_block": schedule}
    apply_tome(model, schedule, policy=cfg.tome_policy)  # after dilution (a ToMe model refuses to be diluted)
    tome["tokens_per_block"] = tome_token_counts(model)  # the same at every lambda: r per block is fixed
    if not cfg.tome_train:
        remove_tome(model)
    _logger.info("token merging (%s): r per block %s, tokens after each block %s",
                 "training" if cfg.tome_train else "evaluation", schedule, tome["tokens_per_block"])
    return tome


def _merge_as_trained(cfg: RunConfig, tome: dict[str, Any] | None, model: nn.Module) -> None:
    """With --tome-train: ``model`` (the EMA, a newly exported model) merges with the run's schedule."""
    if cfg.tome_train and tome is not None:
        apply_tome(model, tome["r_per_block"], policy=cfg.tome_policy)


def _tome_extra(tome: dict[str, Any] | None) -> dict[str, Any]:
    """The merging settings recorded in best/ and last/ config.json (``extra.tome``)."""
    if tome is None:
        return {}
    return {"tome": {k: tome[k] for k in ("r", "inflection", "start_idx", "policy", "train", "r_per_block",
                                          "tokens_per_block")}}


def deployable(model: nn.Module) -> nn.Module:
    """The attention-free copy of ``model`` that best/ and last/ hold: exported, without ToMe classes."""
    out = export(model)
    if is_tome(out):
        remove_tome(out)
    return out


# ----------------------------------------------------------------------------------------------
# State: saved after the set-up and after every epoch; restored in one place
# ----------------------------------------------------------------------------------------------

def _save_state(accelerator: Accelerator, out: Path, ts: TrainerState, ema) -> None:
    """Accelerate state + trainer_state.json (+ ema.safetensors) into out/state, swapped in atomically."""
    tmp = out / ".state.tmp"
    if accelerator.is_main_process and tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if ema is not None:
            sd = {k: v.detach().cpu().contiguous() for k, v in ema.module.state_dict().items()}
            atomic_write(tmp / "ema.safetensors", lambda p: save_file(sd, str(p)))
        atomic_write_json(tmp / "trainer_state.json", asdict(ts))  # last: its presence marks a whole state
        replace_dir(tmp, out / "state")
    accelerator.wait_for_everyone()


def _strip_wrappers(key: str) -> str:
    while key.startswith(_WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def _save_bare_model_state(accelerator: Accelerator) -> None:
    """``state/model.safetensors`` holds the bare model's keys, whatever wraps it (torch.compile, DDP), and
    loads into the bare model through :func:`load_state_tensors` (onto ``accelerator.device``; keys of
    older states lose their wrapper prefixes), so a resume may switch ``--compile`` on or off. Under
    FSDP Accelerate saves and loads the sharded model its own way."""
    if accelerator.distributed_type == DistributedType.FSDP:
        return

    def on_save(models, weights, output_dir) -> None:
        for i, sd in enumerate(weights):
            weights[i] = {_strip_wrappers(k): v for k, v in sd.items()}

    def on_load(models, input_dir) -> None:  # the weights go through load_state_tensors, as the EMA's do
        for i, model in enumerate(list(models)):
            path = Path(input_dir) / f"model{f'_{i}' if i else ''}.safetensors"
            if path.is_file():
                unwrap(accelerator.unwrap_model(model)).load_state_dict(load_state_tensors(path, accelerator.device))
                models.remove(model)  # loaded: Accelerate goes on with the optimizer, scaler and RNG states

    accelerator.register_save_state_pre_hook(on_save)
    accelerator.register_load_state_pre_hook(on_load)


def _read_trainer_state(state_dir: Path, accelerator: Accelerator) -> TrainerState:
    path = state_dir / "trainer_state.json"
    try:
        data = json.loads(path.read_text())
        known = {f.name for f in fields(TrainerState)}
        ts = TrainerState(**{k: v for k, v in data.items() if k in known})
        if not isinstance(ts.epoch, int) or not isinstance(ts.layers, list) or \
                not all(isinstance(i, int) for i in ts.layers):
            raise ValueError("wrong types")
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise ShrinkError(f"cannot resume: {path} is damaged ({str(e).splitlines()[0] if str(e) else e!r})") from None
    if ts.num_processes != accelerator.num_processes:
        raise ShrinkError(f"cannot resume: the run was saved by {ts.num_processes} process(es) and this one has "
                          f"{accelerator.num_processes}; launch it with --num_processes {ts.num_processes}")
    return ts


def _restore(accelerator: Accelerator, state_dir: Path, ts: TrainerState, ema) -> None:
    """Load Accelerate's state (model, optimizer, scaler, RNG of every process) and the EMA.

    The model must already be in the phase the state was saved in (diluted, or attention-free when
    ``ts.attention_free``); a switch due in the next epoch happens in the loop, as in an
    uninterrupted run. Any file that does not load stops the resume with one line.
    """
    from accelerate.utils.other import load as accelerate_load

    rng = state_dir / f"random_states_{accelerator.process_index}.pkl"
    try:  # Accelerate skips an unreadable RNG file silently; a resume must not continue with other randomness
        states = accelerate_load(str(rng))  # weights_only=True with Accelerate's allow-list
        if not {"random_state", "numpy_random_seed", "torch_manual_seed"} <= set(states):
            raise ValueError("keys missing")
    except Exception as e:  # noqa: BLE001 - any failure to read it is a damaged state
        raise ShrinkError(f"cannot resume: {rng} does not load ({_first_line(e)})") from None
    try:
        accelerator.load_state(str(state_dir))
    except Exception as e:  # noqa: BLE001 - torch / safetensors raise many types on damaged files
        raise ShrinkError(f"cannot resume from {state_dir}: {_first_line(e)}") from None
    if ema is not None:
        path = state_dir / "ema.safetensors"
        try:
            ema.module.load_state_dict(load_state_tensors(path, accelerator.device))
        except Exception as e:  # noqa: BLE001
            raise ShrinkError(f"cannot resume: {path} does not load ({_first_line(e)})") from None
    best = state_dir.parent / "best"
    if (best / "config.json").is_file():  # best/ may be newer than the state (kill between the two writes)
        extra = read_config(best).get("extra", {})
        if isinstance(extra.get("acc_deploy"), (int, float)) and extra["acc_deploy"] > ts.best_acc:
            ts.best_acc, ts.best_epoch = float(extra["acc_deploy"]), int(extra.get("epoch", ts.best_epoch))
            ts.best_source = str(extra.get("source", ts.best_source))
    _logger.info("resumed from %s after epoch %d", state_dir, ts.epoch)


_WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # torch.compile's and DDP's, in states of older versions


def load_state_tensors(path: Path, device: torch.device | str) -> dict[str, torch.Tensor]:
    """The one reader of the weights a resume loads (``state/model.safetensors``, ``state/ema.safetensors``):
    safetensors, read on the CPU and moved to ``device`` (``accelerator.device``; safetensors itself
    refuses names such as ``cpu:0`` that a multi-process CPU run has), wrapper prefixes removed from the
    keys (torch.compile's ``_orig_mod.``, DDP's ``module.``, in states of older versions)."""
    return {_strip_wrappers(k): v.to(device) for k, v in load_file(str(path), device="cpu").items()}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _truncate_metrics(path: Path, start_epoch: int) -> None:
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    keep = [r for r in rows if json.loads(r)["epoch"] < start_epoch]
    if len(keep) != len(rows):
        atomic_write_text(path, "".join(r + "\n" for r in keep))


def _finish(accelerator, cfg: RunConfig, ts: TrainerState, out: Path, val_loader, seconds: float,
            tome: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate the saved best model, write summary.json and the plot (main process).

    ``best_acc_reloaded`` is best/ reloaded from disk and evaluated the way it was chosen (with merging
    under --tome-train, applied as ``main_lambda.py --eval --tome-r ...`` applies it); with --tome-r
    the summary also has ``best_acc_with_tome`` and ``best_acc_without_tome``."""
    from shrink.training.metrics import plot_metrics, read_metrics

    best_acc_reloaded = params_after = None
    with_tome = without_tome = None
    if (out / "best").is_dir():
        best = load(out / "best", device=accelerator.device)
        params_after = count_params(best)
        without_tome = evaluate(best, val_loader, accelerator, desc="best", progress=cfg.progress)
        if tome is not None:  # exactly what --eval --checkpoint best --tome-r ... does
            apply_tome(best, tome_r_arg(cfg), cfg.tome_start_idx, cfg.tome_policy)
            with_tome = evaluate(best, val_loader, accelerator, desc="best+tome", progress=cfg.progress)
        best_acc_reloaded = with_tome if cfg.tome_train else without_tome
    final = read_metrics(out / "metrics.jsonl")
    summary = {
        "kind": "train",
        "model": cfg.model, "data_set": cfg.data_set, "epochs": cfg.epochs,
        "removed_layers": ts.layers, "criterion": ts.selection.get("criterion"),
        "selection": ts.selection,
        "dense_acc": ts.dense_acc, "deploy_acc_start": ts.deploy_acc_start,
        "deploy_acc_best": ts.best_acc if ts.best_epoch >= 0 else None, "best_epoch": ts.best_epoch,
        "best_source": ts.best_source, "best_acc_reloaded": best_acc_reloaded,
        "tome": None if tome is None else {k: v for k, v in tome.items() if k != "tokens_per_block"},
        "tokens_per_block": None if tome is None else tome["tokens_per_block"],
        "final_acc": final[-1].get("acc") if final else None,
        "final_acc_deploy": final[-1].get("acc_deploy") if final else None,
        "params_dense": ts.params_dense, "params_deploy": params_after,
        "seconds_training": round(seconds, 1),
        "num_processes": accelerator.num_processes,
        "pretrained": ts.weights.get("pretrained"), "weights": ts.weights,
        "calib_images_used": ts.selection.get("calib_images"),
        "warnings": ts.warnings,
        **({"best_acc_with_tome": with_tome, "best_acc_without_tome": without_tome} if tome is not None else {}),
        "paths": {"summary": str(out / "summary.json"), "best": str(out / "best"), "last": str(out / "last"),
                  "state": str(out / "state"), "metrics": str(out / "metrics.jsonl"), "plot": str(out / "metrics.png"),
                  "config": str(out / "config.yaml")},
    }
    if accelerator.is_main_process:
        atomic_write_json(out / "summary.json", summary)
        plot_metrics(final, out / "metrics.png", summary)
    accelerator.wait_for_everyone()
    return summary


# ----------------------------------------------------------------------------------------------
# Evaluation of a saved model (with and without ToMe)
# ----------------------------------------------------------------------------------------------

def evaluate_checkpoint(cfg: RunConfig) -> dict[str, Any]:
    """Accuracy of a saved model on the val split; with ``tome_r`` > 0 also with token merging."""
    model = load(cfg.checkpoint)
    # the size, crop, mean / std the model was saved with (its config.json data_config), unless overridden
    val_ds = build_dataset(cfg.data_set, "val", data_path=cfg.data_path, input_size=cfg.input_size, model=model,
                           synthetic_size=cfg.synthetic_images, num_classes=cfg.num_classes)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=not torch.cuda.is_available())
    loader = accelerator.prepare(make_loader(val_ds, cfg, train=False))
    model = accelerator.prepare_model(model, evaluation_mode=True)
    raw = unwrap(model)
    result: dict[str, Any] = {"kind": "eval", "checkpoint": cfg.checkpoint, "params": count_params(raw),
                              "images": len(val_ds),
                              "attention_free_blocks": attention_free_indices(raw) if hasattr(raw, "blocks") else []}
    result["acc"] = evaluate(model, loader, accelerator, desc="eval", progress=cfg.progress)
    if cfg.tome_r > 0:
        apply_tome(raw, r=tome_r_arg(cfg), start_idx=cfg.tome_start_idx, policy=cfg.tome_policy)
        result["tome"] = {"r": cfg.tome_r, "inflection": cfg.tome_inflection, "start_idx": cfg.tome_start_idx,
                          "policy": cfg.tome_policy}
        result["acc_tome"] = evaluate(model, loader, accelerator, desc="eval+tome", progress=cfg.progress)
        result["tokens_per_block"] = tome_token_counts(raw)
        remove_tome(raw)
    return result
