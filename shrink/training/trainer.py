"""The whole run: model -> select layers -> dilute -> train with a lambda schedule -> export -> save.

Read :meth:`Trainer.fit` top to bottom. Everything that can fail on bad input is checked before any
weights are read; the output folder is created (with its ``config.yaml``) only once the model and
the data are known to be good. Everything that lives on a device reaches it through one function,
:func:`prepare_on_device`: at the start, and again when lambda reaches 0 for good and the model is
exported in place (the attention parameters leave the model and the optimizer, the last phase trains
the deployable network itself, and DDP never sees unused parameters). That switch happens at the
first optimizer update whose lambda is 0, at an epoch start or within an epoch, in the Trainer's own
loop (:meth:`Trainer.dilution_step`).

"best" is the best *deployable* model: the diluted blocks evaluated at lambda = 0, saved as an
attention-free model. A run resumes (``--resume``) from the state saved after its last completed
epoch, or after its set-up (:mod:`shrink.training.state`, :meth:`Trainer.restore`).

Token merging (``--tome-r``): the deployable model's merging schedule is fixed once
(:func:`shrink.training.evaluation.tome_setup`). With ``--tome-train`` it is applied to the training
model (after dilution) and to the EMA, so every forward merges, and again after the switch to the
attention-free model; best/ and last/ are saved without the ToMe classes, the settings recorded in
their config.json. Without ``--tome-train`` the run trains as usual and evaluates a merging copy of
the deployable model too.

Long because the Trainer is one class whose steps read in order (set-up, prepare, restore, the epoch
loop with its dilution step and the switch, evaluation, saving); the pieces that stand alone live in
:mod:`~shrink.training.state`, :mod:`~shrink.training.evaluation`, :mod:`~shrink.training.loop`.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import time
from typing import Any

import torch
import yaml
from accelerate.utils import DistributedType, set_seed
from torch import nn

from shrink.blocks.attention_free import attention_free_indices, export
from shrink.blocks.dilution import deploy_mode, dilute, lambda_at, set_lambda
from shrink.data.datasets import count_classes
from shrink.errors import ShrinkError
from shrink.introspect import num_params
from shrink.io import atomic_append_line, atomic_write_json, atomic_write_text, clean_leftovers
from shrink.merging.patch import apply_tome
from shrink.modelio.saved import save
from shrink.training import parts as recipe
from shrink.training.config import RunConfig
from shrink.training.evaluation import (
    deployable,
    evaluate_checkpoint,
    measure_best,
    merge_as_trained,
    run_summary,
    tome_extra,
    tome_setup,
)
from shrink.training.loop import (
    EpochMeter,
    EpochStats,
    TrainingDiverged,
    TrainParts,
    evaluate,
    make_accelerator,
    prepare_on_device,
    train_step,
)
from shrink.training.report import epoch_line, say, surprising_settings, weights_record
from shrink.training.run_folder import (
    check_resume_settings,
    check_shared_output_dir,
    create_run_dir,
    inspect_output_dir,
    remove_run_dir,
)
from shrink.training.sharding import export_for_training, whole_model
from shrink.training.state import (
    TrainerState,
    keep_bare_model_keys,
    read_trainer_state,
    restore_state,
    save_state,
    truncate_metrics,
)
from shrink.unwrap import unwrap
from shrink.values import apply_threads

_logger = logging.getLogger(__name__)


def run(cfg: RunConfig, trainer: type[Trainer] | None = None) -> dict[str, Any]:
    """Train (or, with ``cfg.eval``, evaluate) and return the summary dict.

    ``trainer``: a subclass of :class:`Trainer` to run instead (its seams, for tests and extensions)."""
    apply_threads(cfg.threads)
    if cfg.eval:
        return evaluate_checkpoint(cfg)
    return (trainer or Trainer)(cfg).fit()


class Trainer:
    """One training run of a :class:`RunConfig`: ``Trainer(cfg).fit()`` returns the summary dict.

    Seams (override in a subclass, hand it to :func:`run` or ``main_lambda.main(argv, trainer=...)``):

    * :meth:`build_loss` ``(mixup_active)``: the loss function of a training step (like Hugging Face
      Trainer's ``compute_loss``).
    * :meth:`evaluate` ``(model, desc)``: top-1 (%) on the val split; every evaluation of the run goes
      through it (``desc``: "dense", "deploy@start", "eval N", "deploy N", "deploy+tome N", "ema N",
      "best", "best+tome"); the caller has set lambda or deploy mode.
    * :meth:`train_epoch` ``(epoch)``: one epoch; :meth:`training_step` ``(images, targets, epoch, step)``:
      one micro-batch; :meth:`dilution_step` ``(epoch, update)``: the lambda schedule before each
      optimizer update, which calls :meth:`switch_to_attention_free` ``(epoch)`` when lambda reaches 0.
    * :meth:`save_state` / :meth:`restore`: the resumable state, saved and restored in one place each
      (the functions under them, for a state without a Trainer: :mod:`shrink.training.state`).

    After :meth:`prepare`: ``accelerator``, ``parts`` (:class:`TrainParts`: the prepared model, the bare
    model ``raw``, optimizer, loss, EMA, teacher), ``scheduler``, ``train_loader``, ``val_loader``,
    ``state`` (:class:`TrainerState`), ``out`` (the run's folder), ``tome`` (the merging settings or None).
    """

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.state = TrainerState()

    def fit(self) -> dict[str, Any]:
        """The run, top to bottom."""
        self.setup()                               # Accelerator, output folder, model, data; not on a device yet
        with self.discard_on_failure():            # a new run that completes no epoch leaves no folder behind
            self.prepare()                         # layers chosen and diluted, optimizer; onto the device
            if self.resumed:
                self.restore()                     # model, optimizer, RNG, EMA, best: from out/state
            self.report_settings()                 # settings that run but surprise: a warning line each
            if not self.resumed:
                self.evaluate_start()              # the dense and the deployable accuracy before training
                self.save_state()                  # the set-up is done: a kill from now on resumes here
            self.open_metrics()
            t_run = time.perf_counter()
            for epoch in range(self.state.epoch + 1, self.cfg.epochs):
                t_epoch = time.perf_counter()
                self.scheduler.step(epoch)         # the lr schedule (per epoch)
                stats = self.train_epoch(epoch)    # the dilution (lambda) schedule steps, the switch in it
                row = self.epoch_row(epoch, stats)
                if self.is_eval_epoch(epoch):
                    candidates = self.evaluate_epoch(epoch, row)  # the deployable (lambda = 0) model, EMA's
                    self.save_best(epoch, candidates)              # best/ when it beats the best so far
                self.save_last(epoch, row, stats)  # last/ and a line of metrics.jsonl
                self.state.epoch = epoch
                self.save_state()                  # what --resume continues from
                self.report_epoch(row, time.perf_counter() - t_epoch)
            return self.finish(time.perf_counter() - t_run)

    # --- Set-up: nothing here touches a device

    def setup(self) -> None:
        """The Accelerator, the output folder, the trainer state of a resume, the model and the data."""
        cfg = self.cfg
        self.run_dir = inspect_output_dir(cfg.output_dir, cfg.resume)
        self.changes = check_resume_settings(self.run_dir.saved_config, cfg.to_dict()) if cfg.resume else []
        self.out = self.run_dir.path
        self.accelerator = make_accelerator(cfg, self.out)
        self.main = self.accelerator.is_main_process
        keep_bare_model_keys(self.accelerator)
        if cfg.model_ema and self.accelerator.distributed_type == DistributedType.FSDP:
            raise ShrinkError("--model-ema is not supported with FSDP (the EMA would be a copy of a sharded model); "
                              "leave it out")
        set_seed(cfg.seed)  # the same on every process: model init, selection, data order
        if cfg.resume and self.main:
            for what in clean_leftovers(self.out) + clean_leftovers(self.out / "state"):
                _logger.info("%s: %s", self.out, what)
        self.accelerator.wait_for_everyone()
        self.resumed = (self.out / "state" / "trainer_state.json").is_file()
        self.state = read_trainer_state(self.out / "state", self.accelerator) if self.resumed else \
            TrainerState(num_processes=self.accelerator.num_processes)
        self.build_model_and_data()
        if self.main and not self.run_dir.started:
            create_run_dir(self.run_dir, yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    def build_model_and_data(self) -> None:
        """The model and the data sets (RunConfig.validate already checked the architecture on the meta device)."""
        cfg, n = self.cfg, self.accelerator.num_processes
        self.num_classes = count_classes(cfg.data_set, cfg.data_path, default=cfg.num_classes or 10)
        # resume: the state has the weights
        self.model = recipe.build_model(cfg, self.num_classes, download=not self.resumed or cfg.distill)
        if not self.resumed:
            self.state.weights, warning = weights_record(cfg, self.model, self.num_classes)
            if warning:
                self.warn(warning)
        self.train_ds, self.calib_ds, self.val_ds = recipe.build_datasets(cfg, self.model)
        if len(self.train_ds) < cfg.batch_size * n:
            raise ShrinkError(f"the train split ({len(self.train_ds)} images) is smaller than one batch of "
                              f"{cfg.batch_size} per process ({n} process(es))")

    @contextlib.contextmanager
    def discard_on_failure(self):
        """A new run that completed no epoch owns nothing worth keeping: on any failure the folder is left
        as it was found. A diverged loss says what was kept."""
        try:
            yield
        except BaseException as e:
            discard = self.main and not self.run_dir.started and self.state.epoch < 0
            if discard:
                remove_run_dir(self.run_dir)
            if isinstance(e, TrainingDiverged):
                kept = "nothing was kept" if discard else \
                    f"the state after epoch {self.state.epoch} is kept in {self.out / 'state'}"
                raise TrainingDiverged(f"{e}; stopping ({kept})", e.epoch, e.step) from None
            raise

    # --- Prepare: the layers, the optimizer, and everything onto the device

    def prepare(self) -> None:
        """Layers chosen (or taken from the state) and diluted, ToMe, optimizer and loss, then everything
        onto the device through :func:`prepare_on_device`; the EMA copies the prepared model."""
        cfg, ts, acc = self.cfg, self.state, self.accelerator
        check_shared_output_dir(self.out, acc)  # several machines: every process must see the same folder
        model, self.model = self.model, None  # from here on: self.parts.raw
        if not self.resumed:
            self.select_layers(model)
        teacher = copy.deepcopy(model).eval().requires_grad_(False) if cfg.distill else None  # the dense model
        if ts.layers:
            dilute(model, ts.layers)
        if ts.attention_free:
            export(model, inplace=True)
        self.tome = tome_setup(cfg, model, ts.layers)  # with --tome-train the model merges from here on
        self.lr = cfg.lr if cfg.lr is not None else cfg.blr * cfg.batch_size * acc.num_processes * cfg.grad_accum / 512
        optimizer, self.scheduler = recipe.build_optimizer(cfg, model, self.lr)
        mixup_fn = recipe.build_mixup(cfg, self.num_classes)
        self.parts = p = TrainParts(
            model=model, raw=model, optimizer=optimizer, loss_fn=self.build_loss(mixup_fn is not None),
            mixup_fn=mixup_fn, clip_grad=cfg.clip_grad, distill_alpha=cfg.distill_alpha, distill_tau=cfg.distill_tau)
        p.model, p.optimizer, (self.train_loader, self.val_loader) = prepare_on_device(
            acc, model, optimizer, recipe.make_loader(self.train_ds, cfg, train=True),
            recipe.make_loader(self.val_ds, cfg, train=False), compile=cfg.compile)
        p.raw = unwrap(acc.unwrap_model(p.model))  # the module that was prepared (sharded under FSDP)
        if cfg.model_ema:
            from timm.utils import ModelEmaV3

            p.ema = ModelEmaV3(p.raw, decay=cfg.model_ema_decay)  # a copy of the model already on the device
            merge_as_trained(cfg, self.tome, p.ema.module)
        if teacher is not None:
            p.teacher = teacher.to(acc.device)
        self.steps_per_epoch = math.ceil(len(self.train_loader) / cfg.grad_accum)  # updates per epoch, per process

    def select_layers(self, model: nn.Module) -> None:
        """Which blocks lose their attention (--remove-layers, or selected on the calibration images)."""
        ts, cfg = self.state, self.cfg
        ts.params_dense = num_params(model)
        info = recipe.resolve_layers(cfg, model, self.calib_ds, self.accelerator)
        ts.layers, ts.selection = info["layers"], info
        used = info.get("calib_images")
        if isinstance(used, int) and used < cfg.calib_images:
            self.warn(f"--calib-images {cfg.calib_images}: the train split has {len(self.calib_ds)} images, so the "
                      f"layer selection used {used} (summary.json: calib_images_used)")

    def build_loss(self, mixup_active: bool):
        """Seam: the loss function ``loss_fn(logits, targets)`` of a training step (without distillation)."""
        return recipe.build_loss(self.cfg, mixup_active)

    # --- State: saved and restored in one place each (shrink.training.state)

    def save_state(self) -> None:
        """Seam: Accelerate's state, the EMA and :class:`TrainerState` into out/state, swapped in atomically."""
        save_state(self.accelerator, self.out, self.state, self.parts.ema)

    def restore(self) -> None:
        """Seam: --resume, in one place. The model was built in the phase the state was saved in (its
        ``trainer_state.json``, read by :meth:`setup`); here the model, optimizer, grad scaler, RNG of every
        process, the EMA and a best/ newer than the state come back, and the allowed changed settings
        of this resume are recorded in config.yaml."""
        restore_state(self.accelerator, self.out / "state", self.state, self.parts.ema)
        if self.main:
            say(f"resumed after epoch {self.state.epoch} of {self.cfg.epochs}" if self.state.epoch >= 0 else
                f"resumed after the set-up (layer selection and the first evaluations), before epoch 0 of "
                f"{self.cfg.epochs}")
        if self.main and self.changes:
            atomic_write_text(self.out / "config.yaml", yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))
            _logger.info("resuming with changed settings: %s", ", ".join(self.changes))

    def open_metrics(self) -> None:
        """metrics.jsonl without the epochs this run does again; the trackers of --log-with."""
        cfg = self.cfg
        if self.main:
            truncate_metrics(self.out / "metrics.jsonl", self.state.epoch + 1)
        if cfg.log_with:
            self.accelerator.init_trackers("logs", config={k: v for k, v in cfg.to_dict().items()
                                                           if isinstance(v, (int, float, str, bool))})
        self.accelerator.wait_for_everyone()

    # --- Training: the Trainer owns the step, and with it the lambda schedule and the switch

    def train_epoch(self, epoch: int) -> EpochStats:
        """Seam: one epoch. Before each optimizer update the lambda schedule steps (:meth:`dilution_step`),
        which is where the model may change (the switch); every micro-batch is :meth:`training_step`."""
        acc = self.accelerator
        self.train_loader.set_epoch(epoch)
        meter = EpochMeter(self.train_loader, acc, f"epoch {epoch}", self.cfg.progress)
        self.parts.model.train()
        for step, (images, targets) in meter:
            if step % acc.gradient_accumulation_steps == 0:  # the first micro-batch of an optimizer update
                meter.lam = self.dilution_step(epoch, step // acc.gradient_accumulation_steps)
            meter.add(*self.training_step(images, targets, epoch, step))
        return meter.result(self.parts.optimizer)

    def training_step(self, images: torch.Tensor, targets: torch.Tensor, epoch: int, step: int):
        """Seam: one micro-batch (:func:`shrink.training.loop.train_step`): (loss, images, correct)."""
        return train_step(self.parts, images, targets, self.accelerator, epoch=epoch, step=step)

    def dilution_step(self, epoch: int, update: int) -> float | None:
        """Seam: the lambda schedule before optimizer update ``update`` of ``epoch``. At the first update
        whose lambda is 0 the model switches to attention-free (:meth:`switch_to_attention_free`);
        before it, lambda is set in the diluted blocks. Returns the lambda in force (None: no dilution)."""
        ts, cfg = self.state, self.cfg
        if not ts.layers:
            return None
        lam = lambda_at(cfg.lambda_schedule, epoch, update, self.steps_per_epoch, cfg.dilution_epochs)
        if lam == 0.0 and not ts.attention_free:
            self.switch_to_attention_free(epoch)
        if not ts.attention_free:
            set_lambda(self.parts.raw, lam)
        return 0.0 if ts.attention_free else lam

    def switch_to_attention_free(self, epoch: int) -> None:
        """Seam: lambda is 0 from now on. The attention leaves the model (and the EMA); a new optimizer over
        the remaining parameters (their state carried over) and the model are prepared again."""
        p = self.parts
        p.model, p.raw, p.optimizer = export_for_training(p.raw, p.optimizer,
                                                          lambda model: self._prepare_exported(model, epoch))
        if p.ema is not None:
            export(p.ema.module, inplace=True)
            merge_as_trained(self.cfg, self.tome, p.ema.module)
        self.state.attention_free = True
        _logger.info("lambda reached 0 at epoch %d: attention removed from blocks %s", epoch,
                     attention_free_indices(p.raw))

    def _prepare_exported(self, model: nn.Module, epoch: int):
        merge_as_trained(self.cfg, self.tome, model)  # the exported blocks are new objects: merge as before
        optimizer, self.scheduler = recipe.build_optimizer(self.cfg, model, self.lr)
        self.scheduler.step(epoch)
        prepared, optimizer, _ = prepare_on_device(self.accelerator, model, optimizer, compile=self.cfg.compile)
        return prepared, optimizer

    # --- Evaluation, best/ and last/

    def evaluate(self, model: nn.Module, desc: str) -> float:
        """Seam: top-1 (%) of ``model`` on the val split, as it is (lambda / deploy mode set by the caller)."""
        return evaluate(model, self.val_loader, self.accelerator, desc=desc, progress=self.cfg.progress)

    def evaluate_deployable(self, model: nn.Module, desc: str) -> float:
        """Top-1 (%) at lambda = 0 in every diluted block: what the exported model computes."""
        with deploy_mode(model):
            return self.evaluate(model, desc)

    def evaluate_start(self) -> None:
        """The dense and the deployable accuracy before training; then each process draws its own augmentations."""
        ts, raw = self.state, self.parts.raw
        ts.dense_acc = self.evaluate(raw, "dense")
        if ts.layers:
            ts.deploy_acc_start = self.evaluate_deployable(raw, "deploy@start")
        set_seed(self.cfg.seed, device_specific=True)

    def is_eval_epoch(self, epoch: int) -> bool:
        return (epoch + 1) % self.cfg.eval_every == 0 or epoch == self.cfg.epochs - 1

    @staticmethod
    def epoch_row(epoch: int, stats: EpochStats) -> dict[str, Any]:
        return {"epoch": epoch, "lambda": stats.lam, "lr": stats.lr, "train_loss": stats.loss, "train_acc": stats.acc}

    def evaluate_epoch(self, epoch: int, row: dict[str, Any]) -> list[tuple[str, float, nn.Module]]:
        """Accuracy at the current lambda and deployable (lambda = 0) into ``row``; returns the candidates
        for best/ as (source, deployable accuracy, model).

        With --tome-train the model (and the EMA) merge, so every accuracy is with merging; with --tome-r
        alone ``acc_deploy_tome`` is the deployable model's accuracy with merging (a merging copy of it)."""
        cfg, raw, ema = self.cfg, self.parts.raw, self.parts.ema
        row["acc"] = self.evaluate(raw, f"eval {epoch}")
        diluted = self.state.layers and not self.state.attention_free
        row["acc_deploy"] = self.evaluate_deployable(raw, f"deploy {epoch}") if diluted else row["acc"]
        if self.tome is not None and not cfg.tome_train:
            merging = deployable(whole_model(raw)).to(self.accelerator.device)  # under FSDP a collective
            apply_tome(merging, self.tome["r_per_block"], policy=cfg.tome_policy)
            row["acc_deploy_tome"] = self.evaluate(merging, f"deploy+tome {epoch}")
            del merging
        candidates = [("model", row["acc_deploy"], raw)]
        if ema is not None:
            row["ema_acc_deploy"] = self.evaluate_deployable(ema.module, f"ema {epoch}")
            candidates.append(("ema", row["ema_acc_deploy"], ema.module))
        return candidates

    def save_best(self, epoch: int, candidates: list[tuple[str, float, nn.Module]]) -> None:
        """best/: the best deployable model so far, attention-free (every process takes part under FSDP)."""
        ts = self.state
        source, acc, best_model = max(candidates, key=lambda c: c[1])
        if acc > ts.best_acc:
            ts.best_acc, ts.best_epoch, ts.best_source = acc, epoch, source
            whole = whole_model(best_model)  # under FSDP a collective: every process takes part
            if self.main:
                save(deployable(whole), self.out / "best", extra={
                    "epoch": epoch, "acc_deploy": acc, "source": source, "removed_layers": ts.layers,
                    "weights": ts.weights, **tome_extra(self.tome)})

    def save_last(self, epoch: int, row: dict[str, Any], stats: EpochStats) -> None:
        """last/ (the deployable model after this epoch) and the epoch's line of metrics.jsonl."""
        row["seconds"] = round(stats.seconds, 3)
        whole = whole_model(self.parts.raw)  # under FSDP a collective: every process takes part
        if self.main:
            save(deployable(whole), self.out / "last", extra={"epoch": epoch, "removed_layers": self.state.layers,
                                                              "weights": self.state.weights, **tome_extra(self.tome)})
            atomic_append_line(self.out / "metrics.jsonl", json.dumps(row))
        if self.cfg.log_with:
            self.accelerator.log({k: v for k, v in row.items() if v is not None}, step=epoch)

    def finish(self, seconds: float) -> dict[str, Any]:
        """Evaluate the saved best model, write summary.json and the plot (main process).

        ``best_acc_reloaded``: best/ reloaded from disk and evaluated the way it was chosen
        (:func:`shrink.training.evaluation.measure_best`)."""
        from shrink.training.metrics import plot_metrics, read_metrics

        cfg, out = self.cfg, self.out
        best = measure_best(cfg, out / "best", self.accelerator.device, self.evaluate, self.tome)
        final = read_metrics(out / "metrics.jsonl")
        summary = run_summary(cfg, self.state, out, final, best, self.accelerator.num_processes, seconds, self.tome)
        if self.main:
            atomic_write_json(out / "summary.json", summary)
            plot_metrics(final, out / "metrics.png", summary)
        self.accelerator.wait_for_everyone()
        if cfg.log_with:
            self.accelerator.end_training()
        return summary

    # --- What the run says

    def report_settings(self) -> None:
        """Settings that run but surprise (after the state loaded, so a resume that cannot load says only
        that): a warning each; the merging settings."""
        cfg = self.cfg
        for line in surprising_settings(cfg, self.state, self.lr):
            self.warn(line)
        if self.main and self.tome is not None:
            how = "in every forward of the run" if cfg.tome_train else \
                "in an extra evaluation of the deployable model (acc_deploy_tome)"
            say(f"token merging {how}: r per block {self.tome['r_per_block']}, tokens after each block "
                f"{self.tome['tokens_per_block']}")

    def report_epoch(self, row: dict[str, Any], seconds: float) -> None:
        if self.main:
            phase = "attention-free" if self.state.attention_free else "diluted" if self.state.layers else "dense"
            phase += " + ToMe" if self.cfg.tome_train else ""
            say(epoch_line(row, self.cfg.epochs, phase, seconds))

    def warn(self, line: str) -> None:
        """A surprise worth a line: logged once (main process), kept in the run's warnings (summary.json)."""
        if line in self.state.warnings:
            return
        self.state.warnings.append(line)
        if self.main:
            _logger.warning(line)
