"""Lambda dilution of attention sublayers in timm ViT blocks, and the lambda schedules.

A diluted block computes ``x = (2 - lam) * x + lam * drop_path1(ls1(attn(norm1(x))))`` and then
the unchanged MLP branch. ``lam = 1`` is the original block, ``lam = 0`` is ``x -> 2x`` followed by
the MLP, and at ``lam = 0`` the attention is not computed at all.
"""
from __future__ import annotations

import contextlib
import logging
import math
import numbers
from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import nn

from .errors import ShrinkError
from .wrappers import unwrap

_logger = logging.getLogger(__name__)

_BLOCK_PARTS = ("norm1", "attn", "ls1", "drop_path1", "norm2", "mlp", "ls2", "drop_path2")


def get_blocks(model: nn.Module) -> nn.Sequential | nn.ModuleList:
    """The transformer blocks of a timm ViT-style model, or a ShrinkError if it has none."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or len(blocks) == 0:
        raise ShrinkError(
            f"{type(model).__name__} is not a ViT: it has no `blocks` of transformer blocks with attention"
        )
    return blocks


def _is_prenorm_block(block: nn.Module) -> bool:
    return all(hasattr(block, p) for p in _BLOCK_PARTS)


def attention_block_indices(model: nn.Module) -> list[int]:
    """Indices of blocks that still carry an attention sublayer (plain or diluted)."""
    return [i for i, b in enumerate(get_blocks(model)) if _is_prenorm_block(b)]


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
        if not _is_prenorm_block(blocks[i]):
            raise ShrinkError(
                f"block {i} ({type(blocks[i]).__name__}) has no pre-norm attention sublayer to remove"
            )
        out.append(i)
    return out


def _check_lambda(value: float) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ShrinkError(f"lambda must be a number in [0, 1], got {value!r}") from None
    if not (0.0 <= v <= 1.0) or math.isnan(v):
        raise ShrinkError(f"lambda must be in [0, 1], got {v}")
    return v


class DilutedBlock(nn.Module):
    """A timm pre-norm ``Block`` whose attention branch is faded by ``lam``.

    It takes over the submodules of the block it replaces, so the state-dict keys stay those of
    the original block, plus one persistent buffer ``lam`` (lambda is saved with the model).
    """

    def __init__(self, block: nn.Module, lam: float = 1.0):
        super().__init__()
        if not _is_prenorm_block(block):
            raise ShrinkError(f"{type(block).__name__} is not a pre-norm transformer block")
        for name in _BLOCK_PARTS:
            setattr(self, name, getattr(block, name))
        value = _check_lambda(lam)
        p = next(block.parameters(), None)
        self.register_buffer("lam", torch.tensor(value, dtype=torch.float32, device=p.device if p is not None else None))
        self.attn_active = value > 0
        self.register_load_state_dict_post_hook(_sync_after_load)

    def set_lambda(self, value: float) -> None:
        v = _check_lambda(value)
        self.lam.fill_(v)
        self.attn_active = v > 0

    @property
    def lambda_value(self) -> float:
        return float(self.lam.item())

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if self.attn_active:
            kwargs = {}
            if attn_mask is not None:
                kwargs["attn_mask"] = attn_mask
            if is_causal:
                kwargs["is_causal"] = True
            branch = self.drop_path1(self.ls1(self.attn(self.norm1(x), **kwargs)))
            lam = self.lam
            x = (2.0 - lam) * x + lam * branch
        else:
            x = x * 2.0
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def extra_repr(self) -> str:
        return f"lam={self.lambda_value:g}"


def _sync_after_load(module: DilutedBlock, incompatible_keys) -> None:
    module.attn_active = module.lam.item() > 0


def diluted_blocks(model: nn.Module) -> dict[int, DilutedBlock]:
    """Map from block index to DilutedBlock for every diluted block of ``model``."""
    return {i: b for i, b in enumerate(get_blocks(model)) if isinstance(b, DilutedBlock)}


def dilute(model: nn.Module, layers: Sequence[int], lam: float = 1.0) -> nn.Module:
    """Replace the blocks at ``layers`` by DilutedBlocks, in place, and return the model.

    Blocks already diluted are left as they are (their lambda is set to ``lam``).
    """
    layers = validate_layers(model, layers)
    lam = _check_lambda(lam)
    blocks = get_blocks(model)
    for i in layers:
        if isinstance(blocks[i], DilutedBlock):
            blocks[i].set_lambda(lam)
            continue
        blocks[i] = DilutedBlock(blocks[i], lam=lam)
    _logger.info("diluted blocks %s at lambda=%g", layers, lam)
    return model


def set_lambda(model: nn.Module, value: float) -> None:
    """Set lambda of every diluted block of ``model`` (unwrap DDP / compile wrappers first)."""
    v = _check_lambda(value)
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

SCHEDULES = ("reference", "linear", "cosine", "constant")


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


def lambda_at(
    kind: str, epoch: int, step: int = 0, steps_per_epoch: int = 1, dilution_epochs: float = 299
) -> float:
    """Lambda of schedule ``kind`` at (epoch, step within epoch). ``constant`` is always 1."""
    if kind == "reference":
        return lambda_reference(epoch, dilution_epochs)
    if kind == "linear":
        return lambda_linear(epoch, step, steps_per_epoch, dilution_epochs)
    if kind == "cosine":
        return lambda_cosine(epoch, step, steps_per_epoch, dilution_epochs)
    if kind == "constant":
        return 1.0
    raise ShrinkError(f"unknown lambda schedule {kind!r}; choose one of {', '.join(SCHEDULES)}")
