"""One dataclass for a run: defaults < YAML file (--config) < command-line flags, then validation.

Every field is a command-line flag (``remove_ratio`` -> ``--remove-ratio``) and a YAML key.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from shrink.blocks.dilution import SCHEDULES
from shrink.cli.runner import MAX_THREADS, THREADS_HELP, OneLineArgumentParser, parse_layers
from shrink.data.datasets import DATA_SETS
from shrink.errors import ShrinkError


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
        _check_types(self, origin or {})
        _check_values(self, origin or {}, explicit)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------

# timm 1.0's create_scheduler_v2 names (it has no list function)
SCHEDS = ("cosine", "tanh", "step", "constant", "multistep", "plateau", "poly", "wsd", "rsqrt")
MAX_SEED = 2**32 - 1  # numpy's seed range (Accelerate's set_seed seeds numpy too)
_BIG = 1 << 20  # no image side, class count or image count of a sane run is this large

# name -> (low, high, low_inclusive, high_inclusive); None = unbounded
_RANGES: dict[str, tuple[float | None, float | None, bool, bool]] = {
    "num_classes": (1, _BIG, True, True), "drop_path": (0, 1, True, False), "input_size": (1, 16384, True, True),
    "num_workers": (0, 1024, True, True), "batch_size": (1, _BIG, True, True),
    "remove_ratio": (0, 1, True, False), "calib_images": (1, 100 * _BIG, True, True),
    "dilution_epochs": (0, None, True, True), "epochs": (1, _BIG, True, True), "lr": (0, None, False, True),
    "blr": (0, None, False, True), "weight_decay": (0, None, True, True), "warmup_epochs": (0, _BIG, True, True),
    "warmup_lr": (0, None, True, True), "min_lr": (0, None, True, True), "clip_grad": (0, None, False, True),
    "grad_accum": (1, 4096, True, True), "smoothing": (0, 1, True, False), "mixup": (0, None, True, True),
    "cutmix": (0, None, True, True), "color_jitter": (0, None, True, True), "reprob": (0, 1, True, True),
    "model_ema_decay": (0, 1, False, False), "distill_alpha": (0, 1, True, True), "distill_tau": (0, None, False, True),
    "seed": (0, MAX_SEED, True, True), "eval_every": (1, _BIG, True, True), "tome_r": (0, _BIG, True, True),
    "tome_start_idx": (0, _BIG, True, True), "tome_inflection": (-1, 1, True, True),
    "synthetic_images": (1, 100 * _BIG, True, True),
    "threads": (1, MAX_THREADS, True, True),
}


def _name(key: str, origin: Mapping[str, str]) -> str:
    src = origin.get(key, "flag")
    return f"--{key.replace('_', '-')}" if src == "flag" else f"{src}: {key}"


def _check_types(cfg: RunConfig, origin: Mapping[str, str]) -> None:
    """Every field holds a value of its declared type (YAML can hold anything); ints widen to floats."""
    for f in dataclasses.fields(cfg):
        v, t = getattr(cfg, f.name), str(f.type)
        optional = t.endswith("| None")
        base = t.replace("| None", "").strip()
        if v is None:
            if optional:
                continue
            raise ShrinkError(f"{_name(f.name, origin)} needs a value, got none")
        if base == "bool":
            ok = isinstance(v, bool)
        elif base == "int":
            ok = isinstance(v, int) and not isinstance(v, bool)
        elif base == "float":
            ok = isinstance(v, (int, float)) and not isinstance(v, bool)
            if ok:
                v = float(v)
                if not math.isfinite(v):
                    raise ShrinkError(f"{_name(f.name, origin)} must be a finite number, got {v}")
                setattr(cfg, f.name, v)
        elif base == "str":
            ok = isinstance(v, str)
            if ok and optional and not v.strip():
                raise ShrinkError(f"{_name(f.name, origin)} is empty; leave it out or write none")
        elif base == "list[int]":
            if isinstance(v, int) and not isinstance(v, bool):  # YAML 'remove_layers: 3'
                v = [v]
                setattr(cfg, f.name, v)
            ok = isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in v)
            if ok and not v:
                raise ShrinkError(f"{_name(f.name, origin)} is empty; give at least one block index or leave it out")
        else:  # a field type this check does not know: leave it to its own validation
            continue
        if not ok:
            raise ShrinkError(f"{_name(f.name, origin)} must be {_KIND.get(base, base)}"
                              f"{' or none' if optional else ''}, got {v!r} ({type(v).__name__})")


_KIND = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string",
         "list[int]": "a list of integers (e.g. 0,1,3)"}


def _check_range(cfg: RunConfig, key: str, origin: Mapping[str, str]) -> None:
    v = getattr(cfg, key, None)
    if v is None or key not in _RANGES:
        return
    lo, hi, lo_in, hi_in = _RANGES[key]
    bad = (lo is not None and (v < lo if lo_in else v <= lo)) or (hi is not None and (v > hi if hi_in else v >= hi))
    if bad:
        if hi is None:
            want = f"{'>=' if lo_in else '>'} {lo}"
        elif lo_in and hi_in and isinstance(v, int):
            want = f"an integer from {lo} to {hi}"
        else:
            want = f"in {'[' if lo_in else '('}{lo}, {hi}{']' if hi_in else ')'}"
        raise ShrinkError(f"{_name(key, origin)} must be {want}, got {v!r}")


def _choice(cfg: RunConfig, key: str, choices, origin: Mapping[str, str]) -> None:
    v = getattr(cfg, key)
    if v not in choices:
        shown = ", ".join(choices) if len(choices) <= 12 else ", ".join(list(choices)[:12]) + ", ..."
        raise ShrinkError(f"{_name(key, origin)}: unknown value {v!r}; choose one of {shown}")


def _check_values(cfg: RunConfig, origin: Mapping[str, str], explicit: set[str] | None) -> None:
    from timm.optim import list_optimizers

    from shrink.selection.layers import CRITERIA

    n = lambda key: _name(key, origin)  # noqa: E731
    for key in _RANGES:
        _check_range(cfg, key, origin)
    for f in dataclasses.fields(cfg):  # every field declared with choices (YAML skips argparse's check)
        if "choices" in f.metadata:
            _choice(cfg, f.name, f.metadata["choices"], origin)
    _choice(cfg, "data_set", DATA_SETS, origin)
    _choice(cfg, "lambda_schedule", SCHEDULES, origin)
    _choice(cfg, "mixed_precision", ("no", "fp16", "bf16"), origin)
    _choice(cfg, "tome_policy", ("none", "hidden"), origin)
    _choice(cfg, "criterion", CRITERIA, origin)
    _choice(cfg, "sched", SCHEDS, origin)
    if cfg.opt.lower() not in list_optimizers() and cfg.opt.lower().split("_")[-1] not in list_optimizers():
        raise ShrinkError(f"{n('opt')}: unknown optimizer {cfg.opt!r} (see timm.optim.list_optimizers())")
    if cfg.log_with not in (None, "tensorboard", "wandb"):
        raise ShrinkError(f"{n('log_with')} must be tensorboard or wandb, got {cfg.log_with!r}")
    if not cfg.output_dir.strip():
        raise ShrinkError(f"{n('output_dir')} must name a folder, got {cfg.output_dir!r}")
    if "\x00" in cfg.output_dir or any(s is not None and "\x00" in s for s in (cfg.data_path, cfg.finetune,
                                                                                cfg.checkpoint)):
        raise ShrinkError("a path holds a NUL character")
    if not cfg.model.strip():
        raise ShrinkError(f"{n('model')} must name a model")
    if cfg.aa is not None and cfg.aa.lower() != "none":
        _check_aa(cfg.aa, n("aa"))

    # --- combinations ---
    if cfg.remove_layers is not None:
        if len(set(cfg.remove_layers)) != len(cfg.remove_layers):
            raise ShrinkError(f"{n('remove_layers')} has a repeated index: {cfg.remove_layers}")
        if any(i < 0 for i in cfg.remove_layers):
            raise ShrinkError(f"{n('remove_layers')} has a negative index: {cfg.remove_layers}")
        if cfg.remove_ratio:
            raise ShrinkError(f"give {n('remove_ratio')} or {n('remove_layers')}, not both")
    if cfg.criterion == "manual" and cfg.remove_ratio:
        raise ShrinkError(f"{n('criterion')} manual picks no layers; give the layers with --remove-layers")
    if (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.batch_size % 2:
        raise ShrinkError(f"{n('batch_size')} must be even with mixup/cutmix (timm's Mixup pairs images), "
                          f"got {cfg.batch_size}")
    if cfg.eval:
        if not cfg.checkpoint:
            raise ShrinkError("--eval needs --checkpoint DIR (a model written by shrink.save)")
        if cfg.resume:
            raise ShrinkError("--eval and --resume do not go together (--eval only evaluates --checkpoint)")
    else:
        if cfg.checkpoint:
            raise ShrinkError(f"{n('checkpoint')} is the model for --eval; to start training from weights use "
                              f"--finetune")
    if cfg.tome_train and cfg.tome_r == 0:
        raise ShrinkError(f"{n('tome_train')} merges tokens while training: give {n('tome_r')} > 0 (tokens merged "
                          f"per block)")
    if cfg.tome_r == 0:
        for key in ("tome_start_idx", "tome_inflection", "tome_policy"):
            if getattr(cfg, key) != getattr(RunConfig, key):
                _warn(f"{n(key)} is ignored: {n('tome_r')} is 0 (no token merging)")

    # --- files ---
    if cfg.finetune is not None:
        _check_model_path(cfg.finetune, n("finetune"), dir_ok=True)
    if cfg.checkpoint is not None:
        _check_model_path(cfg.checkpoint, n("checkpoint"), dir_ok=True, file_ok=False)
    _check_data(cfg, n, explicit)
    if cfg.log_with is not None:
        import importlib.util

        needs = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}[cfg.log_with]
        if not any(importlib.util.find_spec(m) for m in needs):
            raise ShrinkError(f"--log-with {cfg.log_with} needs the {needs[0]} package: pip install {needs[0]}")

    # --- the model, on the meta device: name, arguments, input size, layers (no memory, no download) ---
    if not cfg.eval:
        _check_model(cfg, n, explicit)
    else:
        from shrink.modelio.create import model_skeleton

        saved = model_skeleton(None, checkpoint=cfg.checkpoint)  # config.json checked before any work
        size = getattr(getattr(saved, "patch_embed", None), "img_size", None)
        if cfg.input_size is not None and size is not None and tuple(size) != (cfg.input_size, cfg.input_size):
            raise ShrinkError(f"{n('input_size')} {cfg.input_size}: {cfg.checkpoint} was saved for input size "
                              f"{size[0]}; leave --input-size out")
        if cfg.tome_r > 0:  # the merging the evaluation will apply, tried on the skeleton
            _check_tome(saved, [], cfg, n)


def _check_aa(aa: str, name: str) -> None:
    from timm.data.transforms_factory import transforms_imagenet_train

    try:
        transforms_imagenet_train(32, auto_augment=aa)
    except Exception as e:  # noqa: BLE001 - timm raises AssertionError / ValueError / KeyError on bad policies
        raise ShrinkError(f"{name}: not a RandAugment/AutoAugment policy timm knows: {aa!r} ({e})") from None


def _check_model_path(path: str, name: str, *, dir_ok: bool, file_ok: bool = True) -> None:
    p = Path(path)
    if not path.strip() or not p.exists():
        raise ShrinkError(f"{name}: checkpoint not found: {path!r}")
    if p.is_dir():
        if not dir_ok:
            raise ShrinkError(f"{name}: {path} is a folder, expected a weights file")
        if not (p / "config.json").is_file() or not (p / "model.safetensors").is_file():
            raise ShrinkError(f"{name}: {path} is not a model saved by shrink.save (config.json and "
                              f"model.safetensors expected)")
    elif not file_ok:
        raise ShrinkError(f"{name} must be a model folder written by shrink.save, got the file {path}")
    elif not p.is_file():
        raise ShrinkError(f"{name}: {path} is not a regular file")


def _check_data(cfg: RunConfig, n, explicit: set[str] | None) -> None:
    from shrink.data.datasets import check_data_path

    if cfg.data_set in ("digits", "synthetic") and cfg.data_path is not None:
        raise ShrinkError(f"{n('data_path')} is not used by --data-set {cfg.data_set}; leave it out, or give "
                          f"--data-set folder / cifar10 / cifar100")
    check_data_path(cfg.data_set, cfg.data_path, flag=n("data_path"))


def _check_model(cfg: RunConfig, n, explicit: set[str] | None) -> None:
    """Build the model's skeleton on the meta device: unknown names, bad arguments, input sizes the patch
    size does not divide, removals on models without attention and out-of-range layers all fail here."""
    from shrink.blocks.dilution import has_attention_layers, validate_layers
    from shrink.modelio.create import model_skeleton

    kwargs: dict[str, Any] = {}
    if cfg.num_classes is not None:
        kwargs["num_classes"] = cfg.num_classes
    if cfg.drop_path:
        kwargs["drop_path_rate"] = cfg.drop_path
    if cfg.input_size is not None:
        kwargs["img_size"] = cfg.input_size
    is_dir = cfg.finetune is not None and Path(cfg.finetune).is_dir()
    chosen = "model" in explicit if explicit is not None else cfg.model != RunConfig.model
    name = cfg.model if (not is_dir or chosen) else None
    model = model_skeleton(name, checkpoint=cfg.finetune if is_dir else None, **kwargs)
    if is_dir and name is None:  # the saved architecture is the model: recorded in config.yaml as such
        cfg.model = model.shrink_arch["name"]
    if cfg.remove_layers is not None or cfg.remove_ratio > 0:
        if not has_attention_layers(model):
            raise ShrinkError(f"{cfg.model} is not a ViT: it has no attention layers to remove; use --remove-ratio 0")
        if cfg.remove_layers is not None:
            try:
                validate_layers(model, cfg.remove_layers)
            except ShrinkError as e:
                raise ShrinkError(f"{n('remove_layers')}: {e}") from None
    if cfg.tome_r > 0:  # the deployable model's merging: the removed layers' attention is gone there
        removed = cfg.remove_layers
        if removed is None:  # --remove-ratio: which layers is not known yet, how many is (the count is what matters)
            from shrink.blocks.contract import attention_block_indices, get_blocks
            from shrink.selection.layers import ratio_to_k

            attn = attention_block_indices(model) if cfg.remove_ratio > 0 else []
            k = min(len(attn), ratio_to_k(cfg.remove_ratio, len(get_blocks(model)))) if attn else 0
            removed = attn[len(attn) - k:]
        _check_tome(model, removed, cfg, n)
    if cfg.pretrained and cfg.finetune is None and not cfg.resume:  # after the cheap checks: can the weights be had?
        from shrink.modelio.create import check_hub

        check_hub(cfg.model, model)


def tome_r_arg(cfg: RunConfig) -> int | tuple[int, float]:
    """The ``r`` argument of :func:`shrink.merging.patch.apply_tome` for these settings: ``tome_r``, or the
    ``(tome_r, tome_inflection)`` ramp when the inflection is not 0."""
    return (cfg.tome_r, float(cfg.tome_inflection)) if cfg.tome_inflection else cfg.tome_r


def tome_schedule_for(cfg: RunConfig, model, removed) -> list[int]:
    """r of every block of the *deployable* model, the blocks in ``removed`` attention-free there.

    ``main_lambda.py --eval --checkpoint RUN/best`` with the same settings applies exactly this
    schedule to the exported model; a training run applies it, as a per-block list, to the diluted
    model as well, so a run merges the same tokens at every lambda (a removed block merges only with
    policy 'hidden'). Raises ShrinkError (one line) when the settings do not fit the model.
    """
    from shrink.blocks.contract import classify_block, get_blocks
    from shrink.merging.merge import tome_schedule

    removed = set(removed or ())
    kinds = []
    for i, b in enumerate(get_blocks(model)):
        kind = classify_block(b)
        free = i in removed or kind == "attention-free" or (kind == "diluted" and not b.attn_active)
        kinds.append("free" if free else "attn")
    return tome_schedule(kinds, tome_r_arg(cfg), cfg.tome_start_idx, cfg.tome_policy)


def _check_tome(model, removed, cfg: RunConfig, n) -> None:
    """The merging settings fit the (meta-device) model: start index, ramp, family, pooling."""
    from shrink.merging.patch import apply_tome, remove_tome

    where = f"{n('tome_r')} {cfg.tome_r}" + (f" (on the deployable model, {len(removed)} attention layer(s) "
                                             f"removed)" if removed else "")
    try:
        schedule = tome_schedule_for(cfg, model, removed)
        apply_tome(model, schedule, policy=cfg.tome_policy)  # class swaps only: family and pooling checks
        remove_tome(model)
    except ShrinkError as e:
        raise ShrinkError(f"{where}: {e}") from None


# ----------------------------------------------------------------------------------------------
# Parsing
# ----------------------------------------------------------------------------------------------

def _warn(line: str) -> None:
    """A warning about the settings, once per launch (the first process; every process parses them)."""
    import logging
    import os

    if os.environ.get("RANK", "0") == "0":
        logging.getLogger(__name__).warning(line)


def _int_list(text: str) -> list[int]:
    try:
        return parse_layers(str(text), "value")
    except ShrinkError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _optional(cast):
    def parse(text: str):
        if not str(text).strip():  # an unset shell variable ('--data-path $IMAGENET') is a mistake, not "none"
            raise argparse.ArgumentTypeError("empty value (leave the flag out, or write none)")
        return None if str(text).lower() in ("none", "null") else cast(text)
    parse.__name__ = getattr(cast, "__name__", "value")
    return parse


def _float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"invalid number {text!r}: must be finite")
    return v


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None


_TYPES = {"str": str, "int": _int, "float": _float, "str | None": _optional(str), "int | None": _optional(_int),
          "float | None": _optional(_float), "list[int] | None": _optional(_int_list)}


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one flag per RunConfig field (defaults are applied later)."""
    parser = OneLineArgumentParser(
        description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", default=argparse.SUPPRESS,
                        help="YAML file of settings (keys = flag names with underscores); flags override it")
    groups: dict[str, argparse._ArgumentGroup] = {}
    defaults = RunConfig()
    for f in dataclasses.fields(RunConfig):
        g = f.metadata.get("group", "other")
        if g not in groups:
            groups[g] = parser.add_argument_group(g)
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        help_text = f.metadata["help"] + f" (default: {default})"
        if f.type == "bool":
            groups[g].add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            kw = {"choices": f.metadata["choices"]} if "choices" in f.metadata else {}
            groups[g].add_argument(flag, type=_TYPES.get(f.type, str), help=help_text,
                                   metavar=f.name.upper(), **kw)
    return parser


