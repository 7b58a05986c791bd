"""Data helpers: the fixed digits split, class counts without loading, re-transforming without re-reading."""
from __future__ import annotations

import pytest
import torch

from shrink import ShrinkError
from shrink.data.datasets import (
    DigitsDataset,
    build_dataset,
    calibration_subset,
    count_classes,
    with_transform,
)

from ..conftest import image_folder


def test_digits_split_is_fixed_and_stratified():
    tr, va = DigitsDataset("train"), DigitsDataset("val")
    assert (len(tr), len(va)) == (1437, 360)
    assert torch.equal(DigitsDataset("val").targets, va.targets)
    assert set(torch.bincount(va.targets).tolist()) <= {35, 36, 37}  # ~36 per class


def test_count_classes_and_eval_copy_of_a_folder(tmp_path):
    root = image_folder(tmp_path / "imgs", classes=("a", "b", "c"), per_class=2)
    assert count_classes("folder", root) == 3 and count_classes("cifar100") == 100 and count_classes("digits") == 10
    with pytest.raises(ShrinkError, match="not found"):
        count_classes("folder", tmp_path / "missing")
    train = build_dataset("folder", "train", data_path=root, input_size=32, train_transform=True,
                          aug={"auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.25})
    calib = with_transform(train, False, input_size=32)
    assert calib.samples is train.samples  # the same file list: the folder is not scanned again
    assert torch.equal(calib[0][0], calib[0][0])  # eval transform: deterministic
    assert calib[0][0].shape == (3, 32, 32)
    sub = calibration_subset(calib, 4, seed=0)
    assert list(sub.indices) == list(calibration_subset(calib, 4, seed=0).indices) and len(sub) == 4


def test_a_registered_data_set_is_built_counted_and_checked():
    from torch.utils.data import TensorDataset

    from shrink.data import DATA_SETS, check_data_path, register_data_set, unregister_data_set

    @register_data_set("ones", num_classes=3)
    def ones(req):
        c, h, w = req.input_shape()
        n = 6 if req.split == "train" else 2
        return TensorDataset(torch.ones(n, c, h, w), torch.zeros(n, dtype=torch.long))

    try:
        assert "ones" in DATA_SETS
        ds = build_dataset("ones", "val", input_size=16)
        assert len(ds) == 2 and ds[0][0].shape == (3, 16, 16)
        assert count_classes("ones") == 3
        check_data_path("ones", None)  # needs no --data-path
    finally:
        unregister_data_set("ones")
    assert "ones" not in DATA_SETS


def test_an_unknown_data_set_is_one_line():
    with pytest.raises(ShrinkError) as e:
        build_dataset("digitz", "train")
    assert str(e.value) == "unknown data set 'digitz'; choose one of digits, cifar10, cifar100, folder, synthetic"
