"""The one runner behind every command-line entry point.

A user-caused failure (a :class:`~shrink.errors.ShrinkError`, a bad flag, an output path that cannot
be written) is one line on stderr and exit code 2; Ctrl-C is one line and exit code 130. Warnings and
INFO lines of the libraries stay off stderr unless ``SHRINK_VERBOSE=1`` (or ``verbose=True``).
Output locations are checked with :func:`check_output_file` / :func:`check_output_dir` before any
heavy work, so a bad ``--json`` or ``--output-dir`` is refused in the first second, not after the run.
"""
from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ShrinkError
from .rundir import check_outside_run

if TYPE_CHECKING:
    import torch

_NOISY_LOGGERS = ("timm", "huggingface_hub", "accelerate", "torch", "PIL", "matplotlib", "fvcore", "urllib3",
                  "filelock", "iopath")


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line on stderr (exit 2), without the usage block.

    Abbreviated flags are off: ``--remove 0.4`` is an error, not a guess between two flags.
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {one_line(message)}\n")


def one_line(text: object) -> str:
    """``text`` on one line (newlines and runs of spaces collapsed)."""
    return " ".join(str(text).split())


def is_verbose() -> bool:
    """True when ``SHRINK_VERBOSE`` is set to 1/true/yes."""
    return os.environ.get("SHRINK_VERBOSE", "").strip().lower() in ("1", "true", "yes", "on")


def setup_output(verbose: bool | None = None) -> None:
    """Logging and warnings for a CLI: the toolkit's warnings only, unless verbose (then INFO and all warnings)."""
    verbose = is_verbose() if verbose is None else verbose
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(logging.INFO if verbose else logging.WARNING)
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.INFO if verbose else logging.ERROR)
    if not verbose:
        warnings.filterwarnings("ignore")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _os_error_line(e: OSError) -> str:
    what = e.strerror or (errno.errorcode.get(e.errno, "") if e.errno else "") or str(e) or type(e).__name__
    names = [str(n) for n in (e.filename, e.filename2) if n is not None]
    return f"{' -> '.join(names)}: {what}" if names else one_line(what)


def parse_layers(text: str, what: str = "layers") -> list[int]:
    """``"0,2,4"`` (or ``"[0, 2, 4]"``) -> ``[0, 2, 4]``; the one parser of block-index lists."""
    try:
        return [int(t) for t in str(text).replace(" ", "").strip("[]").split(",") if t != ""]
    except ValueError:
        raise ShrinkError(f"{what}: expected comma-separated integers, got {text!r}") from None


