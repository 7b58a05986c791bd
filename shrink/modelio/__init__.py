"""Models in and out: checkpoint reading (ours and foreign: ``checkpoint``), ``create_model`` (``create``),
save / load of a model folder (``saved``) and its config.json schema (``schema``)."""
from shrink.introspect import input_size
from shrink.modelio.checkpoint import (
    checkpoint_filter,
    get_bottleneck_mlp,
    key_report,
    load_checkpoint,
    read_checkpoint,
)
from shrink.modelio.create import check_hub, create_model, model_skeleton
from shrink.modelio.saved import build_from_config, check_input_size, describe_architecture, load, save
from shrink.modelio.schema import CONFIG_FILE, FORMAT, MAX_PARAMS, MODEL_FILE, read_config, validate_config

__all__ = [
    "CONFIG_FILE",
    "FORMAT",
    "MAX_PARAMS",
    "MODEL_FILE",
    "build_from_config",
    "check_hub",
    "check_input_size",
    "checkpoint_filter",
    "create_model",
    "describe_architecture",
    "get_bottleneck_mlp",
    "input_size",
    "key_report",
    "load",
    "load_checkpoint",
    "model_skeleton",
    "read_checkpoint",
    "read_config",
    "save",
    "validate_config",
]
