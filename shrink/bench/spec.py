"""Benchmark specifications: model lists, removal sets, configurations (variants) and the run plan
(plan files of ``benchmark.py --plan`` are read by :mod:`shrink.bench.plan_file`)."""
from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from torch import nn

from shrink.blocks.attention_free import attention_free_indices, export
from shrink.blocks.dilution import attention_block_indices, dilute, get_blocks, validate_layers
from shrink.errors import ShrinkError
from shrink.introspect import input_size
from shrink.modelio.checkpoint import load_checkpoint
from shrink.modelio.create import create_model
from shrink.values import parse_layers

_logger = logging.getLogger(__name__)

VARIANTS = ("dense", "dense+tome", "pruned", "pruned+tome")
_LIST_KEYS = {"checkpoint", "remove", "selection", "ratio", "tome_r", "tome_start", "tome_policy", "compare"}


@dataclass
class ModelSpec:
    """One model of a benchmark and the configurations to measure on it."""

    name: str
    checkpoint: str | None = None
    remove_layers: list[int] | None = None
    selection: str | None = None
    remove_ratio: float | None = None
    tome_r: int | None = None
    tome_start_idx: int = 0
    tome_policy: str = "none"  # attention-free blocks: "none" (reference, no merging) or "hidden"
    compare: list[str] | None = None  # None: dense, + pruned if a removal is given, + ToMe if r is given
    tome_inflection: float = 0.0  # not 0: the official ramp (tome_r, inflection) over the merging blocks


@dataclass
class BenchConfig:
    """Measurement settings shared by every configuration, and where to write the report."""

    models: list[ModelSpec]
    device: str = "cpu"
    batch_size: int = 32
    precision: str = "fp32"
    compile: bool = False
    channels_last: bool = False
    img_size: int | None = None
    warmup: int | None = None  # None: DEFAULT_ITERS of the device type
    iters: int | None = None
    repeats: int | None = None
    latency: bool = True
    train: bool = False
    threads: int | None = None
    interleave: bool = False  # time the configurations round-robin (for machines with other load)
    runtimes: list[str] | None = None  # None: torch only; e.g. ["torch", "onnxruntime"] (shrink.bench.ort)
    baseline: str | None = None  # a model name: every row's speed is also compared with its dense row
    json_path: str | None = None
    csv_path: str | None = None
    plot_path: str | None = None
    progress: bool = True
    command: str | None = None
    plan: dict | None = None  # benchmark.py --plan: read_plan's description; adds predicted_speedup / speedup
    allocator: str = "steady"  # shrink.bench.measure.set_allocator: CPU timings independent of malloc's history


# ------------------------------------------------------------------------------------------------
# Model lists, removal sets, variants
# ------------------------------------------------------------------------------------------------

def parse_choices(text: str, choices: Sequence[str], flag: str, what: str,
                  aliases: dict[str, str] | None = None) -> list[str]:
    """``"a,b"`` -> the names, each one of ``choices`` (after ``aliases``), without repeats, at least one."""
    out = []
    for v in (t.strip() for t in text.split(",") if t.strip()):
        v = (aliases or {}).get(v, v)
        if v not in choices:
            raise ShrinkError(f"unknown {what} {v!r} in {flag}; choose from {', '.join(choices)}")
        if v not in out:
            out.append(v)
    if not out:
        raise ShrinkError(f"{flag} is empty")
    return out


def parse_compare(text: str) -> list[str]:
    """``"dense,pruned"`` -> validated configuration names (``tome`` means ``dense+tome``)."""
    return parse_choices(text, VARIANTS, "--compare", "configuration", {"tome": "dense+tome"})


def parse_model_line(line: str, defaults: ModelSpec) -> ModelSpec:
    """``name [key=value ...]``; keys: checkpoint, remove, selection, ratio, tome_r, tome_start, tome_policy, compare."""
    name, *pairs = line.split()
    spec = replace(defaults, name=name)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in _LIST_KEYS:
            raise ShrinkError(f"model list: bad entry {pair!r} (keys: {', '.join(sorted(_LIST_KEYS))})")
        try:
            if key == "checkpoint":
                spec.checkpoint = value or None
            elif key == "remove":
                spec.remove_layers = parse_layers(value, "remove") if value not in ("", "none") else None
            elif key == "selection":
                spec.selection = value or None
            elif key == "ratio":
                spec.remove_ratio = float(value)
            elif key == "tome_r":
                spec.tome_r = int(value)
            elif key == "tome_start":
                spec.tome_start_idx = int(value)
            elif key == "tome_policy":
                spec.tome_policy = value
            else:
                spec.compare = parse_compare(value)
        except ValueError:
            raise ShrinkError(f"model list: bad value in {pair!r}") from None
    return spec


