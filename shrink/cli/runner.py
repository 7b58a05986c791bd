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

from shrink.errors import ShrinkError, first_line
from shrink.training.run_folder import check_outside_run
from shrink.values import MAX_THREADS, THREADS_HELP, apply_threads, parse_device, parse_layers, parse_threads

# the value parsers live in shrink.values (the library uses them too); the CLI keeps their names here
__all__ = ["MAX_THREADS", "THREADS_HELP", "OneLineArgumentParser", "Terminated", "add_threads_argument",
           "apply_threads", "check_distinct", "check_input_file", "check_output_dir", "check_output_file",
           "cli_main", "exit_with", "is_verbose", "one_line", "parse_device", "parse_layers", "parse_threads",
           "say_error", "setup_output"]

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


def add_threads_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup, default: int | None = None) -> None:
    """The one ``--threads`` flag of every command that runs a model: same meaning, default None (torch's
    choice) unless a measurement script fixes it (``default``, then named in the help)."""
    help_text = THREADS_HELP if default is None else THREADS_HELP.split("; default")[0] + f"; default {default}"
    parser.add_argument("--threads", type=parse_threads, default=default, metavar="N", help=help_text)


def cli_main(
    body: Callable[[list[str] | None], int],
    argv: list[str] | None = None,
    *,
    prefix: str = "error: ",
    verbose: bool | None = None,
    setup: bool = True,
) -> int:
    """Run ``body(argv)`` as a CLI and return its exit code.

    ShrinkError and OSError (a path that cannot be read or written) become one line on stderr and
    exit code 2, MemoryError one line and 2, KeyboardInterrupt ``interrupted`` and 130. Anything
    else is a bug and keeps its traceback.

    Under a multi-process launch (``WORLD_SIZE`` > 1) every process's first error reaches the user
    as one line: an error every process meets alike is said once; one that only some processes meet
    names them (``error: rank 1: ...``); a process that stops because another one failed (a
    collective whose peer is gone, the launcher's SIGTERM) says so in one line instead of a
    traceback. See :func:`say_error`.

    ``setup=False`` leaves logging and warnings as the caller set them up (an application that embeds
    the command, a test under pytest); otherwise :func:`setup_output` quiets them for a terminal.
    """
    if setup:
        setup_output(verbose)
    world, rank = _world()
    if world > 1:
        _terminate_as_exception()
    try:
        return body(argv)
    except ShrinkError as e:
        message, code = one_line(e), 2
    except KeyboardInterrupt:
        if rank == 0:  # Ctrl-C reaches every process: one of them says it
            print("interrupted", file=sys.stderr)
        return 130
    except Terminated as e:
        message, code = str(e), 143
    except OSError as e:
        message, code = _os_error_line(e), 2
    except MemoryError:
        message, code = "out of memory (try a smaller --batch-size or model)", 2
    except Exception as e:
        if world == 1 or not _lost_a_peer(e):
            raise
        message, code = f"stopped because another process failed ({_peer_error(e)})", 2
    say_error(prefix, message)
    return code


class Terminated(BaseException):  # noqa: N818 - like KeyboardInterrupt, past every ``except Exception``
    """SIGTERM under a multi-process launch: the launcher stops the others when one process fails."""


def _world() -> tuple[int, int]:
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1") or 1)), int(os.environ.get("RANK", "0") or 0)
    except ValueError:
        return 1, 0


def _terminate_as_exception() -> None:
    """SIGTERM raises :class:`Terminated`, so the run's clean-up (a new run's folder) happens and the
    process says why it stopped."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, frame):
        raise Terminated("stopped by SIGTERM (the launcher stops every process when one fails, or the job "
                         "was cancelled)")

    try:
        signal.signal(signal.SIGTERM, handler)
    except (ValueError, OSError):
        pass


_PEER_LOST = ("connection closed by peer", "connection reset by peer", "broken pipe", "socket closed",
              "connection refused")


def _peer_error(e: BaseException) -> str:
    """gloo's message without its source location and advice: ``Connection closed by peer [127.0.0.1]:57047``."""
    import re

    text = re.sub(r"^\[[^\]]*\]\s*", "", one_line(first_line(e)))
    return text.split(". ")[0].rstrip(".")


def _lost_a_peer(e: BaseException) -> bool:
    """An error of a collective whose peer process is gone (gloo / NCCL / the c10d store)."""
    torch_dist = sys.modules.get("torch.distributed")
    dist_error = getattr(torch_dist, "DistError", None)
    if dist_error is not None and isinstance(e, dist_error):
        return True
    return isinstance(e, RuntimeError) and any(s in str(e).lower() for s in _PEER_LOST)


SAY_WAIT_S = 1.0  # how long a failing process waits for the others' errors before it speaks (a setting: tests shorten it)


def say_error(prefix: str, message: str, *, rank: int | None = None, world: int | None = None) -> None:
    """Print this process's error as one line on stderr; under a multi-process launch, once per job.

    The processes meet through the launcher's c10d store (torchrun's, at ``MASTER_ADDR:MASTER_PORT``):
    each records its message, waits up to a second for the others, and the first process holding a
    message prints it: bare when every process has it, else naming the ranks that have it. Without
    the store every failing process prints its own line, with its rank.
    """
    env_world, env_rank = _world()
    world, rank = world or env_world, env_rank if rank is None else rank
    if world == 1:
        print(f"{prefix}{message}", file=sys.stderr)
        return
    import signal

    try:  # the launcher's SIGTERM must not cut the line short (it kills for good after a grace period)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except (ValueError, OSError):
        pass
    try:
        ranks = _shared_error(message, world, rank)
    except Exception:  # noqa: BLE001 - no store (not torchrun, or its agent gone): speak for this rank alone
        ranks = [rank]
    if ranks is None:  # another process already said it
        return
    who = "" if len(ranks) == world else f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}: "
    print(f"{prefix}{who}{message}", file=sys.stderr)
    sys.stderr.flush()


def _shared_error(message: str, world: int, rank: int) -> list[int] | None:
    import hashlib
    import time
    from datetime import timedelta

    from torch.distributed import TCPStore

    store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                     timeout=timedelta(seconds=3))
    key = f"shrink_error/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
    store.set(f"{key}rank{rank}", message)
    store.add(f"{key}count", 1)
    deadline = time.monotonic() + SAY_WAIT_S
    while store.add(f"{key}count", 0) < world and time.monotonic() < deadline:
        time.sleep(0.05)
    ranks = [r for r in range(world) if store.check([f"{key}rank{r}"])
             and store.get(f"{key}rank{r}").decode("utf-8", "replace") == message]
    digest = hashlib.sha1(message.encode("utf-8", "replace")).hexdigest()
    if store.add(f"{key}said/{digest}", 1) != 1:
        return None
    return ranks


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
