"""One dataclass for a run: defaults < YAML file (--config) < command-line flags, then validation.

Every field is a command-line flag (``remove_ratio`` -> ``--remove-ratio``) and a YAML key.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .cli import OneLineArgumentParser
from .data import DATA_SETS
from .dilution import SCHEDULES
from .errors import ShrinkError


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
    # data (see shrink.data.add_data_args for the meaning)
    data_set: str = _f("digits", "digits | cifar10 | cifar100 | folder | synthetic", group="data", choices=DATA_SETS)
    data_path: str | None = _f(None, "root of the data set: DATA_PATH/train and DATA_PATH/val for 'folder'; the "
                                     "download folder for CIFAR", group="data")
    input_size: int | None = _f(None, "image side in pixels (default: the model's)", group="data")
    num_workers: int = _f(2, "data-loader worker processes", group="data")
    batch_size: int = _f(64, "images per process per step", group="data")
    repeated_aug: bool = _f(False, "repeated augmentation (x3, timm's RepeatAugSampler), as in DeiT", group="data")
    # removal
    remove_ratio: float = _f(0.0, "fraction of attention layers to remove, in [0, 1): k = round(ratio * depth) "
                                  "(0 = plain fine-tuning, no removal)", group="removal")
    remove_layers: list[int] | None = _f(None, "remove exactly these blocks, e.g. 0,1,3,4,6 (skips selection)",
                                         group="removal")
    criterion: str = _f("transfer_entropy", "selection criterion for --remove-ratio (see shrink.selection)",
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
    # evaluation only
    eval: bool = _f(False, "only evaluate --checkpoint on the val split", group="eval")
    checkpoint: str | None = _f(None, "model to evaluate: a directory written by shrink.save", group="eval")
    tome_r: int = _f(0, "with --eval: also evaluate with token merging, r tokens per block", group="eval")
    tome_start_idx: int = _f(0, "first attention-bearing block (counted among those) that merges", group="eval")
    tome_policy: str = _f("none", "ToMe in attention-free blocks: none (tokens pass, the reference) | hidden (merge before the MLP on norm2(x))",
                          group="eval", choices=("none", "hidden"))

    # ------------------------------------------------------------------------------------------
    def validate(self) -> RunConfig:
        """Check values a user can get wrong; raise ShrinkError with one line."""
        r = self.remove_ratio
        if not isinstance(r, (int, float)) or isinstance(r, bool) or math.isnan(r) or not 0.0 <= r < 1.0:
            raise ShrinkError(f"--remove-ratio must be a number in [0, 1), got {r!r}")
        for name in ("batch_size", "epochs", "grad_accum", "eval_every", "calib_images"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ShrinkError(f"--{name.replace('_', '-')} must be a positive integer, got {v!r}")
        if self.dilution_epochs < 0:
            raise ShrinkError(f"--dilution-epochs must be >= 0, got {self.dilution_epochs}")
        if self.remove_layers is not None and len(set(self.remove_layers)) != len(self.remove_layers):
            raise ShrinkError(f"--remove-layers has a repeated index: {self.remove_layers}")
        if self.remove_layers is not None and any(i < 0 for i in self.remove_layers):
            raise ShrinkError(f"--remove-layers has a negative index: {self.remove_layers}")
        if self.eval and not self.checkpoint:
            raise ShrinkError("--eval needs --checkpoint DIR (a model written by shrink.save)")
        if self.tome_r < 0 or self.tome_start_idx < 0:
            raise ShrinkError("--tome-r and --tome-start-idx must be >= 0")
        if self.finetune and not Path(self.finetune).exists():
            raise ShrinkError(f"checkpoint not found: {self.finetune}")
        if self.checkpoint and not Path(self.checkpoint).exists():
            raise ShrinkError(f"checkpoint not found: {self.checkpoint}")
        if self.data_set in ("folder",) and not self.data_path:
            raise ShrinkError("--data-set folder needs --data-path (a folder with train/ and val/)")
        if self.data_set == "folder" and not Path(self.data_path).is_dir():
            raise ShrinkError(f"data path not found: {self.data_path}")
        if self.log_with not in (None, "tensorboard", "wandb"):
            raise ShrinkError(f"--log-with must be tensorboard or wandb, got {self.log_with!r}")
        if self.log_with is not None:
            import importlib.util

            needs = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}[self.log_with]
            if not any(importlib.util.find_spec(m) for m in needs):
                raise ShrinkError(f"--log-with {self.log_with} needs the {needs[0]} package: pip install {needs[0]}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# Parsing
# ----------------------------------------------------------------------------------------------

def _int_list(text: str) -> list[int]:
    parts = [p for p in str(text).replace(" ", "").split(",") if p != ""]
    try:
        return [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _optional(cast):
    def parse(text: str):
        return None if str(text).lower() in ("none", "null", "") else cast(text)
    parse.__name__ = getattr(cast, "__name__", "value")
    return parse


_TYPES = {"str": str, "int": int, "float": float, "str | None": _optional(str), "int | None": _optional(int),
          "float | None": _optional(float), "list[int] | None": _optional(_int_list)}


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
            groups[g].add_argument(flag, type=_TYPES[f.type], help=help_text,
                                   metavar=f.name.upper(), **kw)
    return parser


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ShrinkError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ShrinkError(f"cannot parse {p}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ShrinkError(f"{p} must hold a mapping of settings")
    known = {f.name for f in dataclasses.fields(RunConfig)}
    data = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ShrinkError(f"{p}: unknown setting(s) {', '.join(unknown)}")
    types = {f.name: f.type for f in dataclasses.fields(RunConfig)}
    for k, v in data.items():  # YAML reads 1e-5 as a string: coerce strings like the command line does
        if isinstance(v, str) and types[k] != "str" and types[k] in _TYPES:
            try:
                data[k] = _TYPES[types[k]](v)
            except (ValueError, argparse.ArgumentTypeError):
                raise ShrinkError(f"{p}: {k}: cannot read {v!r} as {types[k]}") from None
        elif isinstance(v, str) and types[k] == "bool":
            raise ShrinkError(f"{p}: {k}: expected true or false, got {v!r}")
    return data


def config_from_args(argv: list[str] | None = None, description: str | None = None) -> RunConfig:
    """Parse ``argv``: defaults, then the --config YAML, then the flags given; validated."""
    parser = build_parser(description)
    ns = vars(parser.parse_args(argv))
    values: dict[str, Any] = {}
    if ns.get("resume") and "config" not in ns:  # continue with the settings the run was started with
        saved = Path(ns.get("output_dir", RunConfig.output_dir)) / "config.yaml"
        if saved.is_file():
            values.update(load_yaml(saved))
            values.pop("resume", None)
    if "config" in ns:
        values.update(load_yaml(ns.pop("config")))
    values.update(ns)
    try:
        cfg = RunConfig(**values)
    except TypeError as e:
        raise ShrinkError(str(e)) from None
    return cfg.validate()
