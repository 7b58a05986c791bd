"""Issue 20, "Done when": a folder of a few hundred real image files through the DeiT recipe in 2
processes, end to end.

What the other suites already cover, and what this file adds:

- ``test_real_images.py``: real photo crops (every mode, a truncated JPEG) at 32 px in 1 process, the
  default RandAugment, ``--eval`` from ``best/`` with and without ToMe (about 30 files, in-process);
- ``test_resume.py``: SIGKILL after epoch 0 then ``--resume`` with 2 data-loader workers, exact, in
  1 process (about 30 files);
- ``test_multiprocess.py``: kill + resume in 2 processes, exact, on the embedded digits (no files).

Here: 200 files (mixed sizes, PNG and JPEG, grayscale, CMYK, palette, 16-bit, truncated) with
``configs/deit_tiny_25.yaml``'s recipe as it stands (mixup 0.8, cutmix 1.0, RandAugment, colour
jitter, random erasing, label smoothing, repeated augmentation, drop path, EMA; only the sizes,
epochs, warm-up, precision and workers made small), in 2 processes with 2 workers each: the whole
launch group SIGKILLed once epoch 0's state is saved, resumed in 2 processes, equal to the
uninterrupted 2-process run (metrics, last/ weights, EMA); then ``--eval --checkpoint RUN/best`` with
and without ``--tome-r 1`` in 2 processes and in 1, equal to each other and to the run's summary.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

import shrink

from ..conftest import accelerate, metrics, real_image_folder, run


def _train(data: Path, out: Path) -> list[str]:
    """The DeiT-T recipe of configs/deit_tiny_25.yaml, made small: 32 px, 2 epochs (the switch in the
    second), warm-up 1 epoch, 16 images per process, no pretrained download, fp32 on the CPU."""
    return [*accelerate(2), "main_lambda.py", "--config", "configs/deit_tiny_25.yaml", "--no-pretrained",
            "--data-path", str(data), "--input-size", "32", "--epochs", "2", "--dilution-epochs", "1",
            "--warmup-epochs", "1", "--batch-size", "16", "--num-workers", "2", "--mixed-precision", "no",
            "--threads", "1", "--no-progress", "--output-dir", str(out)]


def _comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def _table(stdout: str) -> dict[str, str]:
    """``--eval``'s table: first column (up to two spaces) -> value."""
    rows = {}
    for line in stdout.splitlines():
        key, sep, value = line.partition("  ")
        if sep:
            rows[key.strip()] = value.strip()
    return rows


def _die_after_epoch_0(cmd: list[str]) -> subprocess.CompletedProcess:
    """The launch, with rank 0 dying (no clean-up, like SIGKILL) at its first ``.last.old`` rename: the
    last/ swap of epoch 1, half done, after epoch 0's state was saved (tests/die_at_rename.py; the
    launcher then stops rank 1). A fixed point in the run, not a race with a polling test."""
    i = cmd.index("main_lambda.py")
    return run([*cmd[:i], "tests/die_at_rename.py", ".last.old", "1", *cmd[i + 1:]], timeout=300)


@pytest.mark.slow
def test_a_few_hundred_real_files_deit_recipe_two_processes_kill_resume_and_eval(tmp_path):
    data = real_image_folder(tmp_path / "imgs", per_class=80, val_per_class=20)
    files = sorted(p for p in data.rglob("*") if p.is_file())
    assert len(files) == 200
    modes = {Image.open(p).mode for p in files}
    assert {"RGB", "L", "CMYK", "P", "I;16"} <= modes
    assert len({Image.open(p).size for p in files}) > 100  # mixed sizes, 24 to 96 px a side
    truncated = [p for p in files if p.parent.parent.name == "train" and p.name == "079.jpg"]
    assert len(truncated) == 2 and all(p.stat().st_size < 3000 for p in truncated)

    ref, out = tmp_path / "ref", tmp_path / "run"
    res = run(_train(data, ref), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "is truncated; using the part that could be read" in res.stderr
    recipe = yaml.safe_load((ref / "config.yaml").read_text())
    assert (recipe["mixup"], recipe["cutmix"], recipe["aa"], recipe["reprob"], recipe["smoothing"],
            recipe["repeated_aug"], recipe["model_ema"], recipe["drop_path"]) == \
        (0.8, 1.0, "rand-m9-mstd0.5-inc1", 0.25, 0.1, True, True, 0.1)

    res = _die_after_epoch_0(_train(data, out))
    assert res.returncode != 0 and not (out / "summary.json").exists(), res.stderr[-3000:]
    assert [r["epoch"] for r in metrics(out)] == [0]
    res = run([*accelerate(2), "main_lambda.py", "--resume", "--threads", "1", "--no-progress",
               "--output-dir", str(out)], timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed after epoch 0 of 2" in res.stdout

    assert _comparable(metrics(out)) == _comparable(metrics(ref))
    for f in ("last/model.safetensors", "state/model.safetensors", "state/ema.safetensors"):
        a, b = load_file(str(out / f)), load_file(str(ref / f))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
    s, r = (json.loads((d / "summary.json").read_text()) for d in (out, ref))
    for key in ("dense_acc", "deploy_acc_best", "best_epoch", "best_source", "best_acc_reloaded", "num_processes"):
        assert s[key] == r[key], key
    assert s["num_processes"] == 2 and shrink.attention_free_indices(shrink.load(out / "best")) == [0, 2, 4]
    assert not [p.name for p in out.rglob(".*") if p.name.endswith((".tmp", ".old"))]

    # best/ carries its data config (32 px): no --input-size; --tome-r 1 reports both, without and with ToMe
    evals = {}
    for n in (2, 1):
        res = run([*accelerate(n), "main_lambda.py", "--eval", "--checkpoint", str(out / "best"), "--data-path",
                   str(data), "--tome-r", "1", "--threads", "1", "--no-progress"], timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        evals[n] = _table(res.stdout)
    two, one = evals[2], evals[1]
    assert two["val images"] == one["val images"] == "40", two
    assert float(two["top-1 (%)"]) == float(one["top-1 (%)"]) == pytest.approx(s["best_acc_reloaded"])
    tome = [k for k in two if k.startswith("top-1 with ToMe r=1")]
    assert len(tome) == 1 and two[tome[0]] == one[tome[0]], (two, one)
    assert two["tokens after each block"] == one["tokens after each block"] == "[5, 4, 4, 3, 3, 2, 2, 2, 2, 2, 2, 2]"
