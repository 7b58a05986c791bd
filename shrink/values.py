"""Values a user types, parsed and checked: block-index lists, thread counts, devices.

The one home of these parsers: the library (the run's settings, the benchmark spec) and the command
line (:mod:`shrink.cli`, which re-exports them) use the same rules and the same messages.
"""
from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from shrink.errors import ShrinkError

if TYPE_CHECKING:
    import torch

__all__ = ["MAX_THREADS", "THREADS_HELP", "apply_threads", "parse_device", "parse_layers", "parse_threads"]


def parse_layers(text: str, what: str = "layers") -> list[int]:
    """``"0,2,4"`` (or ``"[0, 2, 4]"``) -> ``[0, 2, 4]``; the one parser of block-index lists."""
    try:
        return [int(t) for t in str(text).replace(" ", "").strip("[]").split(",") if t != ""]
    except ValueError:
        raise ShrinkError(f"{what}: expected comma-separated integers, got {text!r}") from None


MAX_THREADS = 4096
THREADS_HELP = ("torch CPU threads of each process (intra-op: torch.set_num_threads); default: torch's own "
                "choice (the machine's cores, or OMP_NUM_THREADS when set)")


def parse_threads(text: str | int) -> int:
    """``--threads``: an integer from 1 to MAX_THREADS (argparse type and YAML check alike).

    Raises ``argparse.ArgumentTypeError`` (a ``--threads`` flag's type reports its message as is).
    """
    try:
        n = int(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected an integer from 1 to {MAX_THREADS}, got {text!r}") from None
    if isinstance(text, bool) or not 1 <= n <= MAX_THREADS or str(n) != str(text).strip():
        raise argparse.ArgumentTypeError(f"expected an integer from 1 to {MAX_THREADS}, got {text!r}")
    return n


def apply_threads(threads: int | None) -> None:
    """Set torch's CPU threads for this process (``None``: leave torch's choice)."""
    if threads is None:
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= MAX_THREADS:
        raise ShrinkError(f"--threads must be an integer from 1 to {MAX_THREADS}, got {threads!r}")
    import torch

    torch.set_num_threads(threads)


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
