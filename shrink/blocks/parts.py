"""Model-level answers of the block contract: shared position tables, the parameters an export
removes, the parameters it cuts, drop path and output projections."""
from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from shrink.blocks.contract import (
    FAMILIES,
    AttentionFreeBlock,
    DilutedBlock,
    attention_block_indices,
    block_family,
    get_blocks,
)
from shrink.errors import ShrinkError
from shrink.introspect import num_params

__all__ = ["export_slices", "output_projections", "prune_shared_tables", "removed_names",
           "removed_parameter_count", "set_drop_path"]


def removed_parameter_count(model: nn.Module, layers: Iterable[int]) -> int:
    """Parameters that exporting ``layers`` removes (block parts, plus shared position tables
    that no remaining attention block would use)."""
    blocks = get_blocks(model)
    layers = set(layers)
    bad = [i for i in layers if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(blocks)]
    if bad:
        raise ShrinkError(f"layer index {bad[0]!r} is not a block of this model (0..{len(blocks) - 1})")
    n = 0
    for i in layers:
        fam = block_family(blocks[i])
        if fam is None or isinstance(blocks[i], AttentionFreeBlock):
            raise ShrinkError(f"block {i} has no attention branch to remove")
        n += fam.removed_parameters(blocks[i])
    if set(attention_block_indices(model)) <= layers:
        n += sum(num_params(m) for _, m in _shared_tables(model))
    return n


# Model-level tables that only attention reads, and the timm classes whose forward accepts None
# for them (checked in tests): they go when no block with attention remains.
_SHARED_TABLES = (("beit", "Beit", "rel_pos_bias"),
                  ("vision_transformer_relpos", "VisionTransformerRelPos", "shared_rel_pos"),
                  ("eva", "Eva", "rope"))


def _shared_tables(model: nn.Module) -> list[tuple[str, nn.Module]]:
    out = []
    for module, cls_name, attr in _SHARED_TABLES:
        mod = __import__(f"timm.models.{module}", fromlist=[cls_name])
        klass = getattr(mod, cls_name, None)
        table = getattr(model, attr, None)
        if klass is not None and isinstance(model, klass) and isinstance(table, nn.Module):
            out.append((attr, table))
    return out


def prune_shared_tables(model: nn.Module) -> list[str]:
    """Drop model-level position tables (shared relative-position bias, RoPE) once no block with
    attention remains; returns the attribute names dropped."""
    if attention_block_indices(model):
        return []
    dropped = []
    for attr, _ in _shared_tables(model):
        setattr(model, attr, None)
        dropped.append(attr)
    return dropped


def export_slices(model: nn.Module) -> dict[str, tuple[slice, ...]]:
    """For the diluted blocks of ``model``: the parameters that :func:`shrink.export` keeps only
    in part (a parallel block's fused projections), by full name -> index of the kept part. Used to
    carry optimizer state across the export."""
    out: dict[str, tuple[slice, ...]] = {}
    for i, b in enumerate(get_blocks(model)):
        if isinstance(b, DilutedBlock):
            prefix = f"{_blocks_prefix(model)}.{i}."
            out.update({prefix + k: v for k, v in b._shrink_family.export_slices(b).items()})
    return out


def _blocks_prefix(model: nn.Module) -> str:
    blocks = get_blocks(model)
    return next(n for n, m in model.named_modules() if m is blocks)


def removed_names() -> frozenset[str]:
    """Every attribute name that some family removes with its token-mixing branch."""
    return frozenset(n for f in FAMILIES.values() for n in f.removed)


def set_drop_path(block: nn.Module, rate: float) -> None:
    """Give every drop-path module of ``block`` the same stochastic-depth ``rate``, in place."""
    from timm.layers import DropPath

    for name, child in list(block.named_modules()):
        if isinstance(child, (DropPath, nn.Identity)) and name.split(".")[-1].startswith("drop_path"):
            parent = block.get_submodule(name.rsplit(".", 1)[0]) if "." in name else block
            setattr(parent, name.rsplit(".", 1)[-1], DropPath(rate) if rate > 0 else nn.Identity())


def output_projections(block: nn.Module) -> list[nn.Module | None]:
    """The linear layers writing ``block``'s branches into the residual stream (None: unknown)."""
    fam = block_family(block)
    if fam is None:
        return [None]
    return fam.output_projections(block, isinstance(block, AttentionFreeBlock))
