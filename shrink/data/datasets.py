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
from torchvision.datasets import CIFAR10, CIFAR100, ImageFolder  # timm imports torchvision anyway

from shrink.errors import ShrinkError, first_line

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


class DataPipelineError(ShrinkError):
    """An image that cannot be read or transformed: one line naming the file (or item) and the step.

    Raised inside a DataLoader worker it comes back through torch's ``ExceptionWrapper``, which
    re-creates it as ``cls(message=<the worker's traceback>)`` because of the ``message`` class
    attribute; the constructor then keeps the worker's own one line instead of the traceback.
    """

    message = "data pipeline error"  # truthy: DataLoader re-raises with message=<traceback text>

    def __init__(self, text: str = "", *, message: str | None = None):
        if message is not None:
            tag = f"{type(self).__name__}: "
            lines = [ln for ln in message.splitlines() if tag in ln]
            where = message.splitlines()[0].removeprefix("Caught ").removeprefix(type(self).__name__).strip(" .")
            text = f"{lines[-1].split(tag, 1)[1]} ({where})" if lines else first_line(ValueError(message))
        super().__init__(text)


class AugmentationError(Exception):
    """An augmentation op that failed; :class:`DataPipelineError` adds the file it failed on."""


class _GuardedOp:
    """A timm augmentation op function that names itself when it fails (picklable: workers may spawn)."""

    def __init__(self, name: str, fn):
        self.name, self.fn = name, fn

    def __call__(self, img, *args, **kwargs):
        fill = kwargs.get("fillcolor")
        bands = len(img.getbands()) if hasattr(img, "getbands") else None
        if isinstance(fill, (tuple, list)) and bands == 1 and len(fill) != 1:
            # timm fills with the RGB mean; a grey image takes one value (their mean)
            kwargs["fillcolor"] = round(sum(fill) / len(fill))
        try:
            return self.fn(img, *args, **kwargs)
        except Exception as e:  # noqa: BLE001 - re-raised in one line, naming the op
            size = "x".join(map(str, getattr(img, "size", ()))) or "?"
            shown = ", ".join(f"{a:.3g}" if isinstance(a, float) else str(a) for a in args)
            raise AugmentationError(f"augmentation {self.name}({shown}) failed on a {getattr(img, 'mode', '?')} "
                                    f"{size} image: {type(e).__name__}: {first_line(e)}") from None


def posterize_any_bits(img, bits_to_keep, **kwargs):
    """timm's posterize, with 0 bits giving what Pillow < 13 gave (an all-black image) instead of an error.

    timm's RandAugment asks for 0 bits at the top magnitudes of ``PosterizeIncreasing`` and the bottom
    ones of ``Posterize``; Pillow 13 refuses bits outside 1..8.
    """
    from PIL import ImageOps
    from timm.data import auto_augment

    if bits_to_keep <= 0 and img.mode in ("L", "RGB"):
        return img.point([0] * 256 * len(img.getbands()))
    if bits_to_keep <= 0:  # the modes Pillow's posterize refuses anyway: its own error
        return ImageOps.posterize(img, 1)
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


def augment_ops(transform) -> list:
    """The timm ``AugmentOp``s of a transform (RandAugment, AutoAugment, AugMix), in order."""
    from timm.data.auto_augment import AugmentOp

    found: list = []

    def walk(obj, depth: int = 0) -> None:
        if depth > 6:
            return
        if isinstance(obj, AugmentOp):
            found.append(obj)
        elif isinstance(obj, (list, tuple)):
            for item in obj:
                walk(item, depth + 1)
        else:
            for attr in ("transforms", "ops", "policy"):
                if isinstance(getattr(obj, attr, None), (list, tuple)):
                    walk(getattr(obj, attr), depth + 1)

    walk(transform)
    return found


