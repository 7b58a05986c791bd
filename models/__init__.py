"""Architectures registered into timm on import: the embedded demo ViT and the MLP families timm lacks."""
from . import vit_digits  # noqa: F401

# isort: split
from . import bottleneck_mlp, ff_vit, fnet, loaders, mlp_presets, ms_mlp  # noqa: F401  (the MLP families, issue 7)
