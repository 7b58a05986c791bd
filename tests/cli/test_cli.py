"""shrink.cli.runner: block-index and device parsing, one-line messages, cli_main's exit codes."""
from __future__ import annotations

import pytest
import torch

from shrink.cli.runner import cli_main, one_line, parse_device, parse_layers
from shrink.errors import ShrinkError


@pytest.mark.parametrize("text, layers", [("0,2,4", [0, 2, 4]), ("[0, 2, 4]", [0, 2, 4]), ("", []), ("3,", [3])])
def test_parse_layers(text, layers):
    assert parse_layers(text) == layers


def test_parse_layers_refuses_non_integers():
    with pytest.raises(ShrinkError, match="--remove-layers: expected comma-separated integers"):
        parse_layers("0,x", "--remove-layers")


def test_parse_device():
    assert parse_device("cpu") == torch.device("cpu")
    with pytest.raises(ShrinkError, match="--device"):
        parse_device("tpu")
    with pytest.raises(ShrinkError, match="unknown --dev"):
        parse_device("cuda:x", "--dev")


def test_one_line_collapses_newlines_and_spaces():
    assert one_line("a\n  b\tc ") == "a b c"


@pytest.mark.parametrize("exc, code, message", [
    (ShrinkError("bad\ninput"), 2, "error: bad input"),
    (FileNotFoundError(2, "No such file or directory", "x.pth"), 2, "error: x.pth: No such file or directory"),
    (KeyboardInterrupt(), 130, "interrupted"),
])
def test_cli_main_turns_user_errors_into_one_line(capsys, exc, code, message):
    def body(argv):
        raise exc

    assert cli_main(body, [], verbose=False) == code
    assert capsys.readouterr().err == message + "\n"


def test_cli_main_returns_the_body_code_and_keeps_bugs():
    assert cli_main(lambda argv: 0, [], verbose=False) == 0
    with pytest.raises(ZeroDivisionError):
        cli_main(lambda argv: 1 // 0, [], verbose=False)


# ------------------------------------------------------------------------------------------------
# Multi-process errors (issue 20 item 8): every rank's first error is one line, said once per job

def _launch_env(monkeypatch, rank: int, world: int, port: int | None) -> None:
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", str(rank))
    if port is None:
        monkeypatch.delenv("MASTER_PORT", raising=False)
    else:
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", str(port))


@pytest.fixture
def job_store(monkeypatch):
    """A c10d store as torchrun's agent holds one (here in this process), with a quick wait."""
    from datetime import timedelta

    from torch.distributed import TCPStore

    import shrink.cli.runner

    monkeypatch.setattr(shrink.cli.runner, "SAY_WAIT_S", 0.2)  # a documented setting
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    store = TCPStore("127.0.0.1", 0, is_master=True, timeout=timedelta(seconds=5), wait_for_workers=False)
    yield store.port  # the store lives as long as the test


def test_an_error_every_rank_meets_is_said_once_without_a_rank(capsys, monkeypatch, job_store):
    import threading

    from shrink.cli.runner import say_error

    _launch_env(monkeypatch, 0, 2, job_store)
    ranks = [threading.Thread(target=say_error, args=("error: ", "cannot resume: saved by 1 process(es)"),
                              kwargs={"rank": r, "world": 2}) for r in (0, 1)]  # both at once, as in a launch
    for t in ranks:
        t.start()
    for t in ranks:
        t.join()
    assert capsys.readouterr().err.splitlines() == ["error: cannot resume: saved by 1 process(es)"]


def test_an_error_of_one_rank_names_it_and_the_others_say_why_they_stopped(capsys, monkeypatch, job_store):
    _launch_env(monkeypatch, 1, 2, job_store)

    def fails_on_rank_1(argv):
        raise OSError(5, "Input/output error", "/data/train/dog/7.png")

    assert cli_main(fails_on_rank_1) == 2
    _launch_env(monkeypatch, 0, 2, job_store)

    def loses_its_peer(argv):
        raise RuntimeError("[/gloo/transport/tcp/pair.cc:561] Connection closed by peer [127.0.0.1]:57047. "
                           "This is typically caused by a remote worker crashing.")

    assert cli_main(loses_its_peer) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: rank 1: /data/train/dog/7.png: Input/output error",
        "error: rank 0: stopped because another process failed (Connection closed by peer [127.0.0.1]:57047)"]


def test_without_the_launchers_store_each_rank_speaks_for_itself(capsys, monkeypatch):
    from shrink.cli.runner import say_error

    _launch_env(monkeypatch, 1, 2, None)
    say_error("error: ", "boom")
    assert capsys.readouterr().err == "error: rank 1: boom\n"


