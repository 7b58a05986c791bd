"""The block contract: the one module that knows what a timm transformer block looks like.

timm has many block classes: the pre-norm ``Block`` of ``VisionTransformer``, ``EvaBlock`` (RoPE,
SwiGLU, ``gamma_1`` / ``gamma_2``), BEiT's ``Block`` (relative-position bias), CaiT's
``LayerScaleBlock`` (talking heads), the relative-position and windowed SAM blocks, post-norm
blocks (``ResPostBlock``, ``EvaBlockPostNorm``, ``ResPostRelPosBlock``) and parallel blocks
(``ParallelThingsBlock``, ``ParallelScalingBlock``, ``DiffParallelScalingBlock``). One small
:class:`Family` adapter per block family says

- where the token-mixing (attention) branch is and what it is given (``context``: RoPE, shared
  relative-position bias, attention mask),
- which attributes only that branch uses (``removed``: they go on export),
- how the family is diluted (``residual_scale``, the identity factor at lambda = 0), and
- what the block computes once the branch is gone (:meth:`Family.mlp`).

Dilution, export, selection, ToMe, FLOPs counting and deployment ask this module; none of them
reads ``norm1`` / ``attn`` / ``ls1`` / ``gamma_1`` itself (``tests/test_architecture.py`` checks).

The dilution rule of a block with residual scale ``s`` and lambda ``lam``::

    x = (s - (s - 1) * lam) * x + lam * attention_branch(x)      # then the MLP sublayer as in timm

``s = 2`` is the reference's ``(2 - lam) * x + lam * branch`` (pre-norm and parallel blocks: the
next LayerNorm cancels the doubling). Post-norm blocks feed the MLP the un-normalised stream, so
doubling it would change the MLP's input: their default is ``s = 1`` (``x + lam * branch``, the
branch fades to an identity). ``lam = 1`` is exactly the timm block; at ``lam = 0`` the branch is
not computed and the block equals its attention-free export.

A diluted block is the original block object with its class swapped to a subclass that mixes in
:class:`DilutedBlock` (state-dict keys unchanged, plus the ``lam`` buffer). An attention-free block
is an :class:`AttentionFreeBlock` that holds the kept parts under their original names.

The adapters themselves are in :mod:`shrink.blocks.families` (one ``@register_family`` class each),
the model-level answers in :mod:`shrink.blocks.parts`, the selection probes in
:mod:`shrink.blocks.probes`. Long because the Family base, its registry and the diluted /
attention-free block classes that call it are one contract.
"""
from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from shrink.errors import ShrinkError
from shrink.introspect import num_params
from shrink.registry import Registry

__all__ = [
    "AttentionFreeBlock",
    "DilutedBlock",
    "FAMILIES",
    "Family",
    "attention_block_indices",
    "block_family",
    "classify_block",
    "dilute_block",
    "export_block",
    "get_blocks",
    "get_family",
    "register_family",
    "unregister_family",
]

Ctx = dict[str, Any]


