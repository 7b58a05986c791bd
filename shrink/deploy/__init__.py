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
"""
from shrink.deploy.formats import (
    ATTENTION_OPS,
    FORMATS,
    INPUT_NAME,
    METADATA_KEY,
    MIN_OPSET,
    OUTPUT_NAME,
    PT2_EXTRA_FILE,
    SCHEMA,
    attention_nodes,
    check_attention_free,
    deploy,
    deploy_metadata,
    export_onnx,
    export_program,
    load_onnx_session,
    load_program,
    max_abs_diff,
    model_input_size,
    prepare_model,
    read_metadata,
    require_deploy_extra,
    save_program,
    sidecar_path,
    to_onnx,
)

__all__ = [
    "ATTENTION_OPS",
    "FORMATS",
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
    "load_onnx_session",
    "load_program",
    "max_abs_diff",
    "model_input_size",
    "prepare_model",
    "read_metadata",
    "require_deploy_extra",
    "save_program",
    "sidecar_path",
    "to_onnx",
]
