"""Data sets and transforms: the embedded digits set, ImageNet-style folders, CIFAR, synthetic images.

Transforms for real images come from timm (``create_transform``), so the DeiT recipe
(RandAugment, colour jitter, random erasing, bicubic 256 -> 224 evaluation) is timm's own.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from .errors import ShrinkError

_logger = logging.getLogger(__name__)

DATA_SETS = ("digits", "cifar10", "cifar100", "folder", "synthetic")
DIGITS_MEAN = (0.5,)
DIGITS_STD = (0.5,)
NUM_CLASSES = {"digits": 10, "cifar10": 10, "cifar100": 100}


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
    if name not in DATA_SETS:
        raise ShrinkError(f"unknown data set {name!r}; choose one of {', '.join(DATA_SETS)}")
    if name in ("digits", "synthetic"):
        return
    if data_path is None or not str(data_path).strip():
        what = "a folder with train/ and val/" if name == "folder" else "the folder to download into or read from"
        raise ShrinkError(f"--data-set {name} needs {flag} ({what})")
    root = Path(data_path)
    if name != "folder":
        if root.exists() and not root.is_dir():
            raise ShrinkError(f"{flag} {root} is a file, not a folder")
        return
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


class DigitsDataset(Dataset):
    """scikit-learn's digits (1,797 8x8 images, 10 classes) with a fixed, stratified, seeded split.

    Pixels are scaled to [0, 1] and normalised with DIGITS_MEAN / DIGITS_STD; ``augment`` adds a
    random shift of up to one pixel (zero padding), the only augmentation that suits 8x8 digits.
    """

    def __init__(self, split: str = "train", augment: bool = False, val_fraction: float = 0.2, seed: int = 0):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        if split not in ("train", "val"):
            raise ShrinkError(f"digits split must be 'train' or 'val', got {split!r}")
        data = load_digits()
        x = data.images.astype(np.float32) / 16.0
        y = data.target.astype(np.int64)
        idx = np.arange(len(y))
        tr, va = train_test_split(idx, test_size=val_fraction, random_state=seed, stratify=y)
        sel = np.sort(tr if split == "train" else va)
        imgs = torch.from_numpy(x[sel]).unsqueeze(1)
        self.images = (imgs - DIGITS_MEAN[0]) / DIGITS_STD[0]
        self.targets = torch.from_numpy(y[sel])
        self.augment = augment
        self.classes = [str(c) for c in range(10)]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = self.images[i]
        if self.augment:
            dx, dy = torch.randint(-1, 2, (2,)).tolist()
            pad = nn.functional.pad(img, (1, 1, 1, 1), value=-DIGITS_MEAN[0] / DIGITS_STD[0])
            img = pad[:, 1 + dy: 9 + dy, 1 + dx: 9 + dx]
        return img, int(self.targets[i])


class SyntheticDataset(Dataset):
    """Deterministic random images and labels (smoke tests and speed measurements only)."""

    def __init__(self, size: int, input_size: tuple[int, int, int], num_classes: int, seed: int = 0):
        self.size, self.input_size, self.num_classes, self.seed = size, tuple(input_size), num_classes, seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        return torch.randn(self.input_size, generator=g), int(torch.randint(self.num_classes, (1,), generator=g))


def _model_data_config(model: nn.Module | None, input_size: int | None) -> dict[str, Any]:
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model) if model is not None else {
        "input_size": (3, 224, 224), "interpolation": "bicubic",
        "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "crop_pct": 0.875}
    if input_size is not None:
        cfg["input_size"] = (cfg["input_size"][0], input_size, input_size)
    return cfg


def build_transform(train: bool, model: nn.Module | None = None, input_size: int | None = None,
                    aug: dict[str, Any] | None = None):
    """timm's train or eval transform for the model's input size, mean and std.

    ``aug`` passes the DeiT recipe to ``timm.data.create_transform`` (auto_augment, color_jitter,
    re_prob, ...). Evaluation resizes to ``size / crop_pct`` then centre-crops (256 -> 224).
    """
    from timm.data import create_transform

    cfg = _model_data_config(model, input_size)
    kwargs = dict(input_size=cfg["input_size"], interpolation=cfg.get("interpolation", "bicubic"),
                  mean=cfg["mean"], std=cfg["std"])
    if train:
        kwargs.update(aug or {})
        return create_transform(is_training=True, **kwargs)
    return create_transform(is_training=False, crop_pct=cfg.get("crop_pct", 0.875), **kwargs)


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
    if name not in DATA_SETS:
        raise ShrinkError(f"unknown data set {name!r}; choose one of {', '.join(DATA_SETS)}")
    if split not in ("train", "val"):
        raise ShrinkError(f"split must be 'train' or 'val', got {split!r}")
    if name == "digits":
        return DigitsDataset(split, augment=train_transform)
    if name == "synthetic":
        cfg = _model_data_config(model, input_size)
        n_cls = num_classes or getattr(model, "num_classes", None) or 10
        return SyntheticDataset(synthetic_size, cfg["input_size"], n_cls, seed=0 if split == "train" else 1)
    transform = build_transform(train_transform, model, input_size, aug)
    if name in ("cifar10", "cifar100"):
        from torchvision import datasets

        if data_path is None:
            raise ShrinkError(f"--data-path is required for {name} (the folder to download into or read from)")
        cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
        try:
            return cls(str(data_path), train=split == "train", transform=transform, download=True)
        except Exception as e:  # noqa: BLE001 - network or file errors, reported in one line
            raise ShrinkError(f"cannot get {name} in {data_path}: {str(e).splitlines()[0] if str(e) else e!r}") from None
    # folder
    if data_path is None:
        raise ShrinkError("--data-path is required for --data-set folder (a folder with train/ and val/)")
    root = Path(data_path) / split
    if not root.is_dir():
        raise ShrinkError(f"data folder not found: {root} (expected DATA_PATH/train and DATA_PATH/val)")
    from torchvision.datasets import ImageFolder

    try:
        return ImageFolder(str(root), transform=transform)
    except (FileNotFoundError, RuntimeError) as e:
        raise ShrinkError(f"cannot read image folder {root}: {str(e).splitlines()[0]}") from None


def count_classes(name: str, data_path: str | os.PathLike | None = None, default: int = 10) -> int:
    """Classes of data set ``name`` without loading it (folders: the class sub-folders of train/)."""
    if name in NUM_CLASSES:
        return NUM_CLASSES[name]
    if name == "synthetic":
        return default
    if data_path is None:
        raise ShrinkError("--data-path is required for --data-set folder (a folder with train/ and val/)")
    root = Path(data_path) / "train"
    if not root.is_dir():
        raise ShrinkError(f"data folder not found: {root} (expected DATA_PATH/train and DATA_PATH/val)")
    from torchvision.datasets.folder import find_classes

    try:
        return len(find_classes(str(root))[0])
    except FileNotFoundError as e:
        raise ShrinkError(f"cannot read image folder {root}: {e}") from None


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


def calibration_subset(dataset: Dataset, n: int | None, seed: int = 0) -> Dataset:
    """A deterministic subset of ``n`` images (all of them if ``n`` is None or larger than the set)."""
    if n is None or n >= len(dataset):
        return dataset
    if n <= 0:
        raise ShrinkError(f"the number of calibration images must be positive, got {n}")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(dataset), generator=g)[:n].sort().values.tolist()
    return Subset(dataset, idx)