def get_blocks(model: nn.Module) -> nn.Sequential | nn.ModuleList:
    """The transformer blocks of a timm ViT-style model (``model.blocks``), or a ShrinkError."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or len(blocks) == 0:
        raise ShrinkError(
            f"{type(model).__name__} is not a ViT: it has no `blocks` of transformer blocks with attention"
        )
    return blocks


# --------------------------------------------------------------------------------------------------
# Families
# --------------------------------------------------------------------------------------------------


class Family:
    """A pre-norm block family: ``x + drop1(scale1(attn(norm1(x), **ctx)))``, then the MLP sublayer
    ``x + drop2(scale2(mlp(norm2(x))))``. Subclasses override what differs.

    ``scale1`` / ``scale2`` name a LayerScale module (``ls1``) or a parameter (``gamma_1``, may be
    None); ``drop1`` / ``drop2`` name the drop-path modules.
    """

    layout = "pre-norm"
    residual_scale = 2.0
    tome_refusal = ""  # why token merging (r > 0) cannot apply to this family; empty when it can

    def __init__(self, name: str, classes: Sequence[type], *, context: Sequence[str] = (),
                 norm1: str = "norm1", attn: str = "attn", scale1: str | None = "ls1", drop1: str = "drop_path1",
                 norm2: str = "norm2", mlp: str = "mlp", scale2: str | None = "ls2", drop2: str = "drop_path2",
                 examples: Sequence[str] = (), notes: str = ""):
        self.name = name
        self.classes = tuple(classes)
        self.context_names = tuple(context)
        self.norm1, self.attn, self.scale1, self.drop1 = norm1, attn, scale1, drop1
        self.norm2, self.mlp_name, self.scale2, self.drop2 = norm2, mlp, scale2, drop2
        self.examples = tuple(examples)
        self.notes = notes

    # ---- what the contract says about the block ----
    @property
    def removed(self) -> tuple[str, ...]:
        """Attributes of the block that only the token-mixing branch uses (gone on export)."""
        names = [self.norm1, self.attn]
        if self.scale1 is not None:
            names.append(self.scale1)
        return tuple(names)

    def context(self, args: tuple, kwargs: dict) -> Ctx:
        """The block's extra inputs (positional ones named after ``context_names``)."""
        if len(args) > len(self.context_names):
            raise TypeError(f"{self.name} blocks take at most {len(self.context_names)} extra positional inputs")
        ctx = dict(zip(self.context_names, args, strict=False))
        ctx.update(kwargs)
        return ctx

    @staticmethod
    def _scale(blk: nn.Module, name: str | None, y: torch.Tensor) -> torch.Tensor:
        if name is None:
            return y
        s = getattr(blk, name, None)  # None: no layer scale (a plain attribute, not kept on export)
        if s is None:
            return y
        if isinstance(s, nn.Module):
            return s(y)
        return s * y

    def attention_modules(self, blk: nn.Module) -> list[nn.Module]:
        """The attention modules the branch calls (ToMe checks it can run them with sizes)."""
        return [getattr(blk, self.attn)]

    # ---- the two branches: residual contributions ----
    def attention_branch(self, blk: nn.Module, x: torch.Tensor, ctx: Ctx,
                  attn_call: Callable[[nn.Module, torch.Tensor, Ctx], torch.Tensor] | None = None) -> torch.Tensor:
        """The token-mixing branch's contribution to the residual stream.

        ``attn_call(attn, normed_x, ctx)`` replaces the call of the attention module (ToMe uses it)."""
        h = getattr(blk, self.norm1)(x)
        attn = getattr(blk, self.attn)
        y = attn(h, **ctx) if attn_call is None else attn_call(attn, h, ctx)
        return getattr(blk, self.drop1)(self._scale(blk, self.scale1, y))

    def mlp_branch(self, blk: nn.Module, x: torch.Tensor, ctx: Ctx) -> torch.Tensor:
        """The MLP branch's contribution to the residual stream (given the stream after attention)."""
        y = getattr(blk, self.mlp_name)(getattr(blk, self.norm2)(x))
        return getattr(blk, self.drop2)(self._scale(blk, self.scale2, y))

    def merge_input(self, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """What the MLP branch normalises (ToMe's "hidden" policy matches tokens on it)."""
        return getattr(blk, self.norm2)(x)

    # ---- the diluted forward ----
    def forward(self, blk: nn.Module, x: torch.Tensor, lam: torch.Tensor | float | None, scale: float, ctx: Ctx,
                probe: Any = None) -> torch.Tensor:
        """``lam`` None: the branch is gone (``x -> scale * x``); else the dilution rule above."""
        if lam is not None:
            a = self.attention_branch(blk, x, ctx)
            if probe is not None:
                probe.attention(x, a)
            x = mix(x, a, lam, scale)
        elif scale != 1.0:
            x = x * scale
        m = self.mlp_branch(blk, x, ctx)
        if probe is not None:
            probe.mlp(m)
        return x + m

    # ---- export ----
    def kept_names(self, blk: nn.Module) -> list[str]:
        removed = set(self.removed)
        names = [n for n in (*blk._modules, *blk._parameters, *blk._buffers) if n not in removed]
        return [n for n in names if n != "lam"]

    def strip(self, blk: nn.Module) -> dict[str, Any]:
        """The parts an attention-free block keeps, by name (modules, parameters, buffers)."""
        return {n: getattr(blk, n) for n in self.kept_names(blk)}

    def export_slices(self, blk: nn.Module) -> dict[str, tuple[slice, ...]]:
        """Kept parameters that export cuts (name in the block -> index of the kept part); none here."""
        return {}

    def removed_parameters(self, blk: nn.Module) -> int:
        n = 0
        for name in self.removed:
            v = getattr(blk, name, None)
            if isinstance(v, nn.Module):
                n += num_params(v)
            elif isinstance(v, torch.Tensor):
                n += v.numel()
        return n

    def output_projections(self, blk: nn.Module, attention_free: bool) -> list[nn.Module | None]:
        """The linear layers that write each branch into the residual stream (for folding the 2)."""
        projs = [] if attention_free else [getattr(getattr(blk, self.attn, None), "proj", None)]
        return [*projs, getattr(getattr(blk, self.mlp_name, None), "fc2", None)]


def mix(x: torch.Tensor, a: torch.Tensor, lam: torch.Tensor | float, scale: float) -> torch.Tensor:
    """The dilution rule: ``(scale - (scale - 1) * lam) * x + lam * a``."""
    if scale == 1.0:
        return x + lam * a
    if scale == 2.0:
        return (2.0 - lam) * x + lam * a
    return (scale - (scale - 1.0) * lam) * x + lam * a


# --------------------------------------------------------------------------------------------------
# The registry of families
# --------------------------------------------------------------------------------------------------

FAMILIES: Registry[Family] = Registry("block family")  # name -> adapter, filled by @register_family
_BY_CLASS: dict[type, Family] = {}


def _timm_class(path: str) -> type | None:
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(f"timm.models.{module}"), name)
    except (ImportError, AttributeError):
        return None


