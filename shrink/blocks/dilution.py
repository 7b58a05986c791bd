"""Lambda dilution of the attention sublayers of timm transformer blocks, and the lambda schedules.

A diluted pre-norm block computes ``x = (2 - lam) * x + lam * attention_branch(x)`` and then the
unchanged MLP branch (the rule of each block family is in :mod:`shrink.blocks.contract`). ``lam = 1`` is the
original block, ``lam = 0`` is ``x -> 2x`` followed by the MLP, and at ``lam = 0`` the attention
is not computed at all.
"""
from __future__ import annotations

import contextlib
import logging
import math
import numbers
from collections.abc import Callable, Iterable, Iterator, Sequence

from torch import nn

from shrink.blocks.contract import (
    DilutedBlock,
    attention_block_indices,
    check_lambda,
    check_residual_scale,
    classify_block,
    dilute_block,
    get_blocks,
    unsupported_reason,
)
from shrink.errors import ShrinkError
from shrink.registry import Registry
from shrink.unwrap import unwrap

_logger = logging.getLogger(__name__)


def has_attention_layers(model: nn.Module) -> bool:
    """Whether ``model`` is a ViT-style model with at least one attention sublayer to remove."""
    try:
        return bool(attention_block_indices(model))
    except ShrinkError:  # no transformer blocks at all
        return False


def validate_layers(model: nn.Module, layers: Iterable[int]) -> list[int]:
    """Check a layer list against a model: ints, in range, no repeats, attention-bearing."""
    blocks = get_blocks(model)
    depth = len(blocks)
    out: list[int] = []
    for raw in layers:
        if isinstance(raw, bool) or not isinstance(raw, numbers.Integral):
            raise ShrinkError(f"layer index {raw!r} is not an integer")
        i = int(raw)
        if not 0 <= i < depth:
            raise ShrinkError(f"layer index {i} is out of range for a model with {depth} blocks (0..{depth - 1})")
        if i in out:
            raise ShrinkError(f"layer index {i} is given more than once")
        kind = classify_block(blocks[i])
        if kind == "attention-free":
            raise ShrinkError(f"block {i} has no attention sublayer to remove: it is already attention-free")
        if kind == "unsupported":
            raise ShrinkError(f"block {i}: {unsupported_reason(blocks[i])}")
        out.append(i)
    return out


def diluted_blocks(model: nn.Module) -> dict[int, DilutedBlock]:
    """Map from block index to DilutedBlock for every diluted block of ``model``."""
    return {i: b for i, b in enumerate(get_blocks(model)) if isinstance(b, DilutedBlock)}


def dilute(model: nn.Module, layers: Sequence[int], lam: float = 1.0,
           residual_scale: float | None = None) -> nn.Module:
    """Dilute the blocks at ``layers`` in place (see :mod:`shrink.blocks.contract`) and return the model.

    ``residual_scale`` is the identity factor at lambda = 0: None takes the block family's rule
    (2, the reference's, for pre-norm and parallel blocks; 1 for post-norm blocks). Blocks already
    diluted keep their blocks (their lambda is set to ``lam``).
    """
    layers = validate_layers(model, layers)
    lam = check_lambda(lam)
    if residual_scale is not None:
        residual_scale = check_residual_scale(residual_scale)  # before any block changes
    blocks = get_blocks(model)
    for i in layers:
        dilute_block(blocks[i], lam, residual_scale)
    _logger.info("diluted blocks %s at lambda=%g", layers, lam)
    return model


def set_lambda(model: nn.Module, value: float) -> None:
    """Set lambda of every diluted block of ``model`` (unwrap DDP / compile wrappers first)."""
    v = check_lambda(value)
    blocks = diluted_blocks(unwrap(model))
    if not blocks:
        raise ShrinkError("the model has no diluted blocks: call shrink.dilute(model, layers) first")
    for b in blocks.values():
        b.set_lambda(v)


