"""The command line: the one runner behind every entry point, the shared flags and parsers, the run's flags.

The top layer: library packages do not import it. The value parsers (parse_layers, parse_device,
parse_threads, MAX_THREADS, THREADS_HELP, apply_threads) live in :mod:`shrink.values` and answer here too.
"""
from shrink.cli.run_flags import (
    build_parser,
    config_from_args,
    embedded_yaml,
    load_yaml,
)
from shrink.cli.runner import (
    MAX_THREADS,
    THREADS_HELP,
    OneLineArgumentParser,
    Terminated,
    add_threads_argument,
    apply_threads,
    check_distinct,
    check_input_file,
    check_output_dir,
    check_output_file,
    cli_main,
    exit_with,
    is_verbose,
    one_line,
    parse_device,
    parse_layers,
    parse_threads,
    say_error,
    setup_output,
)

__all__ = [
    "MAX_THREADS",
    "OneLineArgumentParser",
    "THREADS_HELP",
    "Terminated",
    "add_threads_argument",
    "apply_threads",
    "build_parser",
    "check_distinct",
    "check_input_file",
    "check_output_dir",
    "check_output_file",
    "cli_main",
    "config_from_args",
    "embedded_yaml",
    "exit_with",
    "is_verbose",
    "load_yaml",
    "one_line",
    "parse_device",
    "parse_layers",
    "parse_threads",
    "say_error",
    "setup_output",
]