_MAX_YAML = 1 << 20  # a settings file is a few hundred bytes; refuse to parse megabytes


def load_yaml(path: str | Path) -> dict[str, Any]:
    """The settings of a YAML file, keys checked against RunConfig; strings coerced like flags."""
    p = Path(path)
    if not str(path).strip() or not p.exists():
        raise ShrinkError(f"config file not found: {str(path)!r}")
    if not p.is_file():
        raise ShrinkError(f"config file {p} is not a regular file")
    if p.stat().st_size > _MAX_YAML:
        raise ShrinkError(f"config file {p} is larger than {_MAX_YAML} bytes; not a settings file")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ShrinkError(f"cannot parse {p}: {str(e).splitlines()[0]}") from None
    except UnicodeDecodeError:
        raise ShrinkError(f"cannot parse {p}: not a UTF-8 text file") from None
    except OSError as e:
        raise ShrinkError(f"cannot read {p}: {e.strerror or e}") from None
    except RecursionError:
        raise ShrinkError(f"cannot parse {p}: nested too deeply") from None
    if not isinstance(data, dict):
        raise ShrinkError(f"{p} must hold a mapping of settings (key: value lines)")
    bad_keys = [k for k in data if not isinstance(k, str)]
    if bad_keys:
        raise ShrinkError(f"{p}: setting names must be strings, got {bad_keys[0]!r}")
    known = {f.name for f in dataclasses.fields(RunConfig)}
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ShrinkError(f"{p}: unknown setting(s) {', '.join(unknown)}")
    types = {f.name: str(f.type) for f in dataclasses.fields(RunConfig)}
    for k, v in data.items():  # YAML reads 1e-5 as a string: coerce strings like the command line does
        if isinstance(v, str) and types[k] not in ("str", "str | None") and types[k] in _TYPES:
            try:
                data[k] = _TYPES[types[k]](v)
            except (ValueError, argparse.ArgumentTypeError):
                raise ShrinkError(f"{p}: {k}: cannot read {v!r} as {types[k]}") from None
        elif isinstance(v, str) and types[k] == "bool":
            raise ShrinkError(f"{p}: {k}: expected true or false, got {v!r}")
    return data


