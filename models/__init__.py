"""Architectures registered into timm on import: the embedded demo ViT and the MLP families timm lacks."""
