"""shrink.io: atomic writes of files and folders."""
from __future__ import annotations

import json

import pytest

from shrink.io import atomic_dir


def test_atomic_dir_keeps_old_on_failure(tmp_path):
    target = tmp_path / "d"
    atomic_dir(target, lambda p: (p / "a.txt").write_text("old"))

    def broken(p):
        (p / "a.txt").write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic_dir(target, broken)
    assert (target / "a.txt").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["d"]  # no temp dirs left behind


def test_atomic_write_text_json_and_append(tmp_path):
    from shrink.io import atomic_append_line, atomic_write_json, atomic_write_text

    atomic_write_text(tmp_path / "a" / "t.txt", "hello")
    assert (tmp_path / "a" / "t.txt").read_text() == "hello"
    atomic_write_json(tmp_path / "j.json", {"k": [1, 2]})
    assert json.loads((tmp_path / "j.json").read_text()) == {"k": [1, 2]}
    atomic_append_line(tmp_path / "m.jsonl", "one")
    atomic_append_line(tmp_path / "m.jsonl", "two\n")
    assert (tmp_path / "m.jsonl").read_text() == "one\ntwo\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "j.json", "m.jsonl"]  # no temporary files


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    from shrink.io import atomic_write

    (tmp_path / "f.txt").write_text("old")

    def fail(p):
        p.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "f.txt", fail)
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"] and (tmp_path / "f.txt").read_text() == "old"


def test_clean_leftovers_removes_temporaries_and_restores_old(tmp_path):
    from shrink.io import clean_leftovers, recover_dir

    (tmp_path / ".state.abc.tmp").mkdir()
    (tmp_path / ".x.json.123.tmp").write_text("partial")
    (tmp_path / ".state.old").mkdir()
    assert recover_dir(tmp_path / "state") == tmp_path / ".state.old"
    clean_leftovers(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["state"]
    assert recover_dir(tmp_path / "state") == tmp_path / "state"


def test_jsonable_strict_refuses_what_config_json_cannot_hold():
    import math

    import pytest

    from shrink.errors import ShrinkError
    from shrink.io import jsonable

    assert jsonable({"a": (1, 2), 3: [math.inf]}) == {"a": [1, 2], "3": ["inf"]}
    assert jsonable({"a": (1, 2)}, strict=True) == {"a": [1, 2]}
    assert jsonable(object) == str(object)
    with pytest.raises(ShrinkError, match=r"model argument act\[1\]=.* cannot be stored as JSON"):
        jsonable([1, object], strict=True, where="model argument act")
    with pytest.raises(ShrinkError, match="not a finite number"):
        jsonable({"drop_rate": math.nan}, strict=True, where="model argument")