def get_lambda(model: nn.Module) -> float | None:
    """The common lambda of the diluted blocks, or None if the model has none."""
    vals = {b.lambda_value for b in diluted_blocks(unwrap(model)).values()}
    if not vals:
        return None
    if len(vals) > 1:
        raise ShrinkError(f"diluted blocks have different lambdas: {sorted(vals)}")
    return vals.pop()


@contextlib.contextmanager
def deploy_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Temporarily run every diluted block at lambda = 0 (the deployable model), then restore."""
    blocks = diluted_blocks(unwrap(model))
    saved = {i: b.lambda_value for i, b in blocks.items()}
    try:
        for b in blocks.values():
            b.set_lambda(0.0)
        yield model
    finally:
        for i, b in blocks.items():
            b.set_lambda(saved[i])


# --------------------------------------------------------------------------------------------------
# Schedules: pure functions of (epoch, step) -> lambda, easy to plot.
# --------------------------------------------------------------------------------------------------

SCHEDULE_REGISTRY: Registry[Callable[[int, int, int, float], float]] = Registry("lambda schedule")
SCHEDULES = SCHEDULE_REGISTRY.names  # ('reference', 'linear', 'cosine', 'constant', and any registered later)


def register_schedule(name: str):
    """Decorator: ``fn(epoch, step, steps_per_epoch, dilution_epochs) -> lambda`` becomes schedule ``name``."""
    def deco(fn):
        SCHEDULE_REGISTRY.add(name, fn)
        return fn
    return deco


def get_schedule(name: str) -> Callable[[int, int, int, float], float]:
    """The schedule function of ``name`` (a one-line ShrinkError naming the known ones otherwise)."""
    return SCHEDULE_REGISTRY.lookup(name)


def unregister_schedule(name: str) -> None:
    SCHEDULE_REGISTRY.remove(name)


def lambda_reference(epoch: int, dilution_epochs: float = 299) -> float:
    """The paper's schedule, ``max(0, 1 - epoch / dilution_epochs)``, set once per epoch.

    The reference hard-codes ``dilution_epochs = 299`` inside 400 epochs, so the last 101 epochs
    train at lambda = 0. A fractional ``dilution_epochs`` is used as it is (2.5: 1, 0.6, 0.2, 0).
    """
    if dilution_epochs <= 0:
        return 0.0
    return max(0.0, 1.0 - epoch / dilution_epochs)


def _progress(epoch: int, step: int, steps_per_epoch: int, dilution_epochs: float) -> float:
    total = dilution_epochs * steps_per_epoch
    if total <= 0:
        return 1.0
    return min(1.0, max(0.0, (epoch * steps_per_epoch + step) / total))


def lambda_linear(epoch: int, step: int, steps_per_epoch: int, dilution_epochs: float) -> float:
    """Per-step linear fade from 1 to 0 over ``dilution_epochs`` epochs."""
    return 1.0 - _progress(epoch, step, steps_per_epoch, dilution_epochs)


def lambda_cosine(epoch: int, step: int, steps_per_epoch: int, dilution_epochs: float) -> float:
    """Per-step half-cosine fade from 1 to 0 over ``dilution_epochs`` epochs."""
    t = _progress(epoch, step, steps_per_epoch, dilution_epochs)
    return 0.5 * (1.0 + math.cos(math.pi * t))


@register_schedule("reference")
def _reference(epoch: int, step: int, steps_per_epoch: int, dilution_epochs: float) -> float:
    return lambda_reference(epoch, dilution_epochs)


register_schedule("linear")(lambda_linear)
register_schedule("cosine")(lambda_cosine)


@register_schedule("constant")
def _constant(epoch: int, step: int, steps_per_epoch: int, dilution_epochs: float) -> float:
    return 1.0


def lambda_at(
    kind: str, epoch: int, step: int = 0, steps_per_epoch: int = 1, dilution_epochs: float = 299
) -> float:
    """Lambda of schedule ``kind`` at (epoch, step within epoch). ``constant`` is always 1."""
    return get_schedule(kind)(epoch, step, steps_per_epoch, dilution_epochs)
