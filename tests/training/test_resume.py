"""Kill a run at the worst moments, resume it, and get the run an uninterrupted process would have made.

Each kill is exact: ``tests/die_at_main.py K`` ends the process (os._exit, no clean-up) at the K-th
rename of the toolkit's atomic writes, or when layer selection starts. On this CPU path training is
deterministic, so the resumed metrics.jsonl must equal the uninterrupted one in every field but the
wall-clock seconds.

The runs of the slow tests are single-threaded processes that do not depend on one another: the
``jobs`` fixture starts those of the selected tests two at a time (CI has 2 cores, and the pytest
process only waits for them); each test then asserts on its own runs as before.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import shrink
from shrink.blocks.dilution import lambda_reference

from ..conftest import ROOT, accelerate, metrics, run, subprocess_env

ARGS = ["--remove-layers", "1,3", "--epochs", "4", "--dilution-epochs", "2", "--model-ema", "--model-ema-decay",
        "0.9", "--calib-images", "64", "--no-progress"]
# Renames of that run: 1 creates the folder; 2-4 the state after the set-up; 5-11 epoch 0; 12-20 epoch 1;
# 21-29 epoch 2 (the first at lambda = 0); 30-38 epoch 3; 39-40 summary and plot (see die_at_main.py, K = 0).
KILLS = {
    3: "set-up state half written (.state.tmp without trainer_state.json)",
    10: "state swap half done (state -> .state.old, the new one not in place)",
    12: "best/ swap half done (best -> .best.old)",
    21: "in the switch epoch, best/ swap half done",
    27: "in the switch epoch, trainer_state.json of the new state not in place",
    33: "last/ swap half done after the switch",
}


def _comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def _die_at(k: int, out: Path, extra: list[str] = ()):
    return run([sys.executable, "tests/die_at_main.py", str(k), *ARGS, *extra, "--output-dir", str(out)])


def _uninterrupted(tmp: Path) -> Path:
    out = tmp / "run"
    res = _die_at(0, out)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "renames: 40" in res.stderr  # the kill points above assume this sequence of writes
    return out


@pytest.fixture(scope="module")
def uninterrupted(jobs):
    return jobs["uninterrupted"].result()


def _assert_same_run(out: Path, ref: Path) -> None:
    assert _comparable(metrics(out)) == _comparable(metrics(ref))
    s, r = (json.loads((d / "summary.json").read_text()) for d in (out, ref))
    for key in ("removed_layers", "dense_acc", "deploy_acc_start", "deploy_acc_best", "best_epoch", "best_source",
                "best_acc_reloaded", "params_deploy"):
        assert s[key] == r[key], key
    assert shrink.attention_free_indices(shrink.load(out / "best")) == [1, 3]
    leftovers = [p.name for p in out.rglob(".*") if p.name.endswith((".tmp", ".old"))]
    assert not leftovers, leftovers


def _kill_at_a_rename_then_resume(tmp: Path, k: int) -> Path:
    out = tmp / "run"
    killed = _die_at(k, out)
    assert killed.returncode == 137, f"{KILLS[k]}: {killed.stderr[-2000:]}"
    res = run([sys.executable, "main_lambda.py", "--resume", "--output-dir", str(out), "--no-progress"])
    assert res.returncode == 0, f"{KILLS[k]}: {res.stderr[-3000:]}"
    return out


@pytest.mark.slow
@pytest.mark.parametrize("k", sorted(KILLS), ids=[f"rename{k}" for k in sorted(KILLS)])
def test_kill_at_a_rename_then_resume_gives_the_uninterrupted_run(jobs, uninterrupted, k):
    _assert_same_run(jobs[f"rename{k}"].result(), uninterrupted)


@pytest.mark.slow
def test_kill_during_selection_then_resume(jobs):
    jobs["selection"].result()


def _kill_during_selection_then_resume(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["--remove-ratio", "0.25", "--epochs", "2", "--dilution-epochs", "1", "--calib-images", "64"]
    killed = run([sys.executable, "tests/die_at_main.py", "-1", *args, "--no-progress", "--output-dir", str(out)])
    assert killed.returncode == 137
    assert (out / "config.yaml").is_file() and not (out / "state").exists()
    res = run([sys.executable, "main_lambda.py", "--resume", "--output-dir", str(out), "--no-progress"])
    assert res.returncode == 0, res.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert len(s["removed_layers"]) == 3 and s["criterion"] == "transfer_entropy"
    assert [r["epoch"] for r in metrics(out)] == [0, 1]


@pytest.mark.slow
def test_resume_when_the_next_epoch_is_the_switch(jobs):
    """The last state is from lambda > 0 and the next epoch is at lambda = 0 (the landed main crashed
    here): stop after epoch 1 of a dilution over 2 epochs, then resume with the full length."""
    jobs["switch"].result()


def _resume_when_the_next_epoch_is_the_switch(tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = run([sys.executable, "main_lambda.py", *ARGS[:2], "--epochs", "2", "--dilution-epochs", "2",
                  "--calib-images", "64", "--no-progress", "--output-dir", str(out)])
    assert first.returncode == 0, first.stderr[-3000:]
    res = run([sys.executable, "main_lambda.py", "--resume", "--epochs", "4", "--output-dir", str(out),
                "--no-progress"])
    assert res.returncode == 0, res.stderr[-3000:]
    rows = metrics(out)
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3] and [r["lambda"] for r in rows] == [1.0, 0.5, 0.0, 0.0]
    assert "epochs: 4" in (out / "config.yaml").read_text()  # the allowed change is recorded



def _one_epoch_run(tmp: Path) -> Path:
    out = tmp / "run"
    res = run([sys.executable, "main_lambda.py", "--remove-layers", "1", "--epochs", "1", "--dilution-epochs", "1",
                "--no-progress", "--output-dir", str(out)])
    assert res.returncode == 0, res.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def one_epoch_run(jobs):
    return jobs["one_epoch"].result()


@pytest.mark.slow
@pytest.mark.parametrize("victim, damage, match", [
    ("random_states_0.pkl", b"\x80\x04junk", "random_states_0.pkl"),   # Accelerate alone would skip it silently
    ("random_states_0.pkl", None, "random_states_0.pkl"),              # missing
    ("model.safetensors", b"\x00garbage", "cannot resume"),
    ("optimizer.bin", b"PK\x03\x04", "cannot resume"),
    ("trainer_state.json", b'{"epoch": "one"}', "damaged"),
])
def test_a_damaged_state_stops_the_resume_in_one_line(tmp_path, one_epoch_run, victim, damage, match):
    out = tmp_path / "run"
    shutil.copytree(one_epoch_run, out)
    path = out / "state" / victim
    if damage is None:
        path.unlink()
    else:
        path.write_bytes(damage)
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in out.rglob("*")}
    res = run([sys.executable, "main_lambda.py", "--resume", "--epochs", "2", "--output-dir", str(out),
                "--no-progress"])
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and match in lines[0], res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in out.rglob("*")} == before  # nothing touched


@pytest.mark.slow
def test_resume_with_another_number_of_processes_is_refused_once(tmp_path, one_epoch_run):
    out = tmp_path / "run"
    shutil.copytree(one_epoch_run, out)
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in out.rglob("*")}
    res = run([*accelerate(2), "main_lambda.py", "--resume", "--epochs", "2", "--output-dir", str(out),
                "--no-progress"])
    assert res.returncode != 0
    said = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert said == ["error: cannot resume: the run was saved by 1 process(es) and this one has 2; launch it "
                    "with --num_processes 1"]  # once, not once per process
    assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in out.rglob("*")} == before


@pytest.mark.slow
def test_sigkill_then_resume(jobs):
    jobs["sigkill"].result()


def _sigkill_then_resume(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = [sys.executable, "main_lambda.py", "--remove-layers", "1,3", "--epochs", "8", "--dilution-epochs", "4",
            "--no-progress", "--output-dir", str(out)]
    proc = subprocess.Popen(args, cwd=ROOT, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline:
        if (out / "metrics.jsonl").exists() and len(metrics(out)) >= 3:
            break
        if proc.poll() is not None:
            pytest.fail(f"run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(metrics(out))
    assert 3 <= done < 8, "the run must be killed mid-training"
    # whatever was on disk at the kill is whole
    for f in out.rglob("*.json"):
        json.loads(f.read_text())
    load_file(str(out / "best" / "model.safetensors"))
    res = run([sys.executable, "main_lambda.py", "--resume", "--output-dir", str(out), "--no-progress"])
    assert res.returncode == 0, res.stderr[-3000:]
    rows = metrics(out)
    assert [r["epoch"] for r in rows] == list(range(8))
    expected = [lambda_reference(e, 4) for e in range(8)]
    assert [r["lambda"] for r in rows] == pytest.approx(expected)
    s = json.loads((out / "summary.json").read_text())
    assert s["best_acc_reloaded"] == pytest.approx(s["deploy_acc_best"])
    assert shrink.attention_free_indices(shrink.load(out / "best")) == [1, 3]
    assert not list(out.glob(".*.tmp")) and not list(out.glob(".*.old"))


# --- issue 20 item 5: resume is exact with data-loader workers, on real image files ---------------------

def _worker_run_args(data: Path, out: Path) -> list[str]:
    return [sys.executable, "main_lambda.py", "--model", "deit_tiny_patch16_224", "--no-pretrained",
            "--data-path", str(data), "--input-size", "32", "--remove-layers", "1,3", "--epochs", "2",
            "--dilution-epochs", "1", "--batch-size", "8", "--calib-images", "16", "--num-workers", "2",
            "--no-progress", "--output-dir", str(out)]


@pytest.mark.slow
def test_sigkill_after_the_first_epoch_then_resume_with_workers_is_exact(jobs):
    """Real photos through the default RandAugment with 2 workers: a SIGKILL of the whole process group
    (workers included) once epoch 0's state is saved, then --resume (epoch 1 is the lambda = 0 switch),
    gives the uninterrupted run's metrics and last/ weights (persistent workers used to keep RNG
    streams a resume cannot restore)."""
    jobs["workers"].result()


def _sigkill_after_the_first_epoch_then_resume_with_workers(tmp_path: Path) -> None:
    from ..conftest import real_image_folder

    data = real_image_folder(tmp_path / "imgs", per_class=12, val_per_class=3)
    ref = tmp_path / "ref"
    res = run(_worker_run_args(data, ref))
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "run"
    proc = subprocess.Popen(_worker_run_args(data, out), cwd=ROOT, env=subprocess_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    state = out / "state" / "trainer_state.json"
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if json.loads(state.read_text())["epoch"] >= 0:
                break
        except (OSError, ValueError, KeyError):
            pass
        if proc.poll() is not None:
            pytest.fail(f"run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (out / "summary.json").exists(), "killed before the end"
    res = run([sys.executable, "main_lambda.py", "--resume", "--output-dir", str(out), "--no-progress"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert _comparable(metrics(out)) == _comparable(metrics(ref))
    a, b = (load_file(str(d / "last" / "model.safetensors")) for d in (out, ref))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- the runs, two at a time -------------------------------------------------------------------------

JOBS_AT_ONCE = 2  # CI's cores; each job runs one single-threaded process at a time

# job -> (the tests that need it, the function that runs it in a folder of its own). In the order the
# tests take them, but the two longest last: they run while the tests of one_epoch_run run theirs.
_JOBS = {
    "uninterrupted": ("test_kill_at_a_rename_then_resume_gives_the_uninterrupted_run", _uninterrupted),
    **{f"rename{k}": ("test_kill_at_a_rename_then_resume_gives_the_uninterrupted_run",
                      lambda tmp, k=k: _kill_at_a_rename_then_resume(tmp, k)) for k in sorted(KILLS)},
    "selection": ("test_kill_during_selection_then_resume", _kill_during_selection_then_resume),
    "switch": ("test_resume_when_the_next_epoch_is_the_switch", _resume_when_the_next_epoch_is_the_switch),
    "one_epoch": (("test_a_damaged_state_stops_the_resume_in_one_line",
                   "test_resume_with_another_number_of_processes_is_refused_once"), _one_epoch_run),
    "sigkill": ("test_sigkill_then_resume", _sigkill_then_resume),
    "workers": ("test_sigkill_after_the_first_epoch_then_resume_with_workers_is_exact",
                _sigkill_after_the_first_epoch_then_resume_with_workers),
}


@pytest.fixture(scope="module")
def jobs(request, tmp_path_factory) -> dict[str, Future]:
    """The runs of this file's selected tests (a kill test: its own kill point and the uninterrupted
    run), started two at a time on first use; job -> Future of what its function returns. A job's
    assertions fail the test that takes its result."""
    selected = [item for item in request.session.items if item.module is request.module]
    names = {item.originalname for item in selected}
    kills = {f"rename{item.callspec.params['k']}" for item in selected
             if hasattr(item, "callspec") and "k" in item.callspec.params}

    def needed(job: str, tests: str | tuple[str, ...]) -> bool:
        if job.startswith("rename"):
            return job in kills
        return bool(names & ({tests} if isinstance(tests, str) else set(tests)))

    wanted = [job for job, (tests, _) in _JOBS.items() if needed(job, tests)]
    pool = ThreadPoolExecutor(JOBS_AT_ONCE)
    futures = {job: pool.submit(_JOBS[job][1], tmp_path_factory.mktemp(job)) for job in wanted}
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)
