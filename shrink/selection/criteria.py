"""Measurements behind layer selection: Gaussian entropy, attention skipping, per-layer probes.

Everything is accumulated in fp64 with streaming (Chan/Welford) statistics, and every logarithm
is the natural log, so entropies are in nats. ``H(f) = sum_c log(sigma_c)``: the differential
entropy of a diagonal Gaussian with the constant ``C/2 * log(2*pi*e)`` dropped. It cancels in
every difference (transfer entropy) and in every ranking.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from shrink.blocks.contract import DilutedBlock, attention_block_indices, get_blocks
from shrink.blocks.probes import probe_branches
from shrink.blocks.probes import skip_attention as blocks_skip_attention
from shrink.errors import ShrinkError
from shrink.io import jsonable


class RunningMoments:
    """Per-channel count, mean and sum of squared deviations, merged batch by batch in fp64."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        """Add samples ``x`` of shape (N, C) (or (..., C), flattened to rows)."""
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        nb = x.shape[0]
        if nb == 0:
            return
        bmean = x.mean(dim=0)
        bm2 = (x - bmean).square().sum(dim=0)
        if self.mean is None:
            self.n, self.mean, self.m2 = nb, bmean, bm2
            return
        n = self.n + nb
        delta = bmean - self.mean
        self.mean = self.mean + delta * (nb / n)
        self.m2 = self.m2 + bm2 + delta.square() * (self.n * nb / n)
        self.n = n

    def std(self) -> torch.Tensor:
        """Unbiased per-channel standard deviation (ddof = 1)."""
        if self.m2 is None or self.n < 2:
            raise ShrinkError("entropy needs at least 2 samples: use more calibration images")
        return (self.m2 / (self.n - 1)).sqrt()

    def entropy(self) -> float:
        """``sum_c log(sigma_c)`` in nats; ``-inf`` when a channel is constant."""
        if self.m2 is None or self.n < 2:
            raise ShrinkError("entropy needs at least 2 samples: use more calibration images")
        var = self.m2 / (self.n - 1)
        return float(0.5 * torch.log(var).sum().item())


def gaussian_entropy(x: torch.Tensor) -> float:
    """Gaussian entropy ``sum_c log(std_c)`` (nats, constants dropped) of samples ``x`` (N, C)."""
    m = RunningMoments()
    m.update(x)
    return m.entropy()


def _unit_halfsq_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``1 - cos(a, b)`` per row, computed as ``||a/|a| - b/|b|||^2 / 2`` in fp64.

    The same value as ``1 - cos`` in exact arithmetic, but exactly 0 when ``a == b`` bitwise and
    free of the cancellation that ``1 - cos`` suffers near 1.
    """
    a = a.to(torch.float64)
    b = b.to(torch.float64)
    an = a / a.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    bn = b / b.norm(dim=-1, keepdim=True).clamp_min(1e-300)
    return 0.5 * (an - bn).square().sum(dim=-1)


class RunningMean:
    """Mean of a stream of scalars per sample, in fp64."""

    def __init__(self) -> None:
        self.total = 0.0
        self.n = 0

    def update(self, values: torch.Tensor) -> None:
        self.total += float(values.to(torch.float64).sum().item())
        self.n += values.numel()

    def value(self) -> float:
        return self.total / self.n if self.n else float("nan")


# --------------------------------------------------------------------------------------------------
# Model plumbing
# --------------------------------------------------------------------------------------------------


def candidate_layers(model: nn.Module) -> list[int]:
    """Blocks whose attention could be removed; ShrinkError for models without any."""
    blocks = get_blocks(model)
    if any(isinstance(b, DilutedBlock) for b in blocks):
        raise ShrinkError("select layers on the untouched model: this one already has diluted blocks")
    idx = attention_block_indices(model)
    if not idx:
        raise ShrinkError(
            f"{type(model).__name__} has no attention blocks to select from "
            f"(blocks are {type(blocks[0]).__name__}); layer selection needs a ViT"
        )
    return idx


@contextlib.contextmanager
def skip_attention(model: nn.Module, layers: Iterable[int]) -> Iterator[nn.Module]:
    """Temporarily make the attention branch of ``layers`` an identity (block = x + MLP branch).

    This is the paper's "skip" for selection on the untouched model: ``x``, not ``2x``. The blocks'
    own ``forward`` is restored on exit, whatever happens inside.
    """
    blocks = get_blocks(model)
    layers = list(layers)
    allowed = set(attention_block_indices(model))
    for i in layers:
        if i not in allowed:
            raise ShrinkError(f"block {i} has no attention sublayer to skip")
    with blocks_skip_attention([blocks[i] for i in layers]):
        yield model


def pre_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The head's input: class token (or pooled tokens + fc_norm) after the final norm."""
    return model.forward_head(model.forward_features(x), pre_logits=True)