def register_family(name: str, *, blocks: Sequence[type | str], **kw: Any):
    """Class decorator: an instance of the decorated :class:`Family` subclass, ``cls(name, classes, **kw)``,
    becomes the adapter of the block classes ``blocks`` (classes, or ``"module.Class"`` paths under
    ``timm.models``; those this timm lacks are skipped, and with none left nothing is registered)."""
    def deco(cls: type[Family]) -> type[Family]:
        classes = [_timm_class(b) if isinstance(b, str) else b for b in blocks]
        classes = [c for c in classes if c is not None]
        if classes:
            taken = [c for c in classes if c in _BY_CLASS]
            if taken:
                raise ShrinkError(f"block class {taken[0].__name__} has an adapter already ({_BY_CLASS[taken[0]].name})")
            fam = FAMILIES.add(name, cls(name, classes, **kw))
            _BY_CLASS.update({c: fam for c in classes})
        return cls
    return deco


def get_family(name: str) -> Family:
    """The adapter registered as ``name`` (a one-line ShrinkError naming the known ones otherwise)."""
    return FAMILIES.lookup(name)


def unregister_family(name: str) -> None:
    fam = FAMILIES.remove(name)
    for c in fam.classes:
        _BY_CLASS.pop(c, None)


# --------------------------------------------------------------------------------------------------
# Classifying blocks
# --------------------------------------------------------------------------------------------------


def _original_class(block: nn.Module) -> type:
    return getattr(type(block), "_shrink_base", type(block))


def block_family(block: nn.Module) -> Family | None:
    """The adapter of ``block`` (plain, diluted, attention-free or merged), or None if it has none.

    A subclass of a timm block class that overrides ``forward`` has no adapter: its forward is unknown.
    """
    if isinstance(block, AttentionFreeBlock):
        return FAMILIES.get(block.family)
    base = _original_class(block)
    for klass in base.__mro__:
        fam = _BY_CLASS.get(klass)
        if fam is not None:
            return fam if base.forward is klass.forward else None
    return None


def classify_block(block: nn.Module) -> str:
    """'attention', 'diluted', 'attention-free', or 'unsupported'."""
    if isinstance(block, AttentionFreeBlock):
        return "attention-free"
    if isinstance(block, DilutedBlock):
        return "diluted"
    return "attention" if block_family(block) is not None else "unsupported"


def unsupported_reason(block: nn.Module) -> str:
    """One line: why ``block`` cannot have its attention removed, and what would be needed."""
    name = type(block).__name__
    return (f"{name} has no attention sublayer shrink can remove: its class has no adapter in the block "
            f"contract (shrink/blocks/families.py: register_family), which would need to say where its token-mixing branch, norms "
            f"and layer scale sit")


def attention_block_indices(model: nn.Module) -> list[int]:
    """Indices of blocks that still carry an attention branch (plain or diluted)."""
    return [i for i, b in enumerate(get_blocks(model)) if classify_block(b) in ("attention", "diluted")]


# --------------------------------------------------------------------------------------------------
# Diluted blocks
# --------------------------------------------------------------------------------------------------


class DilutedBlock(nn.Module):
    """Mixin of every diluted block: the original timm block (its class swapped to a subclass of
    this and of the original class) whose attention branch is faded by the buffer ``lam``."""

    _shrink_base: type
    _shrink_family: Family
    lam: torch.Tensor
    attn_active: bool
    residual_scale: float

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        fam = self._shrink_family
        return fam.forward(self, x, self.lam if self.attn_active else None, self.residual_scale,
                           fam.context(args, kwargs))

    def set_lambda(self, value: float) -> None:
        v = check_lambda(value)
        self.lam.fill_(v)
        self.attn_active = v > 0

    @property
    def lambda_value(self) -> float:
        return float(self.lam.item())

    @property
    def family(self) -> str:
        return self._shrink_family.name

    def extra_repr(self) -> str:
        return f"lam={self.lambda_value:g}, residual_scale={self.residual_scale:g}"


