"""Real image files through the DeiT recipe's data pipeline (issue 20): photo crops of mixed sizes
and modes, PNG and JPEG, one truncated; timm's augmentation with the installed Pillow; errors in
the pipeline as one line naming the file and the op; evaluation of a model saved at a small size;
kill + resume with data-loader workers."""
from __future__ import annotations

import random

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from shrink import ShrinkError
from shrink.data.datasets import build_dataset, build_transform
from shrink.data.transforms import augment_ops

from ..conftest import real_image_folder

POLICIES = ["rand-m9-mstd0.5-inc1", "rand-m9-mstd0.5", "rand-m10-n3-mmax30-inc1", "original", "v0", "3a",
            "augmix-m5-w3-d2"]


@pytest.fixture(scope="module")
def photos():
    """Crops of scikit-learn's sample photos: RGB, and RGB converted from L, RGBA, CMYK and palette."""
    from sklearn.datasets import load_sample_images

    china, flower = load_sample_images().images
    rgb = Image.fromarray(china[100:150, 200:240])
    return {"RGB": rgb, "L": Image.fromarray(flower[:40, :50]).convert("L"),
            "RGBA>RGB": rgb.convert("RGBA").convert("RGB"), "CMYK>RGB": rgb.convert("CMYK").convert("RGB"),
            "P>RGB": rgb.convert("P", palette=Image.Palette.ADAPTIVE).convert("RGB"),
            "flat": Image.new("RGB", (17, 23), (128, 128, 128))}


@pytest.mark.parametrize("policy", POLICIES)
def test_every_op_of_the_policy_works_at_its_extreme_magnitudes(policy, photos):
    """Each op of the built policy, at the lowest, the policy's and the highest magnitude, on every mode."""
    ops = augment_ops(build_transform(True, input_size=32, aug={"auto_augment": policy}))
    assert ops, policy
    random.seed(0)
    for op in ops:
        top = op.magnitude_max or 10
        for magnitude in (0.0, 0.5, op.magnitude, top - 0.5, top):
            args = op.level_fn(magnitude, op.hparams) if op.level_fn is not None else ()
            for mode, img in photos.items():
                out = op.aug_fn(img, *args, **op.kwargs)
                assert isinstance(out, Image.Image) and out.size == img.size and out.mode == img.mode, \
                    (policy, op.name, magnitude, mode)


def test_posterize_to_zero_bits_is_black_as_older_pillow_gave(photos):
    ops = [op for op in augment_ops(build_transform(True, input_size=32, aug={"auto_augment": "rand-m9-mstd0.5-inc1"}))
           if op.name.startswith("Posterize")]
    assert ops and all(op.level_fn(10, op.hparams) == (0,) for op in ops)  # the top magnitude asks for 0 bits
    for img in (photos["RGB"], photos["L"]):
        out = ops[0].aug_fn(img, 0, **ops[0].kwargs)
        assert np.asarray(out).max() == 0
        one = ops[0].aug_fn(img, 1, **ops[0].kwargs)  # 1 bit is still Pillow's own posterize
        assert set(np.unique(np.asarray(one)).tolist()) <= {0, 128}


@pytest.mark.parametrize("policy", ["rand-m9-mstd0.5-inc1", "rand-m10-n2-p1.0-inc1"])
def test_the_hardened_policy_draws_what_timm_draws(photos, policy):
    """Same seeds, same images: timm's own RandAugment and ours agree (and consume the same random
    numbers) whenever timm's does not hit Pillow 13's refusal; there ours gives the black image.
    (The default policy asks for 0 bits in about 1 image of 650; m10 without noise in 1 of 8.)"""
    from timm.data import create_transform

    kw = dict(input_size=(3, 32, 32), auto_augment=policy, re_prob=0.25, color_jitter=0.4)
    ours = build_transform(True, input_size=32, aug={"auto_augment": policy, "re_prob": 0.25, "color_jitter": 0.4})
    timms = create_transform(is_training=True, **kw, interpolation="bicubic")
    same = refused = 0
    for seed in range(80):
        results = []
        for t in (timms, ours):
            random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
            try:
                x = t(photos["RGB"])
            except ValueError as e:
                assert "bits" in str(e)
                x = None
            results.append((x, random.random(), float(np.random.rand()), float(torch.rand(()))))
        (a, *ra), (b, *rb) = results
        if a is None:  # timm's stopped at the refusal; ours went on with a black image
            refused += 1
        else:
            same += 1
            assert torch.equal(a, b) and ra == rb, seed  # the same image and the same draws afterwards
    assert same > 50 and (refused > 0 or policy.startswith("rand-m9"))  # timm's own hits the refusal


def _corrupt_folder(tmp_path):
    root = real_image_folder(tmp_path / "imgs", per_class=4, val_per_class=2, truncated=False)
    bad = root / "train" / "china" / "002.png"
    bad.write_bytes(b"this is not an image\n" * 10)
    return root, bad


