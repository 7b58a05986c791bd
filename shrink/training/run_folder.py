"""The output folder of a run: written only by the run that owns it, left as found when a run fails.

A folder belongs to a run when it holds that run's ``config.yaml`` (written first, atomically) and
nothing but the files a run writes. A new run needs a new or empty folder; ``--resume`` needs a
folder that holds a run and settings that do not contradict it. Every check here is cheap and runs
before any model is built.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from shrink.errors import ShrinkError, first_line
from shrink.io import _umask, atomic_write_text

_logger = logging.getLogger(__name__)

CONFIG = "config.yaml"
# deploy/: what other tools write for this run (``python -m shrink.deploy --checkpoint RUN/best`` by default,
# or any output path under it); a run never reads or changes it, so it may hold anything.
DEPLOY = "deploy"
RUN_ENTRIES = frozenset({CONFIG, "metrics.jsonl", "metrics.png", "summary.json", "best", "last", "state", "logs",
                         DEPLOY})
# Settings a resumed run may change; everything else must equal the saved run's.
RESUMABLE_CHANGES = frozenset({"epochs", "eval_every", "progress", "num_workers", "log_with", "compile", "data_path",
                               "resume", "output_dir", "eval", "checkpoint", "tome_r", "tome_start_idx",
                               "tome_policy", "threads"})


def _is_run_entry(name: str) -> bool:
    return name in RUN_ENTRIES or (name.startswith(".") and name.endswith((".tmp", ".old")))


def is_run_dir(path: str | os.PathLike) -> bool:
    """True when ``path`` is a run's output folder: nothing a run does not write, and a ``config.yaml``
    that holds a run's settings (not some other project's config file)."""
    p = Path(path)
    if not (p / CONFIG).is_file():
        return False
    try:
        if not all(_is_run_entry(n) for n in os.listdir(p)):
            return False
        saved = yaml.safe_load((p / CONFIG).read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(saved, dict) and {"output_dir", "epochs"} <= saved.keys()


def enclosing_run_dir(path: str | os.PathLike) -> Path | None:
    """The run folder that ``path`` (a file or folder, existing or not) would be written into, if any."""
    p = Path(os.path.abspath(path))
    for parent in p.parents:
        if is_run_dir(parent):
            return parent
    return None


def check_outside_run(path: str | os.PathLike, flag: str) -> None:
    """Refuse an output path inside a run's folder, but for its ``deploy/`` subfolder.

    Anything else there would make ``--resume`` refuse the folder (files no run wrote), or be lost when
    the run replaces ``best/``, ``last/`` or ``state/``."""
    run = enclosing_run_dir(path)
    if run is None:
        return
    rel = Path(os.path.abspath(path)).relative_to(run)
    if rel.parts[0] != DEPLOY:
        raise ShrinkError(f"{flag} {path} is inside the run folder {run}, which holds only what the run writes "
                          f"(--resume would refuse it); write it under {run / DEPLOY} or elsewhere")


@dataclass
class RunDir:
    """What the output folder held when the run started, and what this run created."""

    path: Path
    existed: bool
    started: bool                       # holds a run's config.yaml
    saved_config: dict[str, Any] | None = None
    created: list[Path] = field(default_factory=list)  # folders this run made (deepest last)


def _check_writable(path: Path) -> None:
    """``path``, or its nearest existing parent folder, must be a folder this process may write in.

    ``os.access`` asks the kernel (permissions, read-only mounts) without touching the folder."""
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ShrinkError(f"--output-dir {path}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ShrinkError(f"--output-dir {path}: {probe} is not writable")


def inspect_output_dir(output_dir: str, resume: bool) -> RunDir:
    """Check that this run may write into ``output_dir``; read the saved settings when resuming."""
    if output_dir is None or not str(output_dir).strip():
        raise ShrinkError("--output-dir is empty; name a new or empty folder")
    out = Path(output_dir)
    outer = enclosing_run_dir(out)
    if outer is not None:
        raise ShrinkError(f"--output-dir {out} is inside the run folder {outer}; choose a folder outside it")
    if out.exists() and not out.is_dir():
        raise ShrinkError(f"--output-dir {out} is a file, not a folder")
    started, entries = False, []
    if out.is_dir():
        try:
            entries = sorted(p.name for p in out.iterdir())
        except OSError as e:
            raise ShrinkError(f"--output-dir {out}: cannot list it ({e.strerror or e})") from None
        foreign = [n for n in entries if not _is_run_entry(n)]
        if foreign:
            shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            if resume and (out / CONFIG).is_file():  # e.g. an export an older version put beside best/
                raise ShrinkError(f"--output-dir {out} holds files no shrink run wrote ({shown}); move them out "
                                  f"(or into {out / DEPLOY}, the folder a run keeps for other tools) to resume")
            raise ShrinkError(f"--output-dir {out} holds files no shrink run wrote ({shown}); "
                              f"choose a new or empty folder")
        started = (out / CONFIG).is_file()
        if entries and not started and not all(n.startswith(".") for n in entries):
            raise ShrinkError(f"--output-dir {out} holds run files but no {CONFIG}; choose a new or empty folder")
    if resume and not started:
        hint = f" as this machine sees it ({SHARED_FS_HINT})" if _other_nodes() else ""
        raise ShrinkError(f"nothing to resume in {out}: no run was started there{hint}")
    if not resume and started:
        raise ShrinkError(f"{out} already holds a run; pass --resume to continue it or choose another --output-dir")
    _check_writable(out)
    saved = None
    if started:
        try:
            saved = yaml.safe_load((out / CONFIG).read_text())
        except (OSError, yaml.YAMLError) as e:
            raise ShrinkError(f"cannot read {out / CONFIG}: {first_line(e)}") from None
        if not isinstance(saved, dict):
            raise ShrinkError(f"{out / CONFIG} is not a mapping of settings")
    return RunDir(path=out, existed=out.is_dir(), started=started, saved_config=saved)


def _other_nodes() -> bool:
    """True under a launch over several machines (torchrun / accelerate set both variables)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > int(os.environ.get("LOCAL_WORLD_SIZE",
                                                                            os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return False


SHARED_FS_HINT = ("a run over several machines needs an --output-dir on a file system that every machine mounts "
                  "at the same path (NFS, Lustre, ...)")


def check_shared_output_dir(out: Path, accelerator) -> None:
    """Every process must see the run's folder that the main process writes: refuse the run otherwise.

    Only the main process (rank 0) writes ``config.yaml``, the metrics, ``best/``, ``last/`` and swaps
    ``state/`` in; every process writes its part of the state (its RNG file) and reads the state back
    on ``--resume``. On machines that do not share the folder the other machines' parts would be lost
    and a resume would find nothing there, so a multi-process run checks first: the main process writes
    a probe file with a random token into ``out`` and every process must read it back. A collective:
    every process calls it, after the main process created ``out``. Raises the same one-line
    :class:`ShrinkError` on every process, naming the processes (and machines) that cannot see it."""
    if accelerator.num_processes <= 1:
        return
    import secrets
    import socket

    from accelerate.utils import broadcast_object_list, gather_object

    main = accelerator.is_main_process
    token = [secrets.token_hex(8) if main else None]
    broadcast_object_list(token, from_process=0)
    probe = out / f".shared-check.{token[0]}.tmp"  # a leftover of a kill is cleaned like any .tmp
    if main:
        atomic_write_text(probe, token[0])
    accelerator.wait_for_everyone()
    try:
        seen = probe.read_text() == token[0]
    except OSError:
        seen = False
    views = gather_object([(accelerator.process_index, socket.gethostname(), seen)])
    accelerator.wait_for_everyone()
    if main:
        probe.unlink(missing_ok=True)
    blind = sorted((rank, host) for rank, host, ok in views if not ok)
    if blind:
        shown = ", ".join(f"rank {r} on {h}" for r, h in blind[:4]) + (", ..." if len(blind) > 4 else "")
        raise ShrinkError(f"--output-dir {out} is not shared by every process: {shown} cannot see what rank 0 "
                          f"wrote there; {SHARED_FS_HINT}")


def check_resume_settings(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The settings that differ from the saved run; raise if one of them may not change on resume."""
    changed = [k for k in current if k in saved and saved[k] != current[k]]
    refused = [k for k in changed if k not in RESUMABLE_CHANGES]
    if refused:
        k = refused[0]
        more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
        raise ShrinkError(f"--resume: --{k.replace('_', '-')} is {current[k]!r} but the run in this folder used "
                          f"{saved[k]!r}{more}; start a new run in another --output-dir instead")
    return [k for k in changed if k not in ("resume", "output_dir")]


def create_run_dir(rd: RunDir, config_text: str) -> None:
    """Make the folder hold this run: config.yaml appears together with the folder (or in the empty one)."""
    out = rd.path
    if rd.existed:  # empty but for what killed writes of an unstarted run left: nobody owns that
        for p in out.iterdir():
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        atomic_write_text(out / CONFIG, config_text)
        return
    for stale in out.parent.glob(f".{out.name}.*.tmp") if out.parent.is_dir() else []:
        if stale.is_dir() and {p.name for p in stale.iterdir()} <= {CONFIG}:  # a creation killed half-way
            shutil.rmtree(stale, ignore_errors=True)
    parent = out.parent
    missing = []
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    for p in reversed(missing):
        p.mkdir()
        rd.created.append(p)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        (tmp / CONFIG).write_text(config_text)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    rd.created.append(out)


def remove_run_dir(rd: RunDir) -> None:
    """Undo :func:`create_run_dir` and everything written since: the folder is left as it was found."""
    out = rd.path
    if rd.existed:  # it was empty: remove what the run put in it
        for p in out.iterdir():
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    else:
        for p in reversed(rd.created):
            shutil.rmtree(p, ignore_errors=True) if p == out else _rmdir_quiet(p)
    _logger.info("removed what the failed run wrote in %s", out)


def _rmdir_quiet(p: Path) -> None:
    try:
        p.rmdir()
    except OSError:
        pass