def _images(batch) -> torch.Tensor:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, dict) and isinstance(batch.get("image", batch.get("pixel_values")), torch.Tensor):
        return batch.get("image", batch.get("pixel_values"))
    raise ShrinkError(f"calibration loader must yield (images, labels) batches, got {type(batch).__name__}")


@dataclass
class PassStats:
    """What one pass over the calibration images measured."""

    feature_entropy: float
    images: int
    attn_entropy: dict[int, float] = field(default_factory=dict)
    mlp_entropy: dict[int, float] = field(default_factory=dict)
    cosine: dict[int, float] = field(default_factory=dict)
    block_influence: dict[int, float] = field(default_factory=dict)


class Runner:
    """Runs calibration passes over a loader: no_grad, eval mode, optional autocast.

    ``passes`` counts full passes over the calibration set (one forward of every image each). The
    images of the first pass are kept in memory (up to ``cache_bytes``) so that the later passes of
    a greedy search neither re-decode nor re-transform them, nor restart loader workers.
    """

    def __init__(self, model: nn.Module, loader: Iterable, device: torch.device,
                 amp_dtype: torch.dtype | None, cache_bytes: int = 4 << 30) -> None:
        self.model = model
        self.loader = loader
        self.cache_bytes = cache_bytes
        self._cache: list[torch.Tensor] | None = None
        self.device = device
        self.amp_dtype = amp_dtype
        self.passes = 0
        self.bar = None  # a tqdm bar advanced once per pass, if set

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _batches(self) -> Iterator[torch.Tensor]:
        if self._cache is not None:
            yield from self._cache
            return
        kept: list[torch.Tensor] | None = []
        size = 0
        for batch in self.loader:
            x = _images(batch)
            if kept is not None:
                size += x.numel() * x.element_size()
                if size <= self.cache_bytes:
                    kept.append(x.cpu())
                else:
                    kept = None  # too large to keep: every pass reads the loader again
            yield x
        if kept is not None:
            self._cache = kept

    @torch.no_grad()
    def run(self, skip: Sequence[int] = (), probe_layers: Sequence[int] = ()) -> PassStats:
        """One pass with the attention of ``skip`` skipped; per-layer probes on ``probe_layers``."""
        model = self.model
        blocks = get_blocks(model)
        feat = RunningMoments()
        attn_m = {i: RunningMoments() for i in probe_layers if i not in skip}
        mlp_m = {i: RunningMoments() for i in probe_layers}
        cos_m = {i: RunningMean() for i in probe_layers if i not in skip}
        bi_m = {i: RunningMean() for i in probe_layers}
        block_in: dict[int, torch.Tensor] = {}
        handles = []

        def pre_hook(i):
            def hook(module, args, kwargs):
                block_in[i] = args[0] if args else kwargs["x"]
            return hook

        def on_attention(i, x, out):
            if i in attn_m:
                attn_m[i].update(out)
                cos_m[i].update(_unit_halfsq_distance(x, x.to(torch.float64) + out.to(torch.float64)))

        def on_mlp(i, out):
            if i in mlp_m:
                mlp_m[i].update(out)

        def post_hook(i):
            def hook(module, args, out):
                bi_m[i].update(_unit_halfsq_distance(block_in.pop(i), out))
            return hook

        images = 0
        run_blocks = {i: blocks[i] for i in sorted({*probe_layers, *skip})}
        try:
            for i in probe_layers:
                blk = blocks[i]
                handles.append(blk.register_forward_pre_hook(pre_hook(i), with_kwargs=True))
                handles.append(blk.register_forward_hook(post_hook(i)))
            with probe_branches(run_blocks, on_attention, on_mlp, skip=skip):
                for x in self._batches():
                    x = x.to(self.device, non_blocking=True)
                    with self._autocast():
                        f = pre_logits(model, x)
                    feat.update(f)
                    images += x.shape[0]
        finally:
            for h in handles:
                h.remove()
        self.passes += 1
        if self.bar is not None:
            self.bar.update(1)
        if images < 2:
            raise ShrinkError(f"the calibration loader gave {images} image(s); at least 2 are needed")
        return PassStats(
            feature_entropy=feat.entropy(),
            images=images,
            attn_entropy={i: m.entropy() for i, m in attn_m.items()},
            mlp_entropy={i: m.entropy() for i, m in mlp_m.items()},
            cosine={i: m.value() for i, m in cos_m.items()},
            block_influence={i: m.value() for i, m in bi_m.items()},
        )


def check_model_api(model: nn.Module) -> None:
    """ShrinkError unless ``model`` has timm's ``forward_features`` / ``forward_head`` split."""
    if not (callable(getattr(model, "forward_features", None)) and callable(getattr(model, "forward_head", None))):
        raise ShrinkError(f"{type(model).__name__} lacks forward_features/forward_head; use a timm ViT")


def finite_or_str(v: float) -> float | str:
    """JSON-safe float: non-finite values become the strings 'inf', '-inf', 'nan' (:func:`shrink.io.jsonable`)."""
    return jsonable(v)
