"""The architectures this project registers with timm: the embedded demo ViT and the MLP families timm lacks.

Installed as ``shrink.models`` (this folder is mapped there by pyproject.toml) and imported by
``import shrink``, which registers every family with timm. Pure timm-style files: they import only
torch and timm, never ``shrink``, and raise what timm raises. Checkpoints of the original
repositories load with :func:`shrink.load_checkpoint`, which applies each file's ``checkpoint_filter_fn``.
"""
from . import bottleneck_mlp, ff_vit, fnet, mlp_presets, ms_mlp, vit_digits  # noqa: F401