@pytest.mark.parametrize("workers", [0, 1])
def test_an_unreadable_image_is_one_line_naming_the_file(tmp_path, workers):
    root, bad = _corrupt_folder(tmp_path)
    ds = build_dataset("folder", "train", data_path=root, input_size=32, train_transform=True,
                       aug={"auto_augment": "rand-m9-mstd0.5-inc1"})
    loader = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=workers)
    with pytest.raises(ShrinkError) as info:
        list(loader)
    msg = str(info.value)
    assert "\n" not in msg and str(bad) in msg and "not an image file Pillow can read" in msg, msg


@pytest.mark.parametrize("workers", [0, 1])
def test_a_failing_augmentation_op_is_one_line_naming_file_and_op(tmp_path, workers):
    root = real_image_folder(tmp_path / "imgs", per_class=2, val_per_class=1, truncated=False)
    ds = build_dataset("folder", "train", data_path=root, input_size=32, train_transform=True,
                       aug={"auto_augment": "rand-n2-m9-p1.0-t3a"})

    def broken(img, *args, **kwargs):
        raise RuntimeError("simulated failure\nsecond line")

    for op in augment_ops(ds.transform):
        op.aug_fn.fn = broken
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=workers)
    with pytest.raises(ShrinkError) as info:
        next(iter(loader))
    msg = str(info.value)
    assert "\n" not in msg and "augmentation " in msg and "simulated failure" in msg, msg
    assert str(root / "train") in msg and "RuntimeError" in msg


def test_a_real_folder_loads_every_mode_and_the_truncated_file(tmp_path):
    root = real_image_folder(tmp_path / "imgs", per_class=8, val_per_class=2)
    modes = {Image.open(p).mode for p in root.rglob("*.*")}
    assert {"RGB", "L", "RGBA", "CMYK", "P", "LA", "I;16"} <= modes
    ds = build_dataset("folder", "train", data_path=root, input_size=32, train_transform=True,
                       aug={"auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.25, "color_jitter": 0.4})
    val = build_dataset("folder", "val", data_path=root, input_size=32)
    for d in (ds, val):
        for i in range(len(d)):
            x, _ = d[i]
            assert x.shape == (3, 32, 32) and torch.isfinite(x).all()


# --- a model trained at a small input size, evaluated from best/ without retyping the size ----------------

def _train_args(root, out, *extra):
    return ["--model", "deit_tiny_patch16_224", "--no-pretrained", "--data-path", str(root), "--input-size", "32",
            "--remove-layers", "1,3", "--epochs", "2", "--dilution-epochs", "1", "--batch-size", "8",
            "--calib-images", "16", "--output-dir", str(out), "--no-progress", *extra]


def test_trained_at_32_px_evaluates_from_best_with_and_without_tome(tmp_path, capsys):
    import json

    import main_lambda

    root = real_image_folder(tmp_path / "imgs", per_class=8, val_per_class=3)
    out = tmp_path / "run"
    assert main_lambda.main(_train_args(root, out, "--num-workers", "0")) == 0  # default --aa: RandAugment
    data = json.loads((out / "best" / "config.json").read_text())["data_config"]
    timm_cfg = timm.create_model("deit_tiny_patch16_224").pretrained_cfg  # timm's record says 224
    assert data["input_size"] == [3, 32, 32] and timm_cfg["input_size"] == (3, 224, 224)
    assert (data["crop_pct"], data["interpolation"], data["mean"]) == \
        (timm_cfg["crop_pct"], timm_cfg["interpolation"], list(timm_cfg["mean"]))
    capsys.readouterr()
    best = str(out / "best")
    assert main_lambda.main(["--eval", "--checkpoint", best, "--data-path", str(root), "--no-progress"]) == 0
    shown = capsys.readouterr().out
    assert any(line.split()[:2] == ["val", "images"] and line.split()[-1] == "6" for line in shown.splitlines()), shown
    assert main_lambda.main(["--eval", "--checkpoint", best, "--data-path", str(root), "--tome-r", "1",
                             "--no-progress"]) == 0
    assert "ToMe r=1" in capsys.readouterr().out
    assert main_lambda.main(["--eval", "--checkpoint", best, "--data-set", "synthetic", "--synthetic-images", "8",
                             "--no-progress"]) == 0
    shown = capsys.readouterr().out
    assert any(line.split()[:2] == ["val", "images"] and line.split()[-1] == "8" for line in shown.splitlines()), shown


def test_the_cli_stops_on_an_unreadable_image_in_one_line(tmp_path, capsys):
    import main_lambda

    root, bad = _corrupt_folder(tmp_path)
    out = tmp_path / "run"
    args = _train_args(root, out, "--num-workers", "1")
    args[args.index("--batch-size") + 1] = "4"
    assert main_lambda.main(args) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1 and str(bad) in err[0] and "Traceback" not in err[0], err
    assert not out.exists()  # a new run that failed before its first epoch leaves nothing
