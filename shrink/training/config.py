"""One dataclass for a run, its validation, and the merging of its levels of settings.

Every field is a command-line flag (``remove_ratio`` -> ``--remove-ratio``) and a YAML key. This module
works on values already in memory: the command line and the YAML files are read at the edge
(:mod:`shrink.cli.run_flags`: ``build_parser``, ``load_yaml``, ``config_from_args``), which hands the
levels, defaults < the run's saved config.yaml < the --config file < flags, to :func:`resolve_settings`.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from shrink.blocks.dilution import SCHEDULES
from shrink.data.datasets import DATA_SETS
from shrink.errors import ShrinkError
from shrink.training.config_checks import (
    MAX_SEED,
    SCHEDS,
    check_types,
    check_values,
    name_of,
    tome_r_arg,
    tome_schedule_for,
    warn,
)
from shrink.values import THREADS_HELP, parse_layers

__all__ = ["MAX_SEED", "SCHEDS", "RunConfig", "check_settings", "coerce", "resolve_settings", "tome_r_arg",
           "tome_schedule_for"]


def _f(default: Any, help: str, **kw: Any) -> Any:
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class RunConfig:
    """A run's settings. The defaults are the embedded demo (vit_digits on digits, ~2 minutes on a CPU);
    configs/deit_*.yaml hold the reference's DeiT recipe."""

    # model
    model: str = _f("vit_digits", "timm model name (the project's models are registered too)", group="model")
    pretrained: bool = _f(True, "start from timm's pretrained weights (for vit_digits: the dense weights shipped "
                                "in models/weights; for hub names this needs network access)", group="model")
    finetune: str | None = _f(None, "start from a local checkpoint instead: DeiT .pth (weights under 'model'), "
                                    ".safetensors, or a directory written by shrink.save", group="model")
    num_classes: int | None = _f(None, "classes of the task head (default: from the data set)", group="model")
    drop_path: float = _f(0.0, "stochastic depth rate (DeiT recipe: 0.1)", group="model")
    drop_path_schedule: str = _f("linear", "drop path per block: linear (0 -> drop_path over the depth, timm's "
                                           "default; the reference for DeiT-T/S) | constant (drop_path in every "
                                           "block; the reference for DeiT-B)", group="model",
                                 choices=("linear", "constant"))
    # data (shrink.data.datasets: resolve_data_set, check_data_path)
    data_set: str = _f("digits", "digits | cifar10 | cifar100 | folder | synthetic", group="data", choices=DATA_SETS)
    data_path: str | None = _f(None, "root of the data set: DATA_PATH/train and DATA_PATH/val for 'folder'; the "
                                     "download folder for CIFAR", group="data")
    input_size: int | None = _f(None, "image side in pixels (default: the model's)", group="data")
    num_workers: int = _f(2, "data-loader worker processes", group="data")
    batch_size: int = _f(64, "images per process per step", group="data")
    repeated_aug: bool = _f(False, "repeated augmentation (x3, timm's RepeatAugSampler), as in DeiT", group="data")
    synthetic_images: int = _f(256, "images per split of --data-set synthetic (speed checks)", group="data")
    # removal
    remove_ratio: float = _f(0.0, "fraction of attention layers to remove, in [0, 1): k = round(ratio * depth) "
                                  "(0 = plain fine-tuning, no removal)", group="removal")
    remove_layers: list[int] | None = _f(None, "remove exactly these blocks, e.g. 0,1,3,4,6 (skips selection)",
                                         group="removal")
    criterion: str = _f("transfer_entropy", "selection criterion for --remove-ratio (see shrink.selection.layers)",
                        group="removal")
    calib_images: int = _f(512, "calibration images for layer selection (a fixed subset of the train split)",
                           group="removal")
    # lambda schedule
    lambda_schedule: str = _f("reference", "reference: max(0, 1 - epoch/E) per epoch; linear / cosine: per step",
                              group="lambda", choices=SCHEDULES)
    dilution_epochs: float = _f(25, "E: epochs over which lambda goes from 1 to 0 (reference: 299 of 400)",
                                group="lambda")
    # optimisation (timm factories)
    epochs: int = _f(40, "total epochs; lambda = 0 from epoch E on (reference: 400)", group="optim")
    opt: str = _f("adamw", "optimizer (timm.optim.create_optimizer_v2 name)", group="optim")
    lr: float | None = _f(1e-3, "learning rate; none = blr * global batch / 512 (the DeiT rule)", group="optim")
    blr: float = _f(5e-4, "base learning rate per 512 images", group="optim")
    weight_decay: float = _f(0.05, "weight decay (none on 1-D params, pos_embed, cls_token)", group="optim")
    sched: str = _f("cosine", "lr schedule (timm.scheduler.create_scheduler_v2 name), stepped per epoch",
                    group="optim")
    warmup_epochs: int = _f(3, "lr warm-up epochs (DeiT: 5)", group="optim")
    warmup_lr: float = _f(1e-6, "lr at the start of warm-up", group="optim")
    min_lr: float = _f(1e-5, "lr floor of the cosine schedule", group="optim")
    clip_grad: float | None = _f(None, "clip the gradient norm to this value", group="optim")
    grad_accum: int = _f(1, "gradient accumulation steps (Accelerate)", group="optim")
    # recipe
    smoothing: float = _f(0.1, "label smoothing", group="recipe")
    mixup: float = _f(0.0, "mixup alpha, 0 = off (DeiT: 0.8)", group="recipe")
    cutmix: float = _f(0.0, "cutmix alpha, 0 = off (DeiT: 1.0)", group="recipe")
    aa: str | None = _f("rand-m9-mstd0.5-inc1", "RandAugment policy for real images ('none' = off)",
                        group="recipe")
    color_jitter: float = _f(0.3, "colour jitter for real images", group="recipe")
    reprob: float = _f(0.25, "random erasing probability for real images", group="recipe")
    model_ema: bool = _f(False, "keep an EMA of the weights and evaluate it in deploy mode", group="recipe")
    model_ema_decay: float = _f(0.99996, "EMA decay", group="recipe")
    distill: bool = _f(False, "distil from the dense starting model (soft targets)", group="recipe")
    distill_alpha: float = _f(0.5, "weight of the distillation loss", group="recipe")
    distill_tau: float = _f(1.0, "distillation temperature", group="recipe")
    # run
    output_dir: str = _f("out/run", "where config.yaml, metrics.jsonl, summary.json, best/, last/, state/ go",
                         group="run")
    resume: bool = _f(False, "continue the run in --output-dir from its state/", group="run")
    seed: int = _f(0, "random seed", group="run")
    eval_every: int = _f(1, "evaluate every N epochs (and always at the last)", group="run")
    mixed_precision: str = _f("no", "no | fp16 | bf16 (Accelerate)", group="run", choices=("no", "fp16", "bf16"))
    compile: bool = _f(False, "torch.compile the model", group="run")
    log_with: str | None = _f(None, "Accelerate tracker: tensorboard | wandb", group="run")
    progress: bool = _f(True, "progress bars", group="run")
    threads: int | None = _f(None, THREADS_HELP, group="run")
    # evaluation only
    eval: bool = _f(False, "only evaluate --checkpoint on the val split", group="eval")
    checkpoint: str | None = _f(None, "model to evaluate: a directory written by shrink.save", group="eval")
    # token merging (shrink.merging.patch): the deployable model's merging, used by --eval and recorded by a training run
    tome_r: int = _f(0, "token merging (ToMe): r tokens merged per merging block, 0 = off. With --eval: the "
                        "checkpoint is also evaluated with merging. In a training run: with --tome-train every "
                        "forward merges; without it the run trains as usual and also reports the deployable model's "
                        "top-1 with merging at every evaluation (metrics.jsonl: acc_deploy_tome)", group="tome")
    tome_start_idx: int = _f(0, "first attention-bearing block (counted among those of the deployable model) that "
                                "merges", group="tome")
    tome_inflection: float = _f(0.0, "r per merging block as the official (r, inflection) ramp "
                                     "(shrink.merging.merge.ramp), in [-1, 1]: 0 = r in every merging block, "
                                     "-1 = from 2r down to 0, 1 = from 0 up to 2r", group="tome")
    tome_policy: str = _f("none", "ToMe in attention-free blocks: none (tokens pass, the reference) | hidden (merge "
                                  "before the MLP on norm2(x))", group="tome", choices=("none", "hidden"))
    tome_train: bool = _f(False, "also merge tokens while training, the 'trained with ToMe' setting: every forward "
                                 "of the run (train and every evaluation) merges with --tome-r/--tome-start-idx/"
                                 "--tome-policy (and --tome-inflection); best/ is chosen with merging and saved "
                                 "without it", group="tome")

    # ------------------------------------------------------------------------------------------
    def validate(self, origin: Mapping[str, str] | None = None, explicit: set[str] | None = None) -> RunConfig:
        """Check every value a user can get wrong, by type, range, choice and combination.

        Raises ShrinkError with one line that names the setting (``--lr`` for a flag, ``FILE: lr`` for a
        YAML value when ``origin`` says where it came from). Cheap checks only: files are looked at,
        the model is built on the meta device (no memory, no download) to check layers and input size.
        ``explicit`` lists the settings the user gave (flags or YAML); ``None`` means "not known".
        """
        check_types(self, origin or {})
        check_values(self, origin or {}, explicit)
        return self

    def model_kwargs(self, num_classes: int | None = None) -> dict[str, Any]:
        """The timm model kwargs these settings ask for: ``num_classes`` (``self.num_classes``, else the
        data's ``num_classes``; left out when neither is known), ``drop_path_rate``, ``img_size``. The one
        copy: the model a run builds and the skeleton its settings are checked on take the same kwargs."""
        kwargs: dict[str, Any] = {}
        classes = self.num_classes or num_classes
        if classes is not None:
            kwargs["num_classes"] = classes
        if self.drop_path:
            kwargs["drop_path_rate"] = self.drop_path
        if self.input_size is not None:
            kwargs["img_size"] = self.input_size
        return kwargs

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

