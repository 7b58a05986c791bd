"""shrink.rundir: who may write into an output folder, and leaving it as found."""
from __future__ import annotations

import pytest

from shrink.errors import ShrinkError
from shrink.rundir import check_resume_settings, create_run_dir, inspect_output_dir, remove_run_dir


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
