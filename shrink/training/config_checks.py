"""The validation of a run's settings (:meth:`shrink.training.config.RunConfig.validate` runs it).

Types, ranges, choices and combinations of the values; then what lies beyond them: files, the data set,
the model built on the meta device (no memory, no download), and whether the token-merging settings fit
that model. Each check raises :class:`~shrink.errors.ShrinkError` with one line naming the setting as
the user gave it (:func:`name_of`: ``--lr`` for a flag, ``FILE: lr`` for a YAML value).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from shrink.blocks.dilution import SCHEDULES
from shrink.data.datasets import DATA_SETS
from shrink.errors import ShrinkError
from shrink.values import MAX_THREADS

__all__ = ["MAX_SEED", "SCHEDS", "check_aa", "check_data", "check_model", "check_model_path", "check_saved_model",
           "check_tome", "check_types", "check_values", "name_of", "warn", "tome_r_arg", "tome_schedule_for"]

Namer = Callable[[str], str]  # a setting's name as the user gave it
RunConfig = Any  # shrink.training.config.RunConfig (not imported: that module imports this one)


def warn(line: str) -> None:
    """A warning about the settings, once per launch (the first process; every process parses them)."""
    import logging
    import os

    if os.environ.get("RANK", "0") == "0":
        logging.getLogger("shrink.training.config").warning(line)


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


def name_of(key: str, origin: Mapping[str, str]) -> str:
    src = origin.get(key, "flag")
    return f"--{key.replace('_', '-')}" if src == "flag" else f"{src}: {key}"


def check_types(cfg: RunConfig, origin: Mapping[str, str]) -> None:
    """Every field holds a value of its declared type (YAML can hold anything); ints widen to floats."""
    for f in dataclasses.fields(cfg):
        v, t = getattr(cfg, f.name), str(f.type)
        optional = t.endswith("| None")
        base = t.replace("| None", "").strip()
        if v is None:
            if optional:
                continue
            raise ShrinkError(f"{name_of(f.name, origin)} needs a value, got none")
        if base == "bool":
            ok = isinstance(v, bool)
        elif base == "int":
            ok = isinstance(v, int) and not isinstance(v, bool)
        elif base == "float":
            ok = isinstance(v, (int, float)) and not isinstance(v, bool)
            if ok:
                v = float(v)
                if not math.isfinite(v):
                    raise ShrinkError(f"{name_of(f.name, origin)} must be a finite number, got {v}")
                setattr(cfg, f.name, v)
        elif base == "str":
            ok = isinstance(v, str)
            if ok and optional and not v.strip():
                raise ShrinkError(f"{name_of(f.name, origin)} is empty; leave it out or write none")
        elif base == "list[int]":
            if isinstance(v, int) and not isinstance(v, bool):  # YAML 'remove_layers: 3'
                v = [v]
                setattr(cfg, f.name, v)
            ok = isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in v)
            if ok and not v:
                raise ShrinkError(f"{name_of(f.name, origin)} is empty; give at least one block index or leave it out")
        else:  # a field type this check does not know: leave it to its own validation
            continue
        if not ok:
            raise ShrinkError(f"{name_of(f.name, origin)} must be {_KIND.get(base, base)}"
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
        raise ShrinkError(f"{name_of(key, origin)} must be {want}, got {v!r}")


def _choice(cfg: RunConfig, key: str, choices, origin: Mapping[str, str]) -> None:
    v = getattr(cfg, key)
    if v not in choices:
        shown = ", ".join(choices) if len(choices) <= 12 else ", ".join(list(choices)[:12]) + ", ..."
        raise ShrinkError(f"{name_of(key, origin)}: unknown value {v!r}; choose one of {shown}")


def check_values(cfg: RunConfig, origin: Mapping[str, str], explicit: set[str] | None) -> None:
    """Ranges and choices, then the combinations of values, then files, data and the model, in that order
    (the first failing check is the one the user sees)."""
    n = lambda key: name_of(key, origin)  # noqa: E731
    _check_ranges_and_choices(cfg, origin)
    _check_names_and_paths(cfg, n)
    # --- combinations ---
    _check_removal(cfg, n)
    _check_mixup_batch(cfg, n)
    _check_eval_mode(cfg, n)
    _check_tome_settings(cfg, n)
    # --- files ---
    _check_files(cfg, n, explicit)
    # --- the model, on the meta device: name, arguments, input size, layers (no memory, no download) ---
    if not cfg.eval:
        check_model(cfg, n, explicit)
    else:
        check_saved_model(cfg, n)  # config.json checked before any work


def _check_ranges_and_choices(cfg: RunConfig, origin: Mapping[str, str]) -> None:
    """Every value in its range, every value with a fixed set of choices one of them."""
    from shrink.selection import CRITERIA

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


def _check_names_and_paths(cfg: RunConfig, n: Namer) -> None:
    """The optimizer, logger, output folder, paths, model name and augmentation policy are usable strings."""
    from timm.optim import list_optimizers

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
        check_aa(cfg.aa, n("aa"))


def _check_removal(cfg: RunConfig, n: Namer) -> None:
    """--remove-layers holds distinct non-negative indices and comes without --remove-ratio; a ratio needs
    a criterion that picks the layers itself."""
    from shrink.selection import get_criterion

    if cfg.remove_layers is not None:
        if len(set(cfg.remove_layers)) != len(cfg.remove_layers):
            raise ShrinkError(f"{n('remove_layers')} has a repeated index: {cfg.remove_layers}")
        if any(i < 0 for i in cfg.remove_layers):
            raise ShrinkError(f"{n('remove_layers')} has a negative index: {cfg.remove_layers}")
        if cfg.remove_ratio:
            raise ShrinkError(f"give {n('remove_ratio')} or {n('remove_layers')}, not both")
    if cfg.remove_ratio and get_criterion(cfg.criterion).takes_layers:
        raise ShrinkError(f"{n('criterion')} {cfg.criterion} picks no layers; give the layers with --remove-layers")


def _check_mixup_batch(cfg: RunConfig, n: Namer) -> None:
    """Mixup / CutMix pair the images of a batch: the batch size must be even."""
    if (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.batch_size % 2:
        raise ShrinkError(f"{n('batch_size')} must be even with mixup/cutmix (timm's Mixup pairs images), "
                          f"got {cfg.batch_size}")


def _check_eval_mode(cfg: RunConfig, n: Namer) -> None:
    """--eval needs --checkpoint and no --resume; training takes no --checkpoint."""
    if cfg.eval:
        if not cfg.checkpoint:
            raise ShrinkError("--eval needs --checkpoint DIR (a model written by shrink.save)")
        if cfg.resume:
            raise ShrinkError("--eval and --resume do not go together (--eval only evaluates --checkpoint)")
    else:
        if cfg.checkpoint:
            raise ShrinkError(f"{n('checkpoint')} is the model for --eval; to start training from weights use "
                              f"--finetune")


def _check_tome_settings(cfg: RunConfig, n: Namer) -> None:
    """--tome-train needs --tome-r > 0; the other merging settings are ignored (a warning) at --tome-r 0."""
    if cfg.tome_train and cfg.tome_r == 0:
        raise ShrinkError(f"{n('tome_train')} merges tokens while training: give {n('tome_r')} > 0 (tokens merged "
                          f"per block)")
    if cfg.tome_r == 0:
        for key in ("tome_start_idx", "tome_inflection", "tome_policy"):
            if getattr(cfg, key) != getattr(type(cfg), key):
                warn(f"{n(key)} is ignored: {n('tome_r')} is 0 (no token merging)")


def _check_files(cfg: RunConfig, n: Namer, explicit: set[str] | None) -> None:
    """The checkpoints and the data exist, and the logger's package is installed."""
    if cfg.finetune is not None:
        check_model_path(cfg.finetune, n("finetune"), dir_ok=True)
    if cfg.checkpoint is not None:
        check_model_path(cfg.checkpoint, n("checkpoint"), dir_ok=True, file_ok=False)
    check_data(cfg, n, explicit)
    if cfg.log_with is not None:
        import importlib.util

        needs = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}[cfg.log_with]
        if not any(importlib.util.find_spec(m) for m in needs):
            raise ShrinkError(f"--log-with {cfg.log_with} needs the {needs[0]} package: pip install {needs[0]}")