def parse_device(name: str, flag: str = "--device") -> torch.device:
    """``cpu`` or ``cuda[:N]``, refused in one line when unknown or when CUDA is not there."""
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise ShrinkError(f"unknown {flag} {name!r}; use cpu or cuda") from None
    if device.type not in ("cpu", "cuda"):
        raise ShrinkError(f"{flag} {name!r} is not supported; use cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ShrinkError(f"{flag} cuda asked for, but CUDA is not available on this machine; use {flag} cpu")
    return device


def cli_main(
    body: Callable[[list[str] | None], int],
    argv: list[str] | None = None,
    *,
    prefix: str = "error: ",
    verbose: bool | None = None,
) -> int:
    """Run ``body(argv)`` as a CLI and return its exit code.

    ShrinkError and OSError (a path that cannot be read or written) become one line on stderr and
    exit code 2, MemoryError one line and 2, KeyboardInterrupt ``interrupted`` and 130. Anything
    else is a bug and keeps its traceback.
    """
    setup_output(verbose)
    # under a multi-process launch every process meets the same user error: one of them says it
    say = os.environ.get("RANK", "0") == "0"
    try:
        return body(argv)
    except ShrinkError as e:
        message, code = f"{prefix}{one_line(e)}", 2
    except KeyboardInterrupt:
        message, code = "interrupted", 130
    except OSError as e:
        message, code = f"{prefix}{_os_error_line(e)}", 2
    except MemoryError:
        message, code = f"{prefix}out of memory (try a smaller --batch-size or model)", 2
    if say:
        print(message, file=sys.stderr)
    return code


# ----------------------------------------------------------------------------------------------
# Output locations, checked before any work
# ----------------------------------------------------------------------------------------------

def _writable_parent(path: Path, flag: str) -> None:
    """The nearest existing ancestor of ``path`` must be a writable directory (mkdir can then succeed)."""
    parent = path.parent
    while not parent.exists():
        if parent.is_symlink():  # a dangling link: mkdir would fail
            raise ShrinkError(f"{flag} {path}: {parent} is a broken link")
        parent = parent.parent
    if not parent.is_dir():
        raise ShrinkError(f"{flag} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ShrinkError(f"{flag} {path}: {parent} is not writable")


def _nonempty(path: str | os.PathLike | None, flag: str) -> Path:
    if path is None or not str(path).strip():
        raise ShrinkError(f"{flag} must name a path, got {str(path)!r}")
    if "\x00" in str(path):
        raise ShrinkError(f"{flag} holds a NUL character")
    return Path(path)


def check_output_file(path: str | os.PathLike | None, flag: str, *, suffixes: Iterable[str] = ()) -> Path:
    """Refuse an output file that cannot be written: empty, a folder, under a file, or in a read-only folder.

    ``suffixes`` (e.g. ``(".json",)``) guards against ``--json README.md``: an existing file is only
    replaced when it has the expected suffix.
    """
    p = _nonempty(path, flag)
    suffixes = tuple(s.lower() for s in suffixes)
    if suffixes and p.suffix.lower() not in suffixes:
        raise ShrinkError(f"{flag} must name a {' or '.join(suffixes)} file, got {p}")
    if p.is_dir():
        raise ShrinkError(f"{flag} {p} is a folder; give a file name")
    if p.exists() and not p.is_file():
        raise ShrinkError(f"{flag} {p} exists and is not a regular file")
    if p.exists() and not os.access(p.parent, os.W_OK | os.X_OK):
        raise ShrinkError(f"{flag} {p}: {p.parent} is not writable")
    _writable_parent(p, flag)
    check_outside_run(p, flag)  # a run's folder holds only what the run writes (and its deploy/)
    return p


def check_output_dir(
    path: str | os.PathLike | None, flag: str, *, owned: Iterable[str] = (), must_not_exist: bool = False
) -> Path:
    """Refuse an output folder that is not this tool's to write.

    Accepted: a folder that does not exist yet (its nearest existing parent writable), an empty
    folder, or one that holds only ``owned`` names (the tool's own earlier output, which it replaces).
    """
    p = _nonempty(path, flag)
    check_outside_run(p, flag)  # a run's folder holds only what the run writes (and its deploy/)
    if p.exists() or p.is_symlink():
        if must_not_exist:
            raise ShrinkError(f"{flag} {p} already exists; choose a new path")
        if not p.is_dir():
            raise ShrinkError(f"{flag} {p} is a file, not a folder")
        owned = set(owned)
        foreign = sorted(f.name for f in p.iterdir() if f.name not in owned and not f.name.startswith("."))
        if foreign:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise ShrinkError(f"{flag} {p} holds files this tool did not write ({shown}); "
                              f"choose a new or empty folder")
        if not os.access(p, os.W_OK | os.X_OK):
            raise ShrinkError(f"{flag} {p} is not writable")
        return p
    _writable_parent(p, flag)
    return p


def check_distinct(paths: dict[str, str | os.PathLike | None]) -> None:
    """Refuse two output flags that name the same file."""
    seen: dict[Path, str] = {}
    for flag, path in paths.items():
        if path is None:
            continue
        key = Path(os.path.abspath(path))
        if key in seen:
            raise ShrinkError(f"{seen[key]} and {flag} name the same file {path}")
        seen[key] = flag


def check_input_file(path: str | os.PathLike | None, flag: str) -> Path:
    """An input file that exists and is a regular file (not a folder, not a device)."""
    p = _nonempty(path, flag)
    if not p.exists():
        raise ShrinkError(f"{flag}: file not found: {p}")
    if not p.is_file():
        raise ShrinkError(f"{flag} {p} is not a regular file")
    if not os.access(p, os.R_OK):
        raise ShrinkError(f"{flag} {p} is not readable")
    return p


def exit_with(code: int) -> None:  # pragma: no cover - tiny helper for ``if __name__ == "__main__"``
    """``sys.exit(code)`` after flushing stdout (a closed pipe is not an error)."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        pass
    sys.exit(code)