_DILUTED: dict[type, type] = {}


def _diluted_class(base: type, family: Family) -> type:
    cls = _DILUTED.get(base)
    if cls is None:
        cls = type(f"Diluted{base.__name__}", (DilutedBlock, base),
                   {"_shrink_base": base, "_shrink_family": family, "__module__": __name__})
        _DILUTED[base] = cls
    return cls


def check_lambda(value: float) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ShrinkError(f"lambda must be a number in [0, 1], got {value!r}") from None
    if not (0.0 <= v <= 1.0) or math.isnan(v):
        raise ShrinkError(f"lambda must be in [0, 1], got {v}")
    return v


def check_residual_scale(value: float) -> float:
    if isinstance(value, bool):
        raise ShrinkError(f"residual_scale must be a positive number, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ShrinkError(f"residual_scale must be a positive number, got {value!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise ShrinkError(f"residual_scale must be a positive number, got {value!r}")
    return v


def _sync_after_load(module: DilutedBlock, incompatible_keys) -> None:
    module.attn_active = module.lam.item() > 0


def dilute_block(block: nn.Module, lam: float = 1.0, residual_scale: float | None = None) -> nn.Module:
    """Turn ``block`` (in place) into a diluted block at ``lam``; returns it. Already diluted: set lam."""
    v = check_lambda(lam)
    scale = None if residual_scale is None else check_residual_scale(residual_scale)
    if isinstance(block, DilutedBlock):
        block.set_lambda(v)
        if scale is not None:
            block.residual_scale = scale
        return block
    if hasattr(type(block), "_tome_prev"):  # a ToMe block: its class would be swapped twice
        raise ShrinkError("the model has token merging applied: call shrink.remove_tome(model) before diluting")
    fam = block_family(block)
    if fam is None or isinstance(block, AttentionFreeBlock):
        raise ShrinkError(unsupported_reason(block))
    base = type(block)
    block.__class__ = _diluted_class(base, fam)
    p = next(block.parameters(), None)
    block.register_buffer("lam", torch.tensor(v, dtype=torch.float32, device=p.device if p is not None else None))
    block.attn_active = v > 0
    block.residual_scale = fam.residual_scale if scale is None else scale
    block.register_load_state_dict_post_hook(_sync_after_load)
    return block


# --------------------------------------------------------------------------------------------------
# Attention-free blocks
# --------------------------------------------------------------------------------------------------


class AttentionFreeBlock(nn.Module):
    """A block after its token-mixing branch was removed: ``x -> s * x + MLP branch``.

    It holds the kept parts of the original block under their original names (state-dict keys
    unchanged) and asks its family's adapter for the MLP branch.
    """

    def __init__(self, family: str, parts: dict[str, Any], residual_scale: float = 2.0,
                 non_persistent: Iterable[str] = ()):
        super().__init__()
        get_family(family)  # a one-line ShrinkError for an unknown name
        self.family = family
        skip = set(non_persistent)
        for name, value in parts.items():
            if isinstance(value, nn.Module):
                self.add_module(name, value)
            elif isinstance(value, nn.Parameter):
                self.register_parameter(name, value)
            elif isinstance(value, torch.Tensor):
                self.register_buffer(name, value, persistent=name not in skip)
            else:
                setattr(self, name, value)
        self.residual_scale = float(residual_scale)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        fam = FAMILIES[self.family]
        if self.residual_scale != 1.0:
            x = x * self.residual_scale
        return x + fam.mlp_branch(self, x, fam.context(args, kwargs))

    def extra_repr(self) -> str:
        return f"family={self.family}, residual_scale={self.residual_scale:g}"


def export_block(block: nn.Module) -> AttentionFreeBlock:
    """The attention-free form of a diluted block (its lambda = 0 form)."""
    if not isinstance(block, DilutedBlock):
        raise ShrinkError(f"{type(block).__name__} is not a diluted block; dilute it first")
    fam = block._shrink_family
    out = AttentionFreeBlock(fam.name, fam.strip(block), block.residual_scale,
                             non_persistent=getattr(block, "_non_persistent_buffers_set", ()))
    out.train(block.training)
    return out