def _same_level_removal(values: dict[str, Any], where: str) -> None:
    ratio, layers = values.get("remove_ratio"), values.get("remove_layers")
    if layers is not None and ratio not in (None, 0, 0.0):
        raise ShrinkError(f"{where}: give remove_ratio or remove_layers, not both")


def config_from_args(argv: list[str] | None = None, description: str | None = None) -> RunConfig:
    """Parse ``argv``: defaults < the run's saved config.yaml (with --resume) < the --config YAML < flags.

    Every value, wherever it came from, passes the same checks (:meth:`RunConfig.validate`). A
    ``--data-path`` without a data set given anywhere means ``--data-set folder`` (as in timm's
    train.py). Of --remove-ratio and --remove-layers the later level wins; both at one level is an error.
    """
    parser = build_parser(description)
    ns = vars(parser.parse_args(argv))
    values: dict[str, Any] = {}
    origin: dict[str, str] = {}
    levels: list[tuple[str, dict[str, Any]]] = []
    if ns.get("resume"):  # continue with the settings the run was started with
        out = ns.get("output_dir", RunConfig.output_dir)
        saved = Path(out) / "config.yaml" if str(out).strip() else None
        if saved is not None and saved.is_file():
            old = load_yaml(saved)
            old.pop("resume", None)
            old.pop("output_dir", None)
            levels.append((str(saved), old))
    if "config" in ns:
        path = ns.pop("config")
        levels.append((str(path), load_yaml(path)))
    levels.append(("flag", ns))
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
            _warn(f"{_name('pretrained', origin)} is ignored: --finetune {values['finetune']} gives the starting "
                  f"weights (recorded as pretrained: false)")
    try:
        cfg = RunConfig(**values)
    except TypeError as e:
        raise ShrinkError(str(e)) from None
    return cfg.validate(origin, explicit)
