"""The bare model under the wrappers training puts around it (torch.compile, DDP, FSDP)."""
from __future__ import annotations

from torch import nn

__all__ = ["unwrap"]


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model under torch.compile and DDP / FSDP wrappers (``model`` itself when unwrapped)."""
    while True:
        if hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(model.module, nn.Module) and not hasattr(model, "blocks"):
            model = model.module  # DDP / FSDP wrappers
        else:
            return model
