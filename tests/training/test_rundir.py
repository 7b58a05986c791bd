"""shrink.training.run_folder: who may write into an output folder, and leaving it as found."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from shrink.errors import ShrinkError
from shrink.training.run_folder import (
    check_outside_run,
    check_resume_settings,
    check_shared_output_dir,
    create_run_dir,
    enclosing_run_dir,
    inspect_output_dir,
    is_run_dir,
    remove_run_dir,
)

ROOT = Path(__file__).resolve().parents[2]


def _tree(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_new_folder_is_created_with_its_config_and_removed_with_its_parents(tmp_path):
    out = tmp_path / "a" / "b" / "run"
    rd = inspect_output_dir(str(out), resume=False)
    assert not rd.existed and not rd.started
    create_run_dir(rd, "model: x\n")
    assert (out / "config.yaml").read_text() == "model: x\n"
    (out / "best").mkdir()
    remove_run_dir(rd)
    assert _tree(tmp_path) == []  # a/ and a/b/ were made by the run: gone too


def test_empty_folder_is_used_and_emptied_again(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".last.x1.tmp").mkdir()  # a killed write of a run that never started
    rd = inspect_output_dir(str(tmp_path / "run"), resume=False)
    create_run_dir(rd, "a: 1\n")
    assert _tree(tmp_path) == ["run", "run/config.yaml"]
    remove_run_dir(rd)
    assert _tree(tmp_path) == ["run"]


@pytest.mark.parametrize("setup, resume, match", [
    (lambda d: (d / "run").write_text("x"), False, "is a file"),
    (lambda d: ((d / "run").mkdir(), (d / "run" / "thesis.tex").write_text("x")), False, "no shrink run wrote"),
    (lambda d: ((d / "run").mkdir(), (d / "run" / ".gitignore").write_text("x")), False, "no shrink run wrote"),
    (lambda d: ((d / "run").mkdir(), (d / "run" / "best").mkdir()), False, "no config.yaml"),
    (lambda d: ((d / "run").mkdir(), (d / "run" / "config.yaml").write_text("a: 1\n")), False, "--resume"),
    (lambda d: None, True, "nothing to resume"),
    (lambda d: (d / "run").mkdir(), True, "nothing to resume"),
    (lambda d: ((d / "run").mkdir(), (d / "run" / "config.yaml").write_text("[1, 2]\n")), True, "not a mapping"),
])
def test_folders_a_run_may_not_write(tmp_path, setup, resume, match):
    setup(tmp_path)
    before = _tree(tmp_path)
    with pytest.raises(ShrinkError, match=match):
        inspect_output_dir(str(tmp_path / "run"), resume=resume)
    assert _tree(tmp_path) == before


@pytest.mark.parametrize("value", ["", "   "])
def test_empty_output_dir_is_refused(value):
    with pytest.raises(ShrinkError, match="empty"):
        inspect_output_dir(value, resume=False)


def test_output_dir_under_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ShrinkError, match="is a file"):
        inspect_output_dir(str(tmp_path / "f" / "run"), resume=False)


def test_resume_may_change_only_some_settings():
    saved = {"model": "deit_tiny", "epochs": 10, "remove_layers": [0, 2], "lr": 1e-3, "progress": True}
    assert check_resume_settings(saved, {**saved, "epochs": 20, "progress": False, "resume": True}) == \
        ["epochs", "progress"]
    with pytest.raises(ShrinkError, match="--remove-layers"):
        check_resume_settings(saved, {**saved, "remove_layers": [0, 3]})
    with pytest.raises(ShrinkError, match=r"--model .*and 1 more"):
        check_resume_settings(saved, {**saved, "lr": 1e-4, "model": "deit_small"})


def _run_folder(root):
    """A run's folder as a run leaves it: config.yaml, metrics, best/, state/."""
    run = root / "run"
    for d in ("best", "state"):
        (run / d).mkdir(parents=True)
    (run / "config.yaml").write_text("model: x\nepochs: 2\noutput_dir: run\n")
    (run / "metrics.jsonl").write_text("{}\n")
    return run


def test_deploy_folder_is_part_of_a_run_and_resumes(tmp_path):
    run = _run_folder(tmp_path)
    (run / "deploy").mkdir()
    (run / "deploy" / "best.onnx").write_text("x")  # what python -m shrink.deploy --checkpoint RUN/best writes
    (run / "deploy" / "anything").mkdir()
    assert is_run_dir(run) and inspect_output_dir(str(run), resume=True).started