def harden_augmentation(transform):
    """Make timm's augmentation ops work with the installed Pillow and name themselves when they fail.

    Only each op's image function is replaced (posterize by :func:`posterize_any_bits`, every op
    wrapped to name itself in an error); the policy, the ops' probabilities and magnitudes and their
    random draws stay timm's, so a run draws exactly the augmentations timm would.
    """
    from timm.data import auto_augment

    for op in augment_ops(transform):
        fn = op.aug_fn.fn if isinstance(op.aug_fn, _GuardedOp) else op.aug_fn
        if fn is auto_augment.posterize:
            fn = posterize_any_bits
        op.aug_fn = _GuardedOp(op.name, fn)
    return transform


class _GuardedItems:
    """``__getitem__`` that turns any failure into one :class:`DataPipelineError` line naming the item."""

    def _where(self, index: int) -> str:
        return f"item {index} of {type(self).__name__}"

    def __getitem__(self, index: int):
        try:
            return super().__getitem__(index)
        except (DataPipelineError, MemoryError):
            raise
        except Exception as e:  # noqa: BLE001 - one line naming the file and the step
            what = first_line(e) if isinstance(e, AugmentationError) else f"{type(e).__name__}: {first_line(e)}"
            raise DataPipelineError(f"{self._where(index)}: {what}") from None


_TRUNCATED_SEEN: set[str] = set()


def load_rgb(path: str):
    """An image file as RGB (grayscale, palette, CMYK, 16-bit, alpha converted); a truncated file is
    read as far as it goes (the rest grey, as Pillow's LOAD_TRUNCATED_IMAGES does), with a warning."""
    from PIL import Image, ImageFile, UnidentifiedImageError

    with open(path, "rb") as f:
        try:
            img = Image.open(f)
        except UnidentifiedImageError:
            raise DataPipelineError(f"image {path}: not an image file Pillow can read") from None
        try:
            img.load()
        except OSError as e:
            if "truncated" not in str(e):
                raise
            if path not in _TRUNCATED_SEEN:  # once per file and process, not every epoch
                _TRUNCATED_SEEN.add(path)
                _logger.warning("%s is truncated; using the part that could be read", path)
            previous, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, True
            try:
                f.seek(0)
                img = Image.open(f)
                img.load()
            finally:
                ImageFile.LOAD_TRUNCATED_IMAGES = previous
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grey: scale to 8 bits before RGB
            arr = np.asarray(img, dtype=np.float64)
            top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
            img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
        elif img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")
        return img.convert("RGB")


class GuardedImageFolder(_GuardedItems, ImageFolder):
    """torchvision's ImageFolder, reading with :func:`load_rgb`; a failure names the file."""

    def __init__(self, root: str, transform=None):
        super().__init__(root, transform=transform, loader=load_rgb)

    def _where(self, index: int) -> str:
        return f"image {self.samples[index][0]}" if 0 <= index < len(self.samples) else super()._where(index)


class GuardedCIFAR10(_GuardedItems, CIFAR10):
    """torchvision's CIFAR-10; a failure names the split and index."""


class GuardedCIFAR100(_GuardedItems, CIFAR100):
    """torchvision's CIFAR-100; a failure names the split and index."""


def _model_data_config(model: nn.Module | None, input_size: int | None) -> dict[str, Any]:
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model) if model is not None else {
        "input_size": (3, 224, 224), "interpolation": "bicubic",
        "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "crop_pct": 0.875}
    if input_size is not None:
        cfg["input_size"] = (cfg["input_size"][0], input_size, input_size)
    elif model is not None:  # the size the model was built for, not its pretrained_cfg's (224 for img_size=64)
        for owner in (getattr(model, "patch_embed", None), getattr(model, "stem", None)):
            size = getattr(owner, "img_size", None)
            if isinstance(size, (tuple, list)) and len(size) == 2:
                cfg["input_size"] = (cfg["input_size"][0], int(size[0]), int(size[1]))
                break
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
        return harden_augmentation(create_transform(is_training=True, **kwargs))
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
        if data_path is None:
            raise ShrinkError(f"--data-path is required for {name} (the folder to download into or read from)")
        cls = GuardedCIFAR10 if name == "cifar10" else GuardedCIFAR100
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
    try:
        return GuardedImageFolder(str(root), transform=transform)
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