def check_aa(aa: str, name: str) -> None:
    from timm.data.transforms_factory import transforms_imagenet_train

    try:
        transforms_imagenet_train(32, auto_augment=aa)
    except Exception as e:  # noqa: BLE001 - timm raises AssertionError / ValueError / KeyError on bad policies
        raise ShrinkError(f"{name}: not a RandAugment/AutoAugment policy timm knows: {aa!r} ({e})") from None


def check_model_path(path: str, name: str, *, dir_ok: bool, file_ok: bool = True) -> None:
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


def check_data(cfg: RunConfig, n: Namer, explicit: set[str] | None) -> None:
    from shrink.data.datasets import check_data_path

    check_data_path(cfg.data_set, cfg.data_path, flag=n("data_path"))


def check_model(cfg: RunConfig, n: Namer, explicit: set[str] | None) -> None:
    """Build the model's skeleton on the meta device: unknown names, bad arguments, input sizes the patch
    size does not divide, removals on models without attention and out-of-range layers all fail here."""
    from shrink.blocks.dilution import has_attention_layers, validate_layers
    from shrink.modelio.create import model_skeleton

    kwargs = cfg.model_kwargs()
    is_dir = cfg.finetune is not None and Path(cfg.finetune).is_dir()
    chosen = "model" in explicit if explicit is not None else cfg.model != type(cfg).model
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
        check_tome(model, removed, cfg, n)
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


def check_tome(model, removed, cfg: RunConfig, n: Namer) -> None:
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


def check_saved_model(cfg: RunConfig, n: Namer) -> None:
    """--eval: the saved model's config.json (checked before any work), its input size, its merging."""
    from shrink.modelio.create import model_skeleton

    saved = model_skeleton(None, checkpoint=cfg.checkpoint)
    size = getattr(getattr(saved, "patch_embed", None), "img_size", None)
    if cfg.input_size is not None and size is not None and tuple(size) != (cfg.input_size, cfg.input_size):
        raise ShrinkError(f"{n('input_size')} {cfg.input_size}: {cfg.checkpoint} was saved for input size "
                          f"{size[0]}; leave --input-size out")
    if cfg.tome_r > 0:  # the merging the evaluation will apply, tried on the skeleton
        check_tome(saved, [], cfg, n)
