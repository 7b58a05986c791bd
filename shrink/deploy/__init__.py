"""Deploy a (pruned, token-merged) model: ``torch.export`` programs (.pt2) and ONNX files, with metadata.

    python -m shrink.deploy --checkpoint out/run/best --format onnx --batch-size 32     (the CLI: __main__.py)
    python -m shrink.deploy --checkpoint out/run/best --format pt2 --tome-r 8 --tome-start-idx 1

Works for dense timm ViTs, diluted models at lambda = 0 (exported to attention-free blocks
first), attention-free models with or without the folded factor, and token-merged models (ToMe
with a fixed r per block, so every shape is static except the batch). The batch dimension is
dynamic unless ``dynamic_batch=False`` / ``--static-batch``.

Every artefact carries its metadata (schema ``shrink.deploy/1``: input size, mean/std,
interpolation, class count, removed layers, folding, ToMe settings and tokens per block, batch)
inside the file (ONNX ``metadata_props`` key ``shrink.deploy``; the .pt2 archive's extra file
``shrink.deploy.json``) and in a sidecar ``<file>.json``.

ONNX needs the optional ``deploy`` extra (``pip install -e ".[deploy]"``: onnx, onnxruntime,
onnxscript); ``import shrink`` and the .pt2 path never need it.

Formats are registered (``@register_format`` in :mod:`shrink.deploy.formats`); the writers are in
:mod:`shrink.deploy.onnx_export` and :mod:`shrink.deploy.pt2`, the ONNX graph check in
:mod:`shrink.deploy.check`, what they share in :mod:`shrink.deploy.metadata`.
"""
from shrink.deploy.check import ATTENTION_OPS, attention_nodes, check_attention_free
from shrink.deploy.formats import (
    FORMAT_REGISTRY,
    FORMATS,
    ExportFormat,
    deploy,
    get_format,
    read_metadata,
    register_format,
    unregister_format,
)
from shrink.deploy.metadata import (
    INPUT_NAME,
    METADATA_KEY,
    MIN_OPSET,
    OUTPUT_NAME,
    PT2_EXTRA_FILE,
    SCHEMA,
    deploy_metadata,
    max_abs_diff,
    model_input_size,
    prepare_model,
    require_deploy_extra,
    sidecar_path,
)
from shrink.deploy.onnx_export import (
    export_onnx,
    load_onnx_session,
    to_onnx,
)
from shrink.deploy.pt2 import export_program, load_program, save_program

__all__ = [
    "ATTENTION_OPS",
    "ExportFormat",
    "FORMATS",
    "FORMAT_REGISTRY",
    "INPUT_NAME",
    "METADATA_KEY",
    "MIN_OPSET",
    "OUTPUT_NAME",
    "PT2_EXTRA_FILE",
    "SCHEMA",
    "attention_nodes",
    "check_attention_free",
    "deploy",
    "deploy_metadata",
    "export_onnx",
    "export_program",
    "get_format",
    "load_onnx_session",
    "load_program",
    "max_abs_diff",
    "model_input_size",
    "prepare_model",
    "read_metadata",
    "register_format",
    "require_deploy_extra",
    "save_program",
    "sidecar_path",
    "to_onnx",
    "unregister_format",
]
