"""The training-free accuracy proxy: how far a candidate, without any fine-tuning, is from the dense model.

A candidate (:class:`~shrink.plan.candidate.Candidate`) is built from the dense model in place, without
copying weights: its removed blocks are diluted (:func:`shrink.blocks.dilution.dilute`, a class swap plus a
``lam`` buffer) and run at lambda = 0, which is exactly the exported attention-free model; the other
diluted blocks run at lambda = 1, which is bit-identical to the original block. Token merging is
attached with :func:`shrink.merging.patch.apply_tome` for the forward and removed after it. On a fixed set of
calibration images the dense log-probabilities are computed once; a candidate's score is

- ``kl``: the mean over images of ``KL(dense || candidate)`` of the softmax outputs, in nats (0 for the
  dense model itself, lower is better);
- ``top1_agreement``: the fraction of images whose top-1 class is the dense model's (1 for the dense model);
- ``top1_acc``: top-1 accuracy on the calibration labels (meaningful only for a trained model).

The removal order comes from :func:`shrink.selection.layers.select_layers` (transfer entropy by default): the
search removes prefixes of it.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from shrink.blocks.dilution import dilute, diluted_blocks, get_blocks
from shrink.errors import ShrinkError
from shrink.merging.patch import apply_tome, is_tome, remove_tome
from shrink.plan.candidate import Candidate

__all__ = ["Proxy", "ProxyScore", "load_calibration", "removal_order"]


@dataclass(frozen=True)
class ProxyScore:
    """The proxy's verdict on one candidate (see the module docstring)."""

    kl: float
    top1_agreement: float
    top1_acc: float | None = None

    def as_dict(self) -> dict[str, float | None]:
        return asdict(self)


def load_calibration(dataset: Dataset, batch_size: int = 256, num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """All images and labels of ``dataset`` (already the calibration subset) as two CPU tensors."""
    if len(dataset) < 1:
        raise ShrinkError("the calibration set is empty")
    images, labels = [], []
    for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers):
        images.append(x)
        labels.append(torch.as_tensor(y))
    return torch.cat(images), torch.cat(labels).long()


def removal_order(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    k: int,
    criterion: str = "transfer_entropy",
    seed: int = 0,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    progress: bool = False,
    te_abs: bool = False,
) -> list[int]:
    """The first ``k`` layers ``criterion`` removes, in the order it removes them (``shrink.selection.layers``).

    Greedy criteria pick one layer after the other, so every prefix is what the criterion would remove at
    that size. ``last`` is returned from the last block backwards (its prefixes are then "the last j").
    ``manual`` has no order of its own: give the order to the search directly.
    """
    from shrink.selection import get_criterion
    from shrink.selection.layers import select_layers

    if get_criterion(criterion).takes_layers:
        raise ShrinkError(f"criterion {criterion!r} has no removal order: give the order itself (--order 3,1,2)")
    y = labels if labels is not None else torch.zeros(len(images), dtype=torch.long)
    loader = DataLoader(TensorDataset(images, y), batch_size=batch_size, shuffle=False)
    amp = torch.float32  # the proxy runs in fp32; so does the selection it orders
    result = select_layers(model, loader, k=k, criterion=criterion, seed=seed, device=device, amp_dtype=amp,
                           progress=progress, te_abs=te_abs)
    order = list(result.layers)
    return order[::-1] if criterion == "last" else order


class Proxy:
    """Scores candidates of ``model`` on calibration ``images`` against the dense model's outputs.

    The model is changed in place (blocks are diluted as candidates need them; the proxy keeps them at
    lambda = 1, which computes what the original block computes) and moved to ``device``; give a copy if
    the original must stay untouched. The dense log-probabilities are computed once, here.
    """

    def __init__(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor | None = None, *,
                 batch_size: int = 64, device: str | torch.device | None = None):
        if images.dim() < 2 or len(images) == 0:
            raise ShrinkError(f"the proxy needs a batch of calibration images, got shape {tuple(images.shape)}")
        if batch_size <= 0:
            raise ShrinkError(f"the proxy's batch size must be positive, got {batch_size}")
        if labels is not None and len(labels) != len(images):
            raise ShrinkError(f"{len(labels)} labels for {len(images)} calibration images")
        if diluted_blocks(model):
            raise ShrinkError("the proxy needs the dense model: this one already has diluted blocks")
        if is_tome(model):
            raise ShrinkError("the proxy needs the dense model: this one has ToMe applied (remove_tome first)")
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device).eval()
        self.depth = len(get_blocks(model))
        self.images, self.labels, self.batch_size = images, labels, int(batch_size)
        self.dense_logp = self._log_probs()
        self.dense_top1 = self.dense_logp.argmax(-1)
        self.calls = 0

    @torch.inference_mode()
    def _log_probs(self) -> torch.Tensor:
        out = []
        for i in range(0, len(self.images), self.batch_size):
            x = self.images[i:i + self.batch_size].to(self.device, non_blocking=True)
            out.append(torch.log_softmax(self.model(x).double(), dim=-1).cpu())
        return torch.cat(out)

    def _configure(self, cand: Candidate) -> None:
        blocks = diluted_blocks(self.model)
        missing = [i for i in cand.removed if i not in blocks]
        if missing:
            dilute(self.model, missing, lam=1.0)  # validates the indices; a no-copy class swap
            blocks = diluted_blocks(self.model)
        for i, b in blocks.items():
            b.set_lambda(0.0 if i in cand.removed else 1.0)

    @contextlib.contextmanager
    def built(self, cand: Candidate) -> Iterator[nn.Module]:
        """The model as ``cand`` (removed blocks at lambda = 0, ToMe attached) inside the ``with``; dense after."""
        self._configure(cand)
        try:
            if cand.tome_r:
                apply_tome(self.model, cand.r_arg, cand.tome_start_idx, cand.tome_policy)
            yield self.model
        finally:
            if is_tome(self.model):
                remove_tome(self.model)
            for b in diluted_blocks(self.model).values():
                b.set_lambda(1.0)

    def log_probs(self, cand: Candidate) -> torch.Tensor:
        """The candidate's log-probabilities on the calibration images (float64, CPU)."""
        with self.built(cand):
            return self._log_probs()

    def score(self, cand: Candidate) -> ProxyScore:
        """KL(dense || candidate), top-1 agreement with the dense model and top-1 accuracy on the labels."""
        logp = self.log_probs(cand)
        self.calls += 1
        kl = (self.dense_logp.exp() * (self.dense_logp - logp)).sum(-1).clamp_min(0.0).mean().item()
        top1 = logp.argmax(-1)
        agree = (top1 == self.dense_top1).double().mean().item()
        acc = None if self.labels is None else (top1 == self.labels).double().mean().item()
        return ProxyScore(kl=float(kl), top1_agreement=float(agree), top1_acc=None if acc is None else float(acc))

    def score_all(self, cands: Sequence[Candidate], progress: bool = False) -> list[ProxyScore]:
        """Scores of ``cands`` in order (a tqdm bar when ``progress``)."""
        from tqdm.auto import tqdm

        return [self.score(c) for c in tqdm(cands, desc="proxy", unit="cand", disable=not progress)]
