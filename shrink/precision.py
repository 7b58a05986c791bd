"""Precision names and their torch dtypes: one table for training, selection, benchmarks and scripts."""
from __future__ import annotations

import torch

from shrink.errors import ShrinkError

__all__ = ["DTYPES", "dtype_of"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Accelerate's mixed_precision says "no" for full precision; ``python -m shrink.select --amp`` says "off"
_ALIASES = {"no": "fp32", "off": "fp32"}


def dtype_of(name: str) -> torch.dtype:
    """``'fp32' | 'bf16' | 'fp16'`` (or ``'no'`` / ``'off'`` for fp32) -> the torch dtype."""
    key = _ALIASES.get(name, name)
    if key not in DTYPES:
        raise ShrinkError(f"unknown precision {name!r}; choose from {', '.join(DTYPES)}")
    return DTYPES[key]
