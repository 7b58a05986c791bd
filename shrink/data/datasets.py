"""Data sets: one registered builder each (``@register_data_set``), and what a run asks of them.

The built-in ones are the embedded digits set, ImageNet-style folders, CIFAR-10 / 100 and
synthetic images; their images are read in :mod:`shrink.data.sources` and transformed by
:mod:`shrink.data.transforms`. A new data set is one decorated function (docs/extending.md).
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from shrink.data.sources import (
    DigitsDataset,
    GuardedCIFAR10,
    GuardedCIFAR100,
    GuardedImageFolder,
    SyntheticDataset,
)
from shrink.data.transforms import (
    build_transform,
    model_data_config,
)
from shrink.errors import ShrinkError, first_line
from shrink.registry import Registry

__all__ = [
    "DATA_SETS", "DATA_SET_REGISTRY", "NUM_CLASSES", "DataRequest", "DataSetSpec", "DigitsDataset", "GuardedCIFAR10", "GuardedCIFAR100", "GuardedImageFolder", "SyntheticDataset", "WorkerSeeder", "build_dataset", "build_transform", "calibration_subset", "check_data_path", "count_classes", "get_data_set", "register_data_set", "resolve_data_set", "unregister_data_set", "with_transform",
]


@dataclass(frozen=True)
class DataRequest:
    """What :func:`build_dataset` asks a data set's builder for."""

    name: str
    split: str  # 'train' or 'val'
    data_path: str | os.PathLike | None = None
    input_size: int | None = None
    model: nn.Module | None = None
    train_transform: bool = False
    aug: dict[str, Any] | None = None
    synthetic_size: int = 256
    num_classes: int | None = None

    def transform(self):
        """timm's train or eval transform for the request's model and input size (:func:`build_transform`)."""
        return build_transform(self.train_transform, self.model, self.input_size, self.aug)

    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) the model takes (its data config, or ``input_size``)."""
        return tuple(model_data_config(self.model, self.input_size)["input_size"])  # type: ignore[return-value]


@dataclass(frozen=True)
class DataSetSpec:
    """A registered data set: its builder and what it needs."""

    name: str
    build: Callable[[DataRequest], Dataset]
    path: str | None = None  # what --data-path must be ("a folder with train/ and val/"); None: no path
    num_classes: int | Callable[[str | os.PathLike | None], int] | None = None  # None: the model's / default
    check: Callable[[Path, str], None] | None = None  # cheap checks of the path (``root``, ``flag``)


DATA_SET_REGISTRY: Registry[DataSetSpec] = Registry("data set")
DATA_SETS = DATA_SET_REGISTRY.names  # argparse choices: every registered name, in order


def register_data_set(name: str, *, path: str | None = None,
                      num_classes: int | Callable[[str | os.PathLike | None], int] | None = None,
                      check: Callable[[Path, str], None] | None = None):
    """Decorator: ``build(request: DataRequest) -> Dataset`` becomes data set ``name``.

    ``path``: what ``--data-path`` must be (None: the set needs none); ``num_classes``: a number, a
    function of the data path, or None (the model's, else the caller's default); ``check(root, flag)``:
    cheap checks of the path before any model is built.
    """
    def deco(fn):
        DATA_SET_REGISTRY.add(name, DataSetSpec(name, fn, path, num_classes, check))
        return fn
    return deco


def get_data_set(name: str) -> DataSetSpec:
    """The data set ``name`` (a one-line ShrinkError naming the known ones otherwise)."""
    return DATA_SET_REGISTRY.lookup(name)


def reads_files(name: str) -> bool:
    """Whether data set ``name`` reads files (a ``--data-path``); one that does not is built in memory,
    and its loaders need no worker processes."""
    return get_data_set(name).path is not None


def unregister_data_set(name: str) -> None:
    DATA_SET_REGISTRY.remove(name)


def resolve_data_set(data_set: str | None, data_path: str | os.PathLike | None) -> str:
    """The data set a user means: as given, else ``folder`` when a data path is given (as in timm's
    train.py), else the embedded ``digits``."""
    if data_set is not None:
        return data_set
    return "folder" if data_path is not None else "digits"


def check_data_path(name: str, data_path: str | os.PathLike | None, flag: str = "--data-path") -> None:
    """Cheap checks of where data set ``name`` lives, before any model is built or file read.

    Folders need DATA_PATH/train and DATA_PATH/val with the same class sub-folders (else the labels
    of val would silently mean other classes); CIFAR needs a folder to download into or read from.
    """
    spec = get_data_set(name)
    if spec.path is None:
        if data_path is not None:
            with_path = ", ".join(n for n in DATA_SETS if get_data_set(n).path is not None)
            raise ShrinkError(f"{flag} is not used by --data-set {name}; leave it out, or give --data-set {with_path}")
        return
    if data_path is None or not str(data_path).strip():
        raise ShrinkError(f"--data-set {name} needs {flag} ({spec.path})")
    if spec.check is not None:
        spec.check(Path(data_path), flag)


def build_dataset(
    name: str,
    split: str,
    *,
    data_path: str | os.PathLike | None = None,
    input_size: int | None = None,
    model: nn.Module | None = None,
    train_transform: bool = False,
    aug: dict[str, Any] | None = None,
    synthetic_size: int = 256,
    num_classes: int | None = None,
) -> Dataset:
    """The ``split`` ('train' / 'val') of data set ``name``, with timm transforms where images are real."""
    spec = get_data_set(name)
    if split not in ("train", "val"):
        raise ShrinkError(f"split must be 'train' or 'val', got {split!r}")
    return spec.build(DataRequest(name, split, data_path, input_size, model, train_transform, aug,
                                  synthetic_size, num_classes))


def count_classes(name: str, data_path: str | os.PathLike | None = None, default: int = 10) -> int:
    """Classes of data set ``name`` without loading it (folders: the class sub-folders of train/)."""
    n = get_data_set(name).num_classes
    if n is None:
        return default
    return n if isinstance(n, int) else n(data_path)


# --------------------------------------------------------------------------------------------------
# The built-in data sets
# --------------------------------------------------------------------------------------------------


@register_data_set("digits", num_classes=10)
def _digits(req: DataRequest) -> Dataset:
    return DigitsDataset(req.split, augment=req.train_transform)


def _check_download_folder(root: Path, flag: str) -> None:
    if root.exists() and not root.is_dir():
        raise ShrinkError(f"{flag} {root} is a file, not a folder")


def _cifar(cls: type, req: DataRequest) -> Dataset:
    transform = req.transform()
    if req.data_path is None:
        raise ShrinkError(f"--data-path is required for {req.name} (the folder to download into or read from)")
    try:
        return cls(str(req.data_path), train=req.split == "train", transform=transform, download=True)
    except Exception as e:  # noqa: BLE001 - network or file errors, reported in one line
        raise ShrinkError(f"cannot get {req.name} in {req.data_path}: {first_line(e)}") from None


_CIFAR_PATH = "the folder to download into or read from"


@register_data_set("cifar10", path=_CIFAR_PATH, num_classes=10, check=_check_download_folder)
def _cifar10(req: DataRequest) -> Dataset:
    return _cifar(GuardedCIFAR10, req)


@register_data_set("cifar100", path=_CIFAR_PATH, num_classes=100, check=_check_download_folder)
def _cifar100(req: DataRequest) -> Dataset:
    return _cifar(GuardedCIFAR100, req)


_FOLDER_NEEDS_PATH = "--data-path is required for --data-set folder (a folder with train/ and val/)"
_FOLDER_LAYOUT = "expected DATA_PATH/train and DATA_PATH/val"


def _check_folder(root: Path, flag: str) -> None:
    """DATA_PATH/train and DATA_PATH/val with the same class folders."""
    if not root.is_dir():
        raise ShrinkError(f"data path not found: {root}" if not root.exists() else f"{flag} {root} is not a folder")
    classes = {}
    for split in ("train", "val"):
        if not (root / split).is_dir():
            raise ShrinkError(f"data folder not found: {root / split} (expected DATA_PATH/train and DATA_PATH/val)")
        try:
            classes[split] = sorted(e.name for e in os.scandir(root / split) if e.is_dir())
        except OSError as e:
            raise ShrinkError(f"cannot read {root / split}: {e.strerror or e}") from None
    if not classes["train"]:
        raise ShrinkError(f"{root / 'train'} has no class folders (expected train/<class>/<image> files)")
    if classes["train"] != classes["val"]:
        only = sorted(set(classes["train"]) ^ set(classes["val"]))
        raise ShrinkError(f"{root}: train/ and val/ have different class folders ({len(classes['train'])} vs "
                          f"{len(classes['val'])}; e.g. {only[0]!r} is in one only), so val labels would not match")


def _folder_classes(data_path: str | os.PathLike | None) -> int:
    if data_path is None:
        raise ShrinkError(_FOLDER_NEEDS_PATH)
    root = Path(data_path) / "train"
    if not root.is_dir():
        raise ShrinkError(f"data folder not found: {root} ({_FOLDER_LAYOUT})")
    from torchvision.datasets.folder import find_classes

    try:
        return len(find_classes(str(root))[0])
    except FileNotFoundError as e:
        raise ShrinkError(f"cannot read image folder {root}: {e}") from None


@register_data_set("folder", path="a folder with train/ and val/", num_classes=_folder_classes, check=_check_folder)
def _folder(req: DataRequest) -> Dataset:
    transform = req.transform()
    if req.data_path is None:
        raise ShrinkError(_FOLDER_NEEDS_PATH)
    root = Path(req.data_path) / req.split
    if not root.is_dir():
        raise ShrinkError(f"data folder not found: {root} ({_FOLDER_LAYOUT})")
    try:
        return GuardedImageFolder(str(root), transform=transform)
    except (FileNotFoundError, RuntimeError) as e:
        raise ShrinkError(f"cannot read image folder {root}: {first_line(e)}") from None


@register_data_set("synthetic")
def _synthetic(req: DataRequest) -> Dataset:
    n_cls = req.num_classes or getattr(req.model, "num_classes", None) or 10
    return SyntheticDataset(req.synthetic_size, req.input_shape(), n_cls, seed=0 if req.split == "train" else 1)


NUM_CLASSES = {n: s.num_classes for n, s in DATA_SET_REGISTRY.items() if isinstance(s.num_classes, int)}


def with_transform(dataset: Dataset, train_transform: bool, model: nn.Module | None = None,
                   input_size: int | None = None) -> Dataset:
    """The same images with another transform, without reading the data set again (a shallow copy)."""
    import copy

    if isinstance(dataset, DigitsDataset):
        out = copy.copy(dataset)
        out.augment = train_transform
        return out
    if hasattr(dataset, "transform"):
        out = copy.copy(dataset)
        out.transform = build_transform(train_transform, model, input_size)
        return out
    return dataset


class WorkerSeeder:
    """A DataLoader ``worker_init_fn``: each worker's ``random``, numpy and torch streams from
    (seed, rank, worker id, the loader's base seed for this pass).

    Torch draws the base seed from the process's own torch RNG each time an iterator starts (each
    epoch, with non-persistent workers), and that RNG is part of the saved state, so a resumed run
    gives its workers the streams the uninterrupted run gave them. Persistent workers would keep
    their streams across epochs, where a resume cannot restore them.
    """

    def __init__(self, seed: int, rank: int = 0):
        self.seed, self.rank = int(seed), int(rank)

    def __call__(self, worker_id: int) -> None:
        import random

        info = torch.utils.data.get_worker_info()
        base = (info.seed - worker_id) if info is not None else 0
        words = np.random.SeedSequence([self.seed % 2**32, self.rank, worker_id, base % 2**64]).generate_state(4)
        random.seed(int(words[0]) << 32 | int(words[1]))
        np.random.seed(int(words[2]))
        torch.manual_seed(int(words[3]) << 32 | int(words[1]))


def calibration_subset(dataset: Dataset, n: int | None, seed: int = 0) -> Dataset:
    """A deterministic subset of ``n`` images (all of them if ``n`` is None or larger than the set)."""
    if n is None or n >= len(dataset):
        return dataset
    if n <= 0:
        raise ShrinkError(f"the number of calibration images must be positive, got {n}")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(dataset), generator=g)[:n].sort().values.tolist()
    return Subset(dataset, idx)
