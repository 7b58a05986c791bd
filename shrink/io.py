"""Atomic file and directory writes: a reader sees the old version or the new one, never half of one."""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shrink.errors import ShrinkError


def jsonable(obj: Any, *, strict: bool = False, where: str = "value") -> Any:
    """``obj`` as plain JSON data: tuples become lists, keys strings.

    ``strict=False`` (reports, logs): non-finite floats become the strings 'nan', 'inf', '-inf', and
    anything else JSON cannot hold its ``str``. ``strict=True`` (a file read back as data, such as a
    saved model's config.json): those are refused with a :class:`ShrinkError` naming ``where``.
    """
    if isinstance(obj, dict):
        return {str(k): jsonable(v, strict=strict, where=f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v, strict=strict, where=f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, float) and not math.isfinite(obj):
        if strict:
            raise ShrinkError(f"{where}={obj!r} cannot be stored as JSON (not a finite number)")
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    if obj is None or isinstance(obj, (str, bool, int, float)):
        return obj
    if strict:
        raise ShrinkError(f"{where}={obj!r} cannot be stored as JSON")
    return str(obj)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        write(tmp_path)
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_append_line(path: str | os.PathLike, line: str) -> Path:
    """Append one line by rewriting the file atomically (small logs such as metrics.jsonl)."""
    path = Path(path)
    old = path.read_text() if path.exists() else ""
    return atomic_write_text(path, old + line.rstrip("\n") + "\n")


def atomic_dir(path: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Build a directory with ``fill(tmp_dir)`` and swap it in place of ``path`` in one rename.

    An existing ``path`` is moved aside first and removed only after the new one is in place, so a
    crash leaves either the old directory, the new one, or the old one under ``.<name>.old``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        fill(tmp)
        replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def replace_dir(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Move the finished directory ``src`` to ``dst``, replacing it (see :func:`atomic_dir`)."""
    src, dst = Path(src), Path(dst)
    for f in src.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    old = dst.parent / f".{dst.name}.old"
    if dst.exists():
        if old.exists():  # a leftover from an earlier crash; dst is the good copy
            shutil.rmtree(old)
        os.replace(dst, old)
    os.replace(src, dst)
    _fsync_dir(dst.parent)
    if old.exists():
        shutil.rmtree(old)
    return dst


def recover_dir(path: str | os.PathLike) -> Path | None:
    """``path`` if it exists, else the ``.<name>.old`` a crash during :func:`replace_dir` left, else None."""
    path = Path(path)
    if path.is_dir():
        return path
    old = path.parent / f".{path.name}.old"
    return old if old.is_dir() else None


def clean_leftovers(folder: str | os.PathLike) -> list[str]:
    """Finish or undo what a killed :func:`atomic_write` / :func:`atomic_dir` left in ``folder``.

    ``.<name>.<random>.tmp`` files and directories (a write that never finished) are removed; a
    ``.<name>.old`` directory is moved back to ``<name>`` when ``<name>`` is missing (the kill came
    between the two renames of :func:`replace_dir`), and removed otherwise. Returns what was done.
    """
    folder = Path(folder)
    done: list[str] = []
    if not folder.is_dir():
        return done
    for p in sorted(folder.iterdir()):
        name = p.name
        if name.startswith(".") and name.endswith(".tmp"):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            done.append(f"removed {name}")
        elif name.startswith(".") and name.endswith(".old") and p.is_dir():
            target = folder / name[1:-len(".old")]
            if target.exists():
                shutil.rmtree(p)
                done.append(f"removed {name}")
            else:
                os.replace(p, target)
                done.append(f"restored {target.name} from {name}")
    if done:
        _fsync_dir(folder)
    return done
