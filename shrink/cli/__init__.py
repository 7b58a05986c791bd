"""The command line: the one runner behind every entry point, the shared flags and parsers, the run's flags.

The top layer: library packages do not import it. The value parsers (parse_layers, parse_device,
parse_threads, MAX_THREADS, THREADS_HELP, apply_threads) live in :mod:`shrink.values` and answer here too.
"""
from __future__ import annotations

import importlib

# Public names, imported on first use (the upper layers import each other's submodules directly).
_EXPORTS = {
    "OneLineArgumentParser": "runner",
    "one_line": "runner",
    "is_verbose": "runner",
    "setup_output": "runner",
    "parse_layers": "runner",
    "MAX_THREADS": "runner",
    "THREADS_HELP": "runner",
    "parse_threads": "runner",
    "add_threads_argument": "runner",
    "apply_threads": "runner",
    "parse_device": "runner",
    "cli_main": "runner",
    "Terminated": "runner",
    "say_error": "runner",
    "check_output_file": "runner",
    "check_output_dir": "runner",
    "check_distinct": "runner",
    "check_input_file": "runner",
    "exit_with": "runner",
    "build_parser": "run_flags",
    "load_yaml": "run_flags",
    "config_from_args": "run_flags",
    "embedded_yaml": "run_flags",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
