"""The eval path of a run: what best/ and last/ hold, token merging in a run, the summary, ``--eval``.

* :func:`deployable`: the attention-free copy of a model that best/ and last/ hold.
* :func:`tome_setup`, :func:`merge_as_trained`, :func:`tome_extra`: token merging in a run (``--tome-r``,
  ``--tome-train``); the deployable model's merging schedule is fixed once, from the diluted model.
* :func:`measure_best`, :func:`run_summary`: best/ reloaded and measured; the dict a training run
  returns and writes as summary.json.
* :func:`evaluate_checkpoint`: ``main_lambda.py --eval``, the accuracy of a saved model (with and
  without token merging).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from shrink.blocks.attention_free import attention_free_indices, export
from shrink.data.datasets import build_dataset
from shrink.introspect import num_params
from shrink.merging.patch import apply_tome, is_tome, remove_tome, tome_token_counts
from shrink.modelio.create import load
from shrink.training.config import RunConfig, tome_r_arg, tome_schedule_for
from shrink.training.loop import evaluate
from shrink.training.parts import make_loader
from shrink.training.state import TrainerState
from shrink.unwrap import unwrap

_logger = logging.getLogger(__name__)

_TOME_KEYS = ("r", "inflection", "start_idx", "policy", "train", "r_per_block", "tokens_per_block")


def deployable(model: nn.Module) -> nn.Module:
    """The attention-free copy of ``model`` that best/ and last/ hold: exported, without ToMe classes."""
    out = export(model)
    if is_tome(out):
        remove_tome(out)
    return out


def tome_setup(cfg: RunConfig, model: nn.Module, layers: list[int]) -> dict[str, Any] | None:
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


def merge_as_trained(cfg: RunConfig, tome: dict[str, Any] | None, model: nn.Module) -> None:
    """With --tome-train: ``model`` (the EMA, a newly exported model) merges with the run's schedule."""
    if cfg.tome_train and tome is not None:
        apply_tome(model, tome["r_per_block"], policy=cfg.tome_policy)


def tome_extra(tome: dict[str, Any] | None) -> dict[str, Any]:
    """The merging settings recorded in best/ and last/ config.json (``extra.tome``)."""
    return {} if tome is None else {"tome": {k: tome[k] for k in _TOME_KEYS}}


def measure_best(cfg: RunConfig, best_dir: Path, device, evaluate_fn: Callable[[nn.Module, str], float],
                 tome: dict[str, Any] | None) -> dict[str, Any]:
    """best/ reloaded from disk: its parameters and accuracy (``evaluate_fn(model, desc)``), evaluated
    the way it was chosen (``acc_reloaded``: with merging under --tome-train, applied as
    ``main_lambda.py --eval --tome-r ...`` applies it); with --tome-r also ``with_tome`` and ``without_tome``."""
    best: dict[str, Any] = {"acc_reloaded": None, "params": None, "with_tome": None, "without_tome": None}
    if not best_dir.is_dir():
        return best
    model = load(best_dir, device=device)
    best["params"] = num_params(model)
    best["without_tome"] = evaluate_fn(model, "best")
    if tome is not None:  # exactly what --eval --checkpoint best --tome-r ... does
        apply_tome(model, tome_r_arg(cfg), cfg.tome_start_idx, cfg.tome_policy)
        best["with_tome"] = evaluate_fn(model, "best+tome")
    best["acc_reloaded"] = best["with_tome"] if cfg.tome_train else best["without_tome"]
    return best


def run_summary(cfg: RunConfig, ts: TrainerState, out: Path, final: list[dict], best: dict[str, Any],
                num_processes: int, seconds: float, tome: dict[str, Any] | None) -> dict[str, Any]:
    """summary.json of a training run; ``best`` holds what the reloaded best/ measured
    (``acc_reloaded``, ``params``, ``with_tome``, ``without_tome``)."""
    return {
        "kind": "train",
        "model": cfg.model, "data_set": cfg.data_set, "epochs": cfg.epochs,
        "removed_layers": ts.layers, "criterion": ts.selection.get("criterion"),
        "selection": ts.selection,
        "dense_acc": ts.dense_acc, "deploy_acc_start": ts.deploy_acc_start,
        "deploy_acc_best": ts.best_acc if ts.best_epoch >= 0 else None, "best_epoch": ts.best_epoch,
        "best_source": ts.best_source, "best_acc_reloaded": best["acc_reloaded"],
        "tome": None if tome is None else {k: v for k, v in tome.items() if k != "tokens_per_block"},
        "tokens_per_block": None if tome is None else tome["tokens_per_block"],
        "final_acc": final[-1].get("acc") if final else None,
        "final_acc_deploy": final[-1].get("acc_deploy") if final else None,
        "params_dense": ts.params_dense, "params_deploy": best["params"],
        "seconds_training": round(seconds, 1),
        "num_processes": num_processes,
        "pretrained": ts.weights.get("pretrained"), "weights": ts.weights,
        "calib_images_used": ts.selection.get("calib_images"),
        "warnings": ts.warnings,
        **({"best_acc_with_tome": best["with_tome"], "best_acc_without_tome": best["without_tome"]}
           if tome is not None else {}),
        "paths": {"summary": str(out / "summary.json"), "best": str(out / "best"), "last": str(out / "last"),
                  "state": str(out / "state"), "metrics": str(out / "metrics.jsonl"), "plot": str(out / "metrics.png"),
                  "config": str(out / "config.yaml")},
    }


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
    result: dict[str, Any] = {"kind": "eval", "checkpoint": cfg.checkpoint, "params": num_params(raw),
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