# ----------------------------------------------------------------------------------------------
# Settings from text: coercion, a level's keys and types, the levels merged
# ----------------------------------------------------------------------------------------------

def _int_list(text: str) -> list[int]:
    try:
        return parse_layers(str(text), "value")
    except ShrinkError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None


def _optional(cast):
    def parse(text: str):
        if not str(text).strip():  # an unset shell variable ('--data-path $IMAGENET') is a mistake, not "none"
            raise ValueError("empty value (leave the flag out, or write none)")
        return None if str(text).lower() in ("none", "null") else cast(text)
    parse.__name__ = getattr(cast, "__name__", "value")
    return parse


def _float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise ValueError(f"invalid number {text!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"invalid number {text!r}: must be finite")
    return v


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"invalid integer {text!r}") from None


# a field's declared type -> its string-to-value coercion (raises ValueError with a one-line message);
# bool fields have none: a flag is --x / --no-x, a YAML value true / false
_COERCE = {"str": str, "int": _int, "float": _float, "str | None": _optional(str), "int | None": _optional(_int),
           "float | None": _optional(_float), "list[int] | None": _optional(_int_list)}


def coerce(field_type: str):
    """The string-to-value function of a RunConfig field type (``str`` for types without one)."""
    return _COERCE.get(str(field_type), str)


