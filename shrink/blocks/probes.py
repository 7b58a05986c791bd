"""Running blocks differently for a while (selection): attention skipped as an identity, or the two
branches reported to callbacks. The block's forward is swapped on the instance and restored."""
from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
from torch import nn

from shrink.blocks.contract import Family, block_family, classify_block
from shrink.errors import ShrinkError

__all__ = ["probe_branches", "skip_attention"]


@contextlib.contextmanager
def _forward_override(blocks: Sequence[nn.Module], make: Callable[[nn.Module, Family], Callable]) -> Iterator[None]:
    saved: list[tuple[nn.Module, object]] = []
    try:
        for blk in blocks:
            fam = block_family(blk)
            if fam is None or classify_block(blk) != "attention":
                raise ShrinkError(f"block {type(blk).__name__} has no attention branch to run this way")
            saved.append((blk, blk.__dict__.get("forward", None)))
            blk.forward = types.MethodType(make(blk, fam), blk)
        yield
    finally:
        for blk, fwd in saved:
            if fwd is None:
                blk.__dict__.pop("forward", None)
            else:
                blk.forward = fwd


def skip_attention(blocks: Sequence[nn.Module]):
    """Context: the attention branch of ``blocks`` is a pure identity (``x``, not ``2x``), the
    paper's "skip" for selection on the untouched model."""
    def make(blk, fam):
        def forward(self, x, *args, **kwargs):
            return fam.forward(self, x, None, 1.0, fam.context(args, kwargs))
        return forward
    return _forward_override(blocks, make)


def probe_branches(blocks: dict[int, nn.Module], on_attention: Callable[[int, torch.Tensor, torch.Tensor], None],
                   on_mlp: Callable[[int, torch.Tensor], None], skip: Iterable[int] = ()):
    """Context: ``blocks`` (index -> block) run as in timm but report their branches:
    ``on_attention(i, block_input, attention_branch)`` and ``on_mlp(i, mlp_branch)``. Blocks in
    ``skip`` run with their attention as an identity (and report only the MLP branch)."""
    skip = set(skip)

    def make_for(i):
        class Probe:
            def attention(self, x, a):
                on_attention(i, x, a)

            def mlp(self, m):
                on_mlp(i, m)

        def make(blk, fam):
            def forward(self, x, *args, **kwargs):
                lam = None if i in skip else 1.0
                return fam.forward(self, x, lam, 1.0, fam.context(args, kwargs), probe=Probe())
            return forward
        return make

    @contextlib.contextmanager
    def run():
        with contextlib.ExitStack() as stack:
            for i, blk in blocks.items():
                stack.enter_context(_forward_override([blk], make_for(i)))
            yield
    return run()
