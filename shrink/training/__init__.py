"""Training: the run's configuration, its parts, the Trainer, the output folder, metrics, FSDP2."""
from __future__ import annotations

import importlib

# Public names, imported on first use (the upper layers import each other's submodules directly).
_EXPORTS = {
    "RunConfig": "config",
    "SCHEDS": "config",
    "MAX_SEED": "config",
    "tome_r_arg": "config",
    "tome_schedule_for": "config",
    "set_constant_drop_path": "parts",
    "build_model": "parts",
    "build_datasets": "parts",
    "make_loader": "parts",
    "resolve_layers": "parts",
    "build_loss": "parts",
    "build_mixup": "parts",
    "build_optimizer": "parts",
    "TrainingDiverged": "loop",
    "TrainParts": "loop",
    "EpochStats": "loop",
    "distillation_loss": "loop",
    "train_one_epoch": "loop",
    "evaluate": "loop",
    "Trainer": "trainer",
    "TrainerState": "state",
    "run": "trainer",
    "say": "report",
    "epoch_line": "report",
    "deployable": "evaluation",
    "load_state_tensors": "state",
    "evaluate_checkpoint": "evaluation",
    "CONFIG": "run_folder",
    "DEPLOY": "run_folder",
    "RUN_ENTRIES": "run_folder",
    "RESUMABLE_CHANGES": "run_folder",
    "is_run_dir": "run_folder",
    "enclosing_run_dir": "run_folder",
    "check_outside_run": "run_folder",
    "RunDir": "run_folder",
    "inspect_output_dir": "run_folder",
    "SHARED_FS_HINT": "run_folder",
    "check_shared_output_dir": "run_folder",
    "check_resume_settings": "run_folder",
    "create_run_dir": "run_folder",
    "remove_run_dir": "run_folder",
    "DENSE_LABEL": "metrics",
    "BEST_LABEL": "metrics",
    "SWITCH_LABEL": "metrics",
    "read_metrics": "metrics",
    "switch_epoch": "metrics",
    "best_deployable": "metrics",
    "metrics_figure": "metrics",
    "plot_metrics": "metrics",
    "mark_shard_units": "sharding",
    "is_sharded": "sharding",
    "whole_model": "sharding",
    "export_for_training": "sharding",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
