"""The selection criteria, one registered function each (``@register_criterion``).

A *scored* criterion ``fn(scoring, skipped, remaining) -> {layer: score}`` ranks the ``remaining``
candidate layers with ``skipped`` already skipped, lower meaning remove first; it measures through
``scoring`` (:class:`Scoring`: the runner, the full model's feature entropy, the step's pass). An
unscored criterion ``fn(candidates, k, seed=..., layers=...) -> chosen`` picks without measuring.
:func:`shrink.selection.select_layers` runs either, one-shot or greedily.
"""
from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from shrink.registry import Names, Registry
from shrink.selection.criteria import PassStats, Runner

__all__ = ["CRITERIA", "CRITERION_REGISTRY", "SCORED", "Criterion", "Scoring", "get_criterion",
           "register_criterion", "unregister_criterion"]


@dataclass(frozen=True)
class Criterion:
    """A registered criterion: its function and how :func:`select_layers` runs it."""

    name: str
    fn: Callable
    scored: bool = True  # ranks layers on calibration images (needs a loader)
    transfer_entropy: bool = False  # a set's score is its TE: one pass per candidate, te_abs applies
    takes_layers: bool = False  # the layers are given by the user (``layers=`` / ``--layers``)


@dataclass
class Scoring:
    """What a scored criterion measures with: the runner, ``H(full)`` and, when this step's model was
    measured already (step 0, one-shot), that pass (:meth:`stats` then costs nothing)."""

    runner: Runner
    h_full: float
    base: PassStats | None = None

    def stats(self, skipped: list[int], remaining: list[int]) -> PassStats:
        if self.base is not None:
            return self.base
        return self.runner.run(skip=skipped, probe_layers=remaining)


CRITERION_REGISTRY: Registry[Criterion] = Registry("selection criterion")
CRITERIA = CRITERION_REGISTRY.names  # argparse choices: every registered name, in order
SCORED = Names(CRITERION_REGISTRY, keep=lambda c: c.scored)


def register_criterion(name: str, *, scored: bool = True, transfer_entropy: bool = False,
                       takes_layers: bool = False):
    """Decorator: ``fn`` becomes criterion ``name`` (see the module docstring for its signature)."""
    def deco(fn):
        CRITERION_REGISTRY.add(name, Criterion(name, fn, scored, transfer_entropy, takes_layers))
        return fn
    return deco


def get_criterion(name: str) -> Criterion:
    """The criterion ``name`` (a one-line ShrinkError naming the known ones otherwise)."""
    return CRITERION_REGISTRY.lookup(name)


def unregister_criterion(name: str) -> None:
    CRITERION_REGISTRY.remove(name)


@register_criterion("transfer_entropy", transfer_entropy=True)
def transfer_entropy_scores(scoring: Scoring, skipped: list[int], remaining: list[int]) -> dict[int, float]:
    """``TE(skipped + {l}) = H(full) - H(those skipped)``: one pass per candidate."""
    return {li: scoring.h_full - scoring.runner.run(skip=skipped + [li]).feature_entropy for li in remaining}


@register_criterion("entropy")
def entropy_scores(scoring: Scoring, skipped: list[int], remaining: list[int]) -> dict[int, float]:
    """Entropy of each layer's attention-branch output."""
    table = scoring.stats(skipped, remaining).attn_entropy
    return {li: table[li] for li in remaining}


@register_criterion("cosine")
def cosine_scores(scoring: Scoring, skipped: list[int], remaining: list[int]) -> dict[int, float]:
    """Attention Drop: ``1 - cos(X, X + Attn(LN(X)))``."""
    table = scoring.stats(skipped, remaining).cosine
    return {li: table[li] for li in remaining}


@register_criterion("block_influence")
def block_influence_scores(scoring: Scoring, skipped: list[int], remaining: list[int]) -> dict[int, float]:
    """ShortGPT: ``1 - cos(block input, block output)``."""
    table = scoring.stats(skipped, remaining).block_influence
    return {li: table[li] for li in remaining}


@register_criterion("random", scored=False)
def random_layers(candidates: list[int], k: int, *, seed: int, layers: list[int] | None) -> list[int]:
    return random.Random(seed).sample(candidates, k)


@register_criterion("last", scored=False)
def last_layers(candidates: list[int], k: int, *, seed: int, layers: list[int] | None) -> list[int]:
    return sorted(candidates[len(candidates) - k:]) if k else []


@register_criterion("manual", scored=False, takes_layers=True)
def manual_layers(candidates: list[int], k: int, *, seed: int, layers: list[int] | None) -> list[int]:
    return list(layers or [])
