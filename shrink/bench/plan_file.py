"""Plan files (``benchmark.py --plan``): a ``main_lambda.py`` config written by the planner and the
``plan.json`` record beside it, read into the :class:`~shrink.bench.spec.ModelSpec` that measures the
plan against the dense model."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from shrink.bench.spec import ModelSpec
from shrink.errors import ShrinkError
from shrink.values import parse_layers

__all__ = ["PLAN_RECORD_KEYS", "read_plan"]

PLAN_RECORD_KEYS = ("predicted_speedup", "predicted_ms", "dense_predicted_ms", "cost_key", "candidate")


def _int(v: object, what: str, low: int = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ShrinkError(f"{what} must be an integer >= {low}, got {v!r}")
    return v


def _number(v: object, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ShrinkError(f"{what} must be a finite number, got {v!r}")
    return float(v)


def read_plan(path: str | os.PathLike) -> tuple[ModelSpec, dict]:
    """``PLAN.yaml`` (a ``main_lambda.py --config`` file: model, remove_layers, tome_r, tome_inflection,
    tome_start_idx, tome_policy; other keys ignored) -> the spec measuring dense against the plan, and
    the plan's description (``record``: PLAN.json beside it, None when there is none)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ShrinkError(f"plan file {p} not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ShrinkError(f"cannot read plan file {p}: {getattr(e, 'strerror', None) or e}") from None
    except yaml.YAMLError as e:
        raise ShrinkError(f"plan file {p} is not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise ShrinkError(f"plan file {p} must be a mapping of config keys")
    what = f"plan file {p}:"
    name = data.get("model")
    if not isinstance(name, str) or not name.strip():
        raise ShrinkError(f"{what} 'model' must be a model name")
    layers = data.get("remove_layers")
    if layers is None or layers == "":
        layers = []
    elif isinstance(layers, str):
        layers = parse_layers(layers, f"{what} remove_layers")
    elif isinstance(layers, int) and not isinstance(layers, bool):
        layers = [layers]
    if not isinstance(layers, list):
        raise ShrinkError(f"{what} remove_layers must be a list of block indices, got {layers!r}")
    layers = [_int(i, f"{what} remove_layers entry") for i in layers]
    if len(set(layers)) != len(layers):
        raise ShrinkError(f"{what} remove_layers has a repeated index: {layers}")
    r = _int(data.get("tome_r", 0) or 0, f"{what} tome_r")
    inflection = _number(data.get("tome_inflection", 0.0) or 0.0, f"{what} tome_inflection")
    if not -1.0 <= inflection <= 1.0:
        raise ShrinkError(f"{what} tome_inflection must be in [-1, 1], got {inflection}")
    start = _int(data.get("tome_start_idx", 0) or 0, f"{what} tome_start_idx")
    policy = data.get("tome_policy", "none") or "none"
    if policy not in ("none", "hidden"):
        raise ShrinkError(f"{what} tome_policy must be none or hidden, got {policy!r}")
    variant = ("pruned" if layers else "dense") + "+tome"  # ToMe with r = 0 is the plain model
    spec = ModelSpec(name=name.strip(), remove_layers=layers or None, tome_r=r, tome_start_idx=start,
                     tome_policy=policy, tome_inflection=inflection, compare=["dense", variant])
    plan = {"path": str(p), "variant": variant,
            "config": {"remove_layers": layers, "tome_r": r, "tome_inflection": inflection, "tome_start_idx": start,
                       "tome_policy": policy},
            "record_path": None, "record": None}
    rec_path = p.with_suffix(".json")
    if rec_path.is_file():
        plan["record_path"], plan["record"] = str(rec_path), _read_plan_record(rec_path, plan["config"])
    return spec, plan


def _read_plan_record(path: Path, config: dict) -> dict:
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ShrinkError(f"cannot read plan record {path}: {getattr(e, 'strerror', None) or e}") from None
    except json.JSONDecodeError as e:
        raise ShrinkError(f"plan record {path} is not valid JSON: {e}") from None
    if not isinstance(rec, dict) or any(k not in rec for k in PLAN_RECORD_KEYS):
        raise ShrinkError(f"plan record {path} needs the keys {', '.join(PLAN_RECORD_KEYS)}")
    for k in ("predicted_speedup", "predicted_ms", "dense_predicted_ms"):
        if _number(rec[k], f"plan record {path}: {k}") <= 0:
            raise ShrinkError(f"plan record {path}: {k} must be > 0, got {rec[k]!r}")
    cand, key = rec["candidate"], rec["cost_key"]
    if not isinstance(cand, dict) or not isinstance(key, dict):
        raise ShrinkError(f"plan record {path}: candidate and cost_key must be mappings")
    mine = {"remove_layers": sorted(config["remove_layers"]), "tome_r": config["tome_r"],
            "tome_inflection": config["tome_inflection"], "tome_start_idx": config["tome_start_idx"],
            "tome_policy": config["tome_policy"]}
    theirs = {"remove_layers": sorted(cand.get("removed") or []), "tome_r": cand.get("tome_r", 0),
              "tome_inflection": float(cand.get("tome_inflection", 0.0) or 0.0),
              "tome_start_idx": cand.get("tome_start_idx", 0), "tome_policy": cand.get("tome_policy", "none")}
    diff = [k for k in mine if mine[k] != theirs[k]]
    if diff:
        raise ShrinkError(f"plan record {path} describes another plan than its plan file "
                          f"(differs in {', '.join(diff)})")
    return rec