def check_settings(data: Any, where: str) -> dict[str, Any]:
    """One level of settings (a YAML file's mapping): keys known to RunConfig, strings coerced like flags.

    ``where`` names the level in the one-line errors (the file's path). Keys may use dashes.
    """
    if not isinstance(data, dict):
        raise ShrinkError(f"{where} must hold a mapping of settings (key: value lines)")
    bad_keys = [k for k in data if not isinstance(k, str)]
    if bad_keys:
        raise ShrinkError(f"{where}: setting names must be strings, got {bad_keys[0]!r}")
    types = {f.name: str(f.type) for f in dataclasses.fields(RunConfig)}
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - set(types))
    if unknown:
        raise ShrinkError(f"{where}: unknown setting(s) {', '.join(unknown)}")
    for k, v in data.items():  # YAML reads 1e-5 as a string: coerce strings like the command line does
        if isinstance(v, str) and types[k] not in ("str", "str | None") and types[k] in _COERCE:
            try:
                data[k] = _COERCE[types[k]](v)
            except ValueError:
                raise ShrinkError(f"{where}: {k}: cannot read {v!r} as {types[k]}") from None
        elif isinstance(v, str) and types[k] == "bool":
            raise ShrinkError(f"{where}: {k}: expected true or false, got {v!r}")
    return data


def _same_level_removal(values: Mapping[str, Any], where: str) -> None:
    ratio, layers = values.get("remove_ratio"), values.get("remove_layers")
    if layers is not None and ratio not in (None, 0, 0.0):
        raise ShrinkError(f"{where}: give remove_ratio or remove_layers, not both")


def resolve_settings(levels: Iterable[tuple[str, Mapping[str, Any]]]) -> RunConfig:
    """The validated RunConfig of ``levels``, lowest first, over the defaults: ``(where, settings)`` pairs,
    ``where`` the file a level came from, or ``"flag"`` for the command line.

    Every value, wherever it came from, passes the same checks (:meth:`RunConfig.validate`). A
    ``data_path`` without a data set given anywhere means ``data_set: folder`` (as in timm's train.py).
    Of remove_ratio and remove_layers the later level wins; both at one level is an error.
    """
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for where, level in levels:
        _same_level_removal(level, "command line" if where == "flag" else where)
        if "remove_layers" in level and level["remove_layers"] is not None:
            values["remove_ratio"] = 0.0  # a later level's layers replace an earlier ratio
        elif level.get("remove_ratio") not in (None, 0, 0.0):
            values["remove_layers"] = None
        values.update(level)
        origin.update({k: where for k in level})
    explicit = set(values)
    if "data_set" not in explicit and values.get("data_path") is not None:
        values["data_set"] = "folder"  # as in timm's train.py: a data path alone is an image folder
    if values.get("finetune") is not None and values.get("pretrained", True) and not values.get("resume"):
        values["pretrained"] = False  # --finetune gives the weights: config.yaml records what really happened
        if "pretrained" in explicit:
            warn(f"{name_of('pretrained', origin)} is ignored: --finetune {values['finetune']} gives the starting "
                  f"weights (recorded as pretrained: false)")
    try:
        cfg = RunConfig(**values)
    except TypeError as e:
        raise ShrinkError(str(e)) from None
    return cfg.validate(origin, explicit)


# The file and flag readers moved to shrink.cli.run_flags (this module reads no files and parses no flags);
# their old names answer here for one release (docs/architecture.md: old paths), with a PendingDeprecationWarning.
_MOVED = ("build_parser", "load_yaml", "config_from_args")


def __getattr__(name: str):
    if name in _MOVED:
        import importlib
        import warnings

        warnings.warn(f"shrink.training.config.{name} moved to shrink.cli.run_flags.{name}",
                      PendingDeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module("shrink.cli.run_flags"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
