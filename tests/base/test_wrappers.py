"""shrink.unwrap: unwrap finds the bare model under DDP-like and torch.compile-like wrappers."""
from __future__ import annotations

from torch import nn

from shrink.unwrap import unwrap


class DDPLike(nn.Module):
    """What DDP and FSDP look like from outside: the model under ``.module``."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module


class CompiledLike(nn.Module):
    """What torch.compile returns: the model under ``._orig_mod``."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self._orig_mod = module


class WithBlocks(nn.Module):
    """A model that happens to have a ``module`` child of its own (and ``blocks``, as a ViT has)."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(nn.Linear(2, 2))
        self.module = nn.Linear(2, 2)


def test_bare_model_is_returned_as_is():
    m = nn.Linear(2, 2)
    assert unwrap(m) is m


def test_ddp_compile_and_nested_wrappers():
    m = nn.Linear(2, 2)
    assert unwrap(DDPLike(m)) is m
    assert unwrap(CompiledLike(m)) is m
    assert unwrap(CompiledLike(DDPLike(CompiledLike(m)))) is m


def test_a_vit_with_a_module_attribute_is_not_unwrapped():
    m = WithBlocks()
    assert unwrap(m) is m
    assert unwrap(DDPLike(m)) is m
