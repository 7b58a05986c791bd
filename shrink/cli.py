"""What every command-line entry point shares: one-line errors and exit code 2 for user errors."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from .errors import ShrinkError


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line on stderr (exit 2), without the usage block."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def cli_main(body: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run ``body(argv)``; a ShrinkError becomes one line on stderr and exit code 2."""
    try:
        return body(argv)
    except ShrinkError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
