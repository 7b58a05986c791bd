"""A run's resumable state: saved after the set-up and after every epoch into ``out/state``, restored
in one place.

``out/state`` holds Accelerate's state (the bare model's weights, the optimizer, the grad scaler, the RNG
of every process), ``ema.safetensors`` with ``--model-ema``, and ``trainer_state.json``
(:class:`TrainerState`: JSON, never pickled), written last, so its presence marks a whole state. The
folder is written beside as ``.state.tmp`` and swapped in atomically.

Public, for the :class:`shrink.training.trainer.Trainer` and for tests that fake a moment of a run:
:func:`keep_bare_model_keys`, :func:`save_state`, :func:`read_trainer_state`, :func:`restore_state`,
:func:`load_state_tensors`, :func:`truncate_metrics`.
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors.torch import load_file, save_file

from shrink.errors import ShrinkError, first_line
from shrink.io import atomic_write, atomic_write_json, atomic_write_text, replace_dir
from shrink.modelio.create import read_config
from shrink.unwrap import unwrap

_logger = logging.getLogger(__name__)

_WRAPPER_PREFIXES = ("_orig_mod.", "module.")  # torch.compile's and DDP's, in states of older versions


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
    weights: dict[str, Any] = field(default_factory=dict)  # where the starting weights came from
    warnings: list[str] = field(default_factory=list)  # the run's warnings, one line each, for summary.json


def save_state(accelerator: Accelerator, out: Path, ts: TrainerState, ema) -> None:
    """Accelerate state + trainer_state.json (+ ema.safetensors) into out/state, swapped in atomically."""
    tmp = out / ".state.tmp"
    if accelerator.is_main_process and tmp.exists():
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


def keep_bare_model_keys(accelerator: Accelerator) -> None:
    """``state/model.safetensors`` holds the bare model's keys, whatever wraps it (torch.compile, DDP), and
    loads into the bare model through :func:`load_state_tensors` (onto ``accelerator.device``; keys of
    older states lose their wrapper prefixes), so a resume may switch ``--compile`` on or off. Under
    FSDP Accelerate saves and loads the sharded model its own way. Call once, before any save or load."""
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


def read_trainer_state(state_dir: Path, accelerator: Accelerator) -> TrainerState:
    """``trainer_state.json`` of a saved state, checked; a damaged file or another process count is one line."""
    path = state_dir / "trainer_state.json"
    try:
        data = json.loads(path.read_text())
        known = {f.name for f in fields(TrainerState)}
        ts = TrainerState(**{k: v for k, v in data.items() if k in known})
        if not isinstance(ts.epoch, int) or not isinstance(ts.layers, list) or \
                not all(isinstance(i, int) for i in ts.layers):
            raise ValueError("wrong types")
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise ShrinkError(f"cannot resume: {path} is damaged ({first_line(e)})") from None
    if ts.num_processes != accelerator.num_processes:
        raise ShrinkError(f"cannot resume: the run was saved by {ts.num_processes} process(es) and this one has "
                          f"{accelerator.num_processes}; launch it with --num_processes {ts.num_processes}")
    return ts


def restore_state(accelerator: Accelerator, state_dir: Path, ts: TrainerState, ema) -> None:
    """Load Accelerate's state (model, optimizer, scaler, RNG of every process), the EMA, and a newer best/.

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
        raise ShrinkError(f"cannot resume: {rng} does not load ({first_line(e)})") from None
    try:
        accelerator.load_state(str(state_dir))
    except Exception as e:  # noqa: BLE001 - torch / safetensors raise many types on damaged files
        raise ShrinkError(f"cannot resume from {state_dir}: {first_line(e)}") from None
    if ema is not None:
        path = state_dir / "ema.safetensors"
        try:
            ema.module.load_state_dict(load_state_tensors(path, accelerator.device))
        except Exception as e:  # noqa: BLE001
            raise ShrinkError(f"cannot resume: {path} does not load ({first_line(e)})") from None
    best = state_dir.parent / "best"
    if (best / "config.json").is_file():  # best/ may be newer than the state (kill between the two writes)
        extra = read_config(best).get("extra", {})
        if isinstance(extra.get("acc_deploy"), (int, float)) and extra["acc_deploy"] > ts.best_acc:
            ts.best_acc, ts.best_epoch = float(extra["acc_deploy"]), int(extra.get("epoch", ts.best_epoch))
            ts.best_source = str(extra.get("source", ts.best_source))
    _logger.info("resumed from %s after epoch %d", state_dir, ts.epoch)


def load_state_tensors(path: Path, device: torch.device | str) -> dict[str, torch.Tensor]:
    """The one reader of the weights a resume loads (``state/model.safetensors``, ``state/ema.safetensors``):
    safetensors, read on the CPU and moved to ``device`` (``accelerator.device``; safetensors itself
    refuses names such as ``cpu:0`` that a multi-process CPU run has), wrapper prefixes removed from the
    keys (torch.compile's ``_orig_mod.``, DDP's ``module.``, in states of older versions)."""
    return {_strip_wrappers(k): v.to(device) for k, v in load_file(str(path), device="cpu").items()}


def _strip_wrappers(key: str) -> str:
    while key.startswith(_WRAPPER_PREFIXES):
        key = key.split(".", 1)[1]
    return key


def truncate_metrics(path: Path, start_epoch: int) -> None:
    """Drop the lines of ``metrics.jsonl`` from ``start_epoch`` on (a resume writes them again)."""
    if not path.exists():
        return
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    keep = [r for r in rows if json.loads(r)["epoch"] < start_epoch]
    if len(keep) != len(rows):
        atomic_write_text(path, "".join(r + "\n" for r in keep))