def parse_models(arg: str, defaults: ModelSpec) -> list[ModelSpec]:
    """``a,b,c`` or the path of a list file (one ``name [key=value ...]`` per line, ``#`` comments)."""
    path = Path(arg)
    if path.is_file():
        lines = [ln.split("#", 1)[0].strip() for ln in path.read_text().splitlines()]
        specs = [parse_model_line(ln, defaults) for ln in lines if ln]
    else:
        specs = [replace(defaults, name=n.strip()) for n in arg.split(",") if n.strip()]
    if not specs:
        raise ShrinkError(f"no model given in {arg!r}")
    return specs


def read_selection(path: str | os.PathLike, depth: int | None = None) -> list[int]:
    """The ``layers`` list (in selection order) of a selection JSON written by ``python -m shrink.select``."""
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except OSError as e:
        raise ShrinkError(f"cannot read selection file {p}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise ShrinkError(f"selection file {p} is not valid JSON: {e}") from None
    layers = data.get("layers") if isinstance(data, dict) else None
    if not isinstance(layers, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise ShrinkError(f"selection file {p} has no 'layers' list of integers")
    if depth is not None and isinstance(data.get("depth"), int) and data["depth"] != depth:
        raise ShrinkError(f"selection file {p} was made for {data['depth']} blocks; this model has {depth}")
    return layers


def resolve_removal(model: nn.Module, spec: ModelSpec) -> list[int] | None:
    """The attention layers to remove for ``spec`` on ``model`` (None: no removal asked for)."""
    if spec.remove_layers is not None and spec.selection is not None:
        raise ShrinkError("give either --remove-layers or --selection, not both")
    if spec.remove_ratio is not None and spec.selection is None:
        raise ShrinkError(
            "--remove-ratio needs a layer ranking computed from data: run the selection CLI and pass "
            "--selection sel.json (with --remove-ratio to take its first k), or give --remove-layers"
        )
    if spec.remove_layers is None and spec.selection is None:
        return None
    if not _attention_blocks(model):
        raise ShrinkError(f"{spec.name} has no attention layers to remove")
    depth = len(get_blocks(model))
    layers = list(spec.remove_layers) if spec.remove_layers is not None else read_selection(spec.selection, depth)
    if spec.remove_ratio is not None:
        from shrink.selection.layers import ratio_to_k

        k = ratio_to_k(spec.remove_ratio, depth)
        if k > len(layers):
            raise ShrinkError(f"--remove-ratio {spec.remove_ratio} needs {k} layers; {spec.selection} lists {len(layers)}")
        layers = layers[:k]
    if not layers:
        raise ShrinkError("the removal set is empty")
    return validate_layers(model, layers)


def _attention_blocks(model: nn.Module) -> list[int]:
    try:
        return attention_block_indices(model)
    except ShrinkError:
        return []


def _free_blocks(model: nn.Module) -> list[int]:
    if isinstance(getattr(model, "blocks", None), (nn.Sequential, nn.ModuleList)):
        return attention_free_indices(model)
    return []


def _tome_module():
    from shrink.merging import patch as tome

    return tome


def build_variant(base: nn.Module, variant: str, layers: Sequence[int] | None = None,
                  tome_r: int | None = None, tome_start_idx: int = 0, tome_policy: str = "none",
                  tome_inflection: float = 0.0) -> nn.Module:
    """A copy of ``base`` as configuration ``variant``: dense, pruned (dilute + export), +ToMe
    (``tome_r`` tokens per block, or the ramp ``(tome_r, tome_inflection)`` when the inflection is not 0)."""
    if variant not in VARIANTS:
        raise ShrinkError(f"unknown configuration {variant!r}; choose from {', '.join(VARIANTS)}")
    model = copy.deepcopy(base)
    if variant.startswith("pruned"):
        if not layers:
            raise ShrinkError("a pruned configuration needs --remove-layers or --selection")
        dilute(model, layers, lam=0.0)
        model = export(model, inplace=True)
    if variant.endswith("+tome"):
        if tome_r is None:
            raise ShrinkError(f"configuration {variant} needs --tome-r")
        try:
            get_blocks(model)
        except ShrinkError:
            raise ShrinkError(f"ToMe needs a model with a sequence of tokens; {_arch_name(model)} has none") from None
        tome = _tome_module()
        r = (tome_r, float(tome_inflection)) if tome_inflection else tome_r
        patched = tome.apply_tome(model, r, start_idx=tome_start_idx, policy=tome_policy)
        if isinstance(patched, nn.Module):
            model = patched
    return model.eval()


def _arch_name(model: nn.Module) -> str:
    arch = getattr(model, "shrink_arch", None) or {}
    return arch.get("name") or (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__


# ------------------------------------------------------------------------------------------------
# The run plan
# ------------------------------------------------------------------------------------------------

@dataclass
class _Planned:
    spec: ModelSpec
    variant: str
    layers: list[int] | None


def _variants(spec: ModelSpec, layers: list[int] | None) -> list[str]:
    if spec.compare is not None:
        return list(spec.compare)
    out = ["dense"]
    if layers is not None:
        out.append("pruned")
    if spec.tome_r is not None:
        out.append("dense+tome" if layers is None else "pruned+tome")
    return out


def _check_variant(model: nn.Module, spec: ModelSpec, variant: str, layers: list[int] | None) -> None:
    if variant.startswith("pruned") and layers is None and _removal_asked(spec) and not _attention_blocks(model):
        raise ShrinkError(f"{spec.name} {NO_ATTENTION}")
    if variant.startswith("pruned") and layers is None:
        raise ShrinkError(f"{spec.name}: --compare {variant} needs --remove-layers or --selection")
    if variant.endswith("+tome"):
        if spec.tome_r is None:
            raise ShrinkError(f"{spec.name}: --compare {variant} needs --tome-r")
        build_variant(model, variant, layers, spec.tome_r, spec.tome_start_idx, spec.tome_policy,
                      spec.tome_inflection)  # raises if impossible


def _build_base(spec: ModelSpec, img_size: int | None) -> nn.Module:
    if spec.checkpoint is not None and Path(spec.checkpoint).is_dir():
        model = create_model(spec.name, checkpoint=spec.checkpoint)
        if _arch_name(model) != spec.name:
            raise ShrinkError(f"{spec.checkpoint} holds a {_arch_name(model)}, not a {spec.name}")
        if img_size is not None and input_size(model)[1:] != (img_size, img_size):
            raise ShrinkError(f"{spec.checkpoint} was saved at input size {input_size(model)[1:]}; "
                              f"drop --img-size or use a weights file")
        return model.eval()
    kwargs = {"img_size": img_size} if img_size is not None else {}
    model = create_model(spec.name, **kwargs)
    if spec.checkpoint is not None:
        load_checkpoint(model, spec.checkpoint)
    return model.eval()


def _has_dense(spec: ModelSpec) -> bool:
    return spec.compare is None or "dense" in spec.compare


def with_baseline(models: list[ModelSpec], baseline: str | None) -> list[ModelSpec]:
    """``models`` with a dense-only spec of ``baseline`` in front when none of them measures its dense
    configuration (the row every other row is compared with under ``--baseline``)."""
    if baseline is None:
        return list(models)
    if not baseline.strip():
        raise ShrinkError("--baseline is empty; give a model name")
    if any(s.name == baseline and _has_dense(s) for s in models):
        return list(models)
    return [ModelSpec(name=baseline, compare=["dense"]), *models]


def _removal_asked(spec: ModelSpec) -> bool:
    return spec.remove_layers is not None or spec.selection is not None


NO_ATTENTION = "has no attention layers to remove"


def plan(cfg: BenchConfig) -> tuple[list[_Planned], list[dict[str, str]]]:
    """Validate every model and configuration before anything is timed; returns (planned, skipped).

    With one model any impossible configuration is an error. With several, a configuration that
    cannot apply to some model (removal on an MLP-only model) is skipped for it and reported in
    ``skipped`` (the report's table has a row for it); it is an error only if no model admits it.
    """
    models = with_baseline(cfg.models, cfg.baseline)
    planned: list[_Planned] = []
    skipped: list[dict[str, str]] = []
    asked: dict[str, int] = {}
    for spec in models:
        if spec.tome_r is not None and spec.tome_r < 0:
            raise ShrinkError(f"--tome-r must be >= 0, got {spec.tome_r}")
        base = _build_base(spec, cfg.img_size)
        no_attention = len(models) > 1 and not _attention_blocks(base)
        if no_attention:
            layers = None  # removal cannot apply to it; its pruned configurations are skipped below
        else:
            layers = resolve_removal(base, spec)
        variants = _variants(spec, layers)
        if no_attention and _removal_asked(spec):
            # the configurations a removal would have added: reported, never dropped silently
            wanted = _variants(spec, [0])
            variants = [v for v in wanted if not v.startswith("pruned")]
            for v in wanted:
                if v.startswith("pruned"):
                    asked[v] = asked.get(v, 0) + 1
                    skipped.append({"model": spec.name, "variant": v, "reason": f"{spec.name} {NO_ATTENTION}"})
                    _logger.warning("skipping %s %s: %s %s", spec.name, v, spec.name, NO_ATTENTION)
        if spec.compare is not None and spec.tome_r is not None and not any(v.endswith("+tome") for v in variants):
            raise ShrinkError(f"{spec.name}: --tome-r is given but --compare has no +tome configuration")
        if spec.compare is not None and layers is not None and not any(v.startswith("pruned") for v in variants):
            raise ShrinkError(f"{spec.name}: a removal is given but --compare has no pruned configuration")
        for v in variants:
            asked[v] = asked.get(v, 0) + 1
            try:
                _check_variant(base, spec, v, layers)
            except ShrinkError as e:
                if len(models) == 1:
                    raise
                skipped.append({"model": spec.name, "variant": v, "reason": str(e)})
                _logger.warning("skipping %s %s: %s", spec.name, v, e)
                continue
            planned.append(_Planned(spec, v, layers))
        del base
    for v, n in asked.items():
        reasons = [s["reason"] for s in skipped if s["variant"] == v]
        if len(reasons) == n:
            raise ShrinkError(f"no model admits configuration {v}: {reasons[0]}")
    return planned, skipped
