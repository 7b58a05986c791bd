"""The images themselves: the embedded digits, synthetic images, and torchvision's folders and CIFAR
guarded so that a failure is one line naming the file (or item) and the step."""
from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset
from torchvision.datasets import CIFAR10, CIFAR100, ImageFolder  # timm imports torchvision anyway

from shrink.data.transforms import AugmentationError
from shrink.errors import ShrinkError, first_line

__all__ = ["DIGITS_MEAN", "DIGITS_STD", "DataPipelineError", "DigitsDataset", "GuardedCIFAR10", "GuardedCIFAR100",
           "GuardedImageFolder", "SyntheticDataset", "load_rgb"]

_logger = logging.getLogger(__name__)

DIGITS_MEAN = (0.5,)
DIGITS_STD = (0.5,)


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
