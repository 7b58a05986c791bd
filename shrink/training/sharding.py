"""What changes when a model is sharded with FSDP2 (``fully_shard``), and nothing else.

``fully_shard`` keeps every block's class (an ``FSDPDilutedBlock`` is a ``DilutedBlock``), so
dilution, ``set_lambda``, ``deploy_mode`` and evaluation work on sharded models unchanged. Two
things cannot work on shards: exporting in place (parameters leave the model, so the shards must be
made again) and saving a model (it must be whole). :func:`whole_model` gathers a sharded model into
a plain one (a collective: every process calls it); :func:`export_for_training` is the lambda = 0
switch for plain, DDP and sharded models alike, carrying the optimizer state of the remaining
parameters over by name.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
from torch import nn

from shrink.blocks.attention_free import export
from shrink.blocks.dilution import get_blocks
from shrink.blocks.parts import export_slices
from shrink.errors import ShrinkError
from shrink.modelio.saved import build_from_config, describe_architecture
from shrink.modelio.schema import FORMAT
from shrink.unwrap import unwrap

_logger = logging.getLogger(__name__)


def mark_shard_units(model: nn.Module, fsdp_plugin=None) -> list[str]:
    """Make each transformer block its own FSDP unit, whatever classes the blocks have right now.

    The block classes change during a run (plain, diluted, attention-free; per model family), so no
    list of names is kept anywhere: they are read from the model before every ``prepare``. The bare
    ``model`` gets them as ``_no_split_modules`` (what Accelerate's transformer-based wrap policy reads
    when its config names no classes) and Accelerate's ``fsdp_plugin``, when given, gets them as
    ``transformer_cls_names_to_wrap``: Accelerate keeps the names it resolved at the first ``prepare``
    on the plugin, and would look for blocks that the lambda = 0 switch replaced. A list in the
    Accelerate config is overridden the same way. Returns the class names (empty for a model without
    ``blocks``: the model is then one unit).
    """
    model = unwrap(model)
    try:
        names = sorted({type(b).__name__ for b in get_blocks(model)})
    except ShrinkError:
        names = []
    model._no_split_modules = names
    if fsdp_plugin is not None:
        given = getattr(fsdp_plugin, "transformer_cls_names_to_wrap", None)
        if given is not None and sorted(given) != names:
            _logger.info("FSDP wrap classes %s (from the model) instead of %s", names, given)
        fsdp_plugin.transformer_cls_names_to_wrap = names
        policy = getattr(fsdp_plugin, "auto_wrap_policy", None)
        if isinstance(policy, functools.partial):  # bound to the classes of the last prepare (FSDP1): unbind
            fsdp_plugin.auto_wrap_policy = policy.func
    return names


def is_sharded(model: nn.Module) -> bool:
    """True when any submodule of ``model`` is sharded by FSDP2's ``fully_shard``."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def whole_model(model: nn.Module) -> nn.Module:
    """``model`` itself when it is not sharded; else a plain copy with every weight whole, on the CPU.

    Under FSDP this is a collective: every process must call it. The copy has the structure that
    ``describe_architecture`` records (diluted blocks with their lambda, attention-free blocks).
    """
    model = unwrap(model)
    if not is_sharded(model):
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # cpu_offload=True would give the full weights to rank 0 only; every process needs them here
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=False))
    state = {k: v.detach().cpu() for k, v in state.items()}
    with torch.device("meta"):
        plain = build_from_config({"format": FORMAT, **describe_architecture(model)})
    plain.load_state_dict(state, assign=True)
    if any(t.is_meta for t in list(plain.parameters()) + list(plain.buffers())):  # a non-persistent buffer
        plain = build_from_config({"format": FORMAT, **describe_architecture(model)})
        plain.load_state_dict(state)
    plain.train(model.training)
    return plain


def export_for_training(
    raw: nn.Module,
    optimizer: torch.optim.Optimizer,
    prepare: Callable[[nn.Module], tuple[nn.Module, torch.optim.Optimizer]],
) -> tuple[nn.Module, nn.Module, torch.optim.Optimizer]:
    """Lambda reached 0 for good: remove the attention of the diluted blocks and train on.

    ``raw`` is the bare model (under DDP / compile wrappers, possibly sharded), ``optimizer`` its
    optimizer (or Accelerate's wrapper of it). A plain model is exported in place; a sharded one is
    gathered, exported and handed back whole. ``prepare(model)`` must return the model ready to
    train (wrapped, sharded again) and a new optimizer over its parameters. The optimizer state of
    every remaining parameter (AdamW's moments, its step) is carried over by parameter name, which
    holds for sharded parameters too: their shards are laid out as before. Returns
    ``(prepared model, bare model, optimizer)``.
    """
    inner = getattr(optimizer, "optimizer", optimizer)
    names = {p: n for n, p in raw.named_parameters()}
    moments = {names[p]: inner.state[p] for g in inner.param_groups for p in g["params"]
               if p in inner.state and p in names}
    model = whole_model(raw)
    cuts = export_slices(model)  # parameters export keeps in part (a parallel block's fused projections)
    export(model, inplace=True)
    prepared, new_optimizer = prepare(model)
    bare = unwrap(prepared)
    new_inner = getattr(new_optimizer, "optimizer", new_optimizer)
    carried = 0
    for name, p in bare.named_parameters():
        state = moments.get(name)
        if state is None:
            continue
        if name in cuts:  # the moments of the kept rows / columns, cut the way the weight was
            state = {k: v[cuts[name]].clone() if isinstance(v, torch.Tensor) and v.dim() > 0 else v
                     for k, v in state.items()}
        if any(isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape != p.shape for v in state.values()):
            continue  # a state this parameter cannot take (sharded differently): it starts afresh
        new_inner.state[p] = state
        carried += 1
    _logger.info("attention removed; optimizer state carried over for %d parameters", carried)
    return prepared, bare, new_optimizer