def test_a_resume_refused_for_foreign_files_says_where_they_may_go(tmp_path):
    run = _run_folder(tmp_path)
    (run / "best.onnx").write_text("x")  # where python -m shrink.deploy put its output before issue 20
    with pytest.raises(ShrinkError, match=r"no shrink run wrote \(best.onnx\); move them out .*run/deploy"):
        inspect_output_dir(str(run), resume=True)


def test_output_paths_inside_a_run_are_refused_but_its_deploy_folder(tmp_path):
    run = _run_folder(tmp_path)
    for inside in (run / "best.onnx", run / "best" / "model.onnx", run / "sel" / "selection.json"):
        with pytest.raises(ShrinkError, match=r"--out .* inside the run folder .*deploy"):
            check_outside_run(inside, "--out")
    check_outside_run(run / "deploy" / "best.onnx", "--out")
    check_outside_run(run / "deploy" / "x" / "y.png", "--out")
    check_outside_run(tmp_path / "elsewhere.onnx", "--out")
    check_outside_run(tmp_path / "run2" / "x.onnx", "--out")
    assert enclosing_run_dir(run / "a" / "b.png") == run and enclosing_run_dir(run) is None
    (run / "notes.txt").write_text("x")  # a folder with other files is no run: paths in it are not ours to refuse
    check_outside_run(run / "best.onnx", "--out")
    other = tmp_path / "project"  # a config.yaml of something else (no run settings in it)
    other.mkdir()
    (other / "config.yaml").write_text("name: my project\n")
    assert not is_run_dir(other)
    check_outside_run(other / "results.json", "--out")


def test_the_cli_output_checks_refuse_a_run_folder(tmp_path):
    from shrink.cli.runner import check_output_dir, check_output_file

    run = _run_folder(tmp_path)
    with pytest.raises(ShrinkError, match="--json .* inside the run folder"):
        check_output_file(run / "bench.json", "--json", suffixes=(".json",))
    with pytest.raises(ShrinkError, match="--output-dir .* inside the run folder"):
        check_output_dir(run / "select", "--output-dir")
    assert check_output_file(run / "deploy" / "bench.json", "--json", suffixes=(".json",)).name == "bench.json"
    assert not (run / "deploy").exists()


def test_a_run_inside_a_run_is_refused(tmp_path):
    run = _run_folder(tmp_path)
    before = _tree(tmp_path)
    for inner in (run / "sub", run / "deploy" / "sub"):
        with pytest.raises(ShrinkError, match="inside the run folder"):
            inspect_output_dir(str(inner), resume=False)
    assert _tree(tmp_path) == before


# --- several machines: every process must see the run's folder (README, "Several machines")

def _two_machines(tmp_path, out: str) -> list[subprocess.CompletedProcess]:
    """Two 'machines' of one process each (torchrun --nnodes 2 on this host), each in its own working
    folder: a relative ``out`` is then a different folder on each, as without a shared file system."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    procs = []
    for node in (0, 1):
        cwd = tmp_path / f"machine{node}"
        cwd.mkdir(exist_ok=True)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
             "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port),
             str(ROOT / "tests" / "rundir_main.py"), out],
            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return results


@pytest.mark.slow
def test_machines_without_a_shared_folder_are_refused(tmp_path):
    """Issue 20: rank 0 of each machine wrote its own output folder. (The accepting path runs in every
    multi-process test of the suite: train.run calls the check on every run of more than one process.)"""
    blind = _two_machines(tmp_path, "out/run")  # relative: machine0/out/run and machine1/out/run
    for r in blind:
        assert r.returncode != 0, r.stderr[-2000:]
        assert "is not shared by every process: rank 1 on" in r.stderr and "every machine mounts" in r.stderr
    assert _tree(tmp_path / "machine0" / "out") == ["run"]  # the probe is gone


def test_resume_on_a_machine_that_sees_no_run_says_why(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    with pytest.raises(ShrinkError, match="nothing to resume .* every machine mounts"):
        inspect_output_dir(str(tmp_path / "run"), resume=True)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "16")  # one machine: no such hint
    with pytest.raises(ShrinkError, match=r"no run was started there$"):
        inspect_output_dir(str(tmp_path / "run"), resume=True)


def test_one_process_checks_nothing(tmp_path):
    class One:
        num_processes = 1

    check_shared_output_dir(tmp_path / "missing", One())  # no collective, no file
    assert _tree(tmp_path) == []
