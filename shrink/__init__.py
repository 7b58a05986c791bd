"""shrink: turn Vision Transformers into faster, partly-MLP networks.

Pick the least informative attention layers, fade them out with a lambda schedule while
fine-tuning, and export the model with those attention layers physically gone.
"""

# The model families first: importing shrink registers them with timm (shrink.models imports only torch and timm).
# shrink._source_tree imports shrink.models: the installed package, or models/ of a clone that is not installed.
from shrink._source_tree import models  # noqa: F401  isort: skip
from shrink import _old_paths
from shrink.blocks.attention_free import (
    AttentionFreeBlock,
    attention_free_indices,
    export,
    fold_residual_scale,
)
from shrink.blocks.dilution import (
    DilutedBlock,
    deploy_mode,
    dilute,
    diluted_blocks,
    get_lambda,
    lambda_at,
    set_lambda,
)
from shrink.errors import ShrinkError
from shrink.merging.patch import apply_tome, remove_tome, tome_token_counts
from shrink.modelio.checkpoint import get_bottleneck_mlp, load_checkpoint, read_checkpoint
from shrink.modelio.create import create_model
from shrink.modelio.saved import load, save
from shrink.selection.layers import select_layers

__version__ = "0.1.0"

# the flat layout's module paths (shrink.train, shrink.tome, ...) still import, with a DeprecationWarning
_old_paths.install()

# shrink.deploy is imported on first use: it is only needed for exports
_DEPLOY_NAMES = ("export_onnx", "export_program", "load_onnx_session", "load_program", "save_program")


def __getattr__(name: str):
    if name in _DEPLOY_NAMES:
        from shrink import deploy

        return getattr(deploy, name)
    raise AttributeError(f"module 'shrink' has no attribute {name!r}")

__all__ = [
    "AttentionFreeBlock",
    "apply_tome",
    "remove_tome",
    "tome_token_counts",
    "DilutedBlock",
    "ShrinkError",
    "attention_free_indices",
    "create_model",
    "deploy_mode",
    "dilute",
    "diluted_blocks",
    "export",
    "export_onnx",
    "export_program",
    "get_bottleneck_mlp",
    "fold_residual_scale",
    "get_lambda",
    "lambda_at",
    "load",
    "load_onnx_session",
    "load_program",
    "load_checkpoint",
    "read_checkpoint",
    "save",
    "save_program",
    "select_layers",
    "set_lambda",
]