def test_a_bug_keeps_its_traceback_under_a_launch_too(monkeypatch):
    _launch_env(monkeypatch, 1, 2, None)

    def bug(argv):
        raise RuntimeError("index out of range")

    with pytest.raises(RuntimeError, match="index out of range"):
        cli_main(bug)


# ------------------------------------------------------------------------------------------------
# --threads (issue 20 item 14): one flag, one meaning, one default, in every command that runs a model

def test_threads_helpers():
    import argparse

    from shrink.cli.runner import THREADS_HELP, add_threads_argument, apply_threads, parse_threads

    p = argparse.ArgumentParser()
    add_threads_argument(p)
    assert p.parse_args([]).threads is None and p.parse_args(["--threads", "3"]).threads == 3
    assert p._option_string_actions["--threads"].help == THREADS_HELP
    for bad in ("0", "-1", "1.5", "x", "99999"):
        with pytest.raises(argparse.ArgumentTypeError, match="from 1 to 4096"):
            parse_threads(bad)
    before = torch.get_num_threads()
    try:
        apply_threads(1)
        assert torch.get_num_threads() == 1
        apply_threads(None)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ShrinkError, match="--threads"):
        apply_threads(0)


def _script_main(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_script_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize("entry, argv", [
    ("main_lambda", []), ("shrink.select", []), ("shrink.convert", ["m", "c", "o"]), ("shrink.deploy", []),
    ("benchmark", []), ("tome_visualize", ["--out", "x.png"]), ("tome_vs_official", ["speed"]),
    ("make_dense_digits", []), ("selection_experiment", []),
])
def test_every_command_that_runs_a_model_takes_threads(capsys, entry, argv):
    """--threads 0 is refused by each in one line naming the flag, before any work; --threads 2 parses."""
    import importlib

    if entry in ("tome_visualize", "tome_vs_official", "make_dense_digits", "selection_experiment"):
        main = _script_main(entry)
    else:
        main = importlib.import_module("shrink.deploy.__main__" if entry == "shrink.deploy" else entry).main
    try:
        code = main([*argv, "--threads", "0"])
    except SystemExit as e:  # argparse's refusal
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--threads" in err[0] and "from 1 to 4096" in err[0], err


def test_the_launchers_sigterm_is_one_line_and_the_runs_clean_up_happens(tmp_path):
    """Under a launch, SIGTERM (torchrun stopping the others when one process failed) raises past every
    ``except Exception`` into the run's clean-up, then cli_main says it in one line (exit 143)."""
    import subprocess
    import sys

    from ..conftest import ROOT, subprocess_env

    code = (
        "import os, signal, time\n"
        "from shrink.cli.runner import cli_main\n"
        "def body(argv):\n"
        "    try:\n"
        "        try:\n"
        "            os.kill(os.getpid(), signal.SIGTERM)\n"
        "            time.sleep(30)\n"
        "        except Exception:\n"
        "            print('swallowed')\n"
        "    finally:\n"
        f"        open({str(tmp_path / 'cleaned')!r}, 'w').close()\n"
        "raise SystemExit(cli_main(body))\n")
    env = dict(subprocess_env(), WORLD_SIZE="2", RANK="1")
    env.pop("MASTER_PORT", None)
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 143 and "swallowed" not in res.stdout
    assert res.stderr.splitlines() == ["error: rank 1: stopped by SIGTERM (the launcher stops every process when one "
                                       "fails, or the job was cancelled)"], res.stderr
    assert (tmp_path / "cleaned").exists()


def test_no_entry_point_goes_without_threads():
    """Every command (a script or module that runs through cli_main) declares shrink.cli.runner's --threads, so a
    new script cannot drift back to its own flag or none."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    entries = [*root.glob("scripts/*.py"), *root.glob("*.py"), root / "shrink" / "select.py",
               root / "shrink" / "convert.py", root / "shrink" / "deploy" / "__main__.py"]
    missing = [str(p.relative_to(root)) for p in entries
               if "cli_main(" in p.read_text() and "add_threads_argument(" not in p.read_text()
               and p.name != "main_lambda.py"]  # main_lambda: RunConfig.threads, the same help and check
    assert not missing, missing


def test_the_value_parsers_live_below_the_cli_and_answer_there_too():
    """shrink.values is their one home (the library imports it); shrink.cli keeps the public names."""
    import shrink.cli
    import shrink.cli.runner
    import shrink.values

    for name in ("parse_layers", "parse_device", "parse_threads", "apply_threads", "MAX_THREADS", "THREADS_HELP"):
        assert getattr(shrink.cli, name) is getattr(shrink.values, name) is getattr(shrink.cli.runner, name)
