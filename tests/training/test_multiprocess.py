"""Two processes (torchrun + gloo on the CPU, through ``accelerate launch``): kill and resume with every
optional state, and a failure on one rank only.

The fp16 grad scaler (``state/scaler.pt``) exists only on a GPU; ``scripts/gpu_check.sh`` covers it.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import shrink

from ..conftest import accelerate, image_folder, metrics, run

# EMA, distillation and the lambda = 0 switch (epoch 1), in two processes
ARGS = ["--remove-layers", "1,3", "--epochs", "3", "--dilution-epochs", "1", "--model-ema", "--model-ema-decay", "0.9",
        "--distill", "--no-progress"]


def _die_at(name: str, n: int, out: Path, *extra: str):
    """tests/die_at_rename.py under a 2-process launch: rank 0 dies at its n-th rename onto ``name``
    (``.last.old``: a last/ swap half done, which every epoch after the first makes)."""
    return run([*accelerate(2), "tests/die_at_rename.py", name, str(n), *extra, "--output-dir", str(out)])


def _comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


@pytest.mark.slow
def test_two_processes_killed_twice_resume_with_ema_distillation_and_the_switch(tmp_path):
    """Killed after epoch 0 (last/ swap half done in epoch 1, the switch epoch), resumed and killed again
    after the switch (last/ swap half done in epoch 2, the state attention-free with its EMA), resumed again: the
    metrics of the uninterrupted 2-process run. Before the fix the first resume stopped with
    ``ema.safetensors does not load (device cpu:0 is invalid)``."""
    ref, out = tmp_path / "ref", tmp_path / "run"
    res = run([*accelerate(2), "main_lambda.py", *ARGS, "--output-dir", str(ref)])
    assert res.returncode == 0, res.stderr[-3000:]

    killed = _die_at(".last.old", 1, out, *ARGS)  # epoch 1's last/ swap; the state is the one after epoch 0
    assert killed.returncode != 0 and [r["epoch"] for r in metrics(out)] == [0]
    # resumed from epoch 1: the second last/ swap is epoch 2's, after the state of epoch 1 (attention-free,
    # with the exported EMA) is in place
    again = _die_at(".last.old", 2, out, "--resume", "--no-progress")
    assert again.returncode != 0, again.stderr[-3000:]
    assert "resumed after epoch 0 of 3" in again.stdout
    state = json.loads((out / "state" / "trainer_state.json").read_text())
    assert state["epoch"] == 1 and state["attention_free"], state
    done = run([*accelerate(2), "main_lambda.py", "--resume", "--no-progress", "--output-dir", str(out)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed after epoch 1 of 3" in done.stdout

    assert _comparable(metrics(out)) == _comparable(metrics(ref))
    assert all("ema_acc_deploy" in r for r in metrics(out))
    s, r = (json.loads((d / "summary.json").read_text()) for d in (out, ref))
    for key in ("deploy_acc_best", "best_epoch", "best_source", "best_acc_reloaded", "num_processes"):
        assert s[key] == r[key], key
    assert shrink.attention_free_indices(shrink.load(out / "best")) == [1, 3]
    assert not [p.name for p in out.rglob(".*") if p.name.endswith((".tmp", ".old"))]


@pytest.mark.slow
def test_a_failure_on_rank_1_only_is_one_line_naming_it_and_the_new_run_leaves_nothing(tmp_path):
    """Of the val images (not shuffled; Accelerate deals batch 0 to rank 0, batch 1 to rank 1) only
    rank 1 reads ``val/dog/*``, where one file is not an image: the dense evaluation of the set-up
    fails on rank 1 alone while rank 0 waits in a collective. Before the fix only rank 0 spoke
    (``cli_main`` printed on rank 0 only): a gloo "Connection closed by peer" traceback."""
    root = image_folder(tmp_path / "imgs", per_class=4, size=12)
    bad = root / "val" / "dog" / "3.png"
    bad.write_bytes(b"this is not an image\n" * 10)
    out = tmp_path / "run"
    res = run([*accelerate(2), "main_lambda.py", "--model", "deit_tiny_patch16_224", "--no-pretrained",
               "--data-path", str(root), "--input-size", "16", "--batch-size", "4",
               "--num-workers", "0", "--remove-layers", "1", "--epochs", "1", "--dilution-epochs", "1",
               "--no-progress", "--output-dir", str(out)], timeout=300)
    assert res.returncode != 0
    said = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert said and said[0].startswith("error: rank 1: ") and str(bad) in said[0], res.stderr[-3000:]
    assert all(line.startswith("error: rank 0: stopped ") for line in said[1:]), said  # rank 0: why it stopped
    assert "[rank0]" not in res.stderr and "[rank1]" not in res.stderr, res.stderr[-3000:]  # no worker traceback
    assert not out.exists()  # a new run that failed in its set-up leaves the folder as it found it
