"""The run's command line and settings files: one flag per RunConfig field, the YAML reader, and
``config_from_args`` (defaults < the run's saved config.yaml with --resume < the --config file < flags).

The edge of :mod:`shrink.training.config`: here the flags are parsed and the files read; there the
settings are coerced, checked and merged (:func:`~shrink.training.config.resolve_settings`).
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import yaml

from shrink.cli.runner import OneLineArgumentParser
from shrink.errors import ShrinkError, first_line
from shrink.training.config import RunConfig, check_settings, coerce, resolve_settings

__all__ = ["EMBEDDED_YAML", "build_parser", "config_from_args", "embedded_yaml", "load_yaml"]


def _arg_type(cast):
    """A coercion of shrink.training.config as an argparse type: its ValueError is the flag's one-line error."""
    def parse(text: str):
        try:
            return cast(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = getattr(cast, "__name__", "value")
    return parse


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """An argparse parser with one flag per RunConfig field (defaults are applied later)."""
    parser = OneLineArgumentParser(
        description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        argument_default=argparse.SUPPRESS)
    parser.add_argument("--config", default=argparse.SUPPRESS,
                        help="YAML file of settings (keys = flag names with underscores); flags override it")
    groups: dict[str, argparse._ArgumentGroup] = {}
    defaults = RunConfig()
    for f in dataclasses.fields(RunConfig):
        g = f.metadata.get("group", "other")
        if g not in groups:
            groups[g] = parser.add_argument_group(g)
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        help_text = f.metadata["help"] + f" (default: {default})"
        if f.type == "bool":
            groups[g].add_argument(flag, action=argparse.BooleanOptionalAction, help=help_text)
        else:
            kw = {"choices": f.metadata["choices"]} if "choices" in f.metadata else {}
            groups[g].add_argument(flag, type=_arg_type(coerce(f.type)), help=help_text,
                                   metavar=f.name.upper(), **kw)
    return parser


_MAX_YAML = 1 << 20  # a settings file is a few hundred bytes; refuse to parse megabytes


def load_yaml(path: str | Path) -> dict[str, Any]:
    """The settings of a YAML file, keys checked against RunConfig; strings coerced like flags."""
    p = Path(path)
    if not str(path).strip() or not p.exists():
        raise ShrinkError(f"config file not found: {str(path)!r}")
    if not p.is_file():
        raise ShrinkError(f"config file {p} is not a regular file")
    if p.stat().st_size > _MAX_YAML:
        raise ShrinkError(f"config file {p} is larger than {_MAX_YAML} bytes; not a settings file")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ShrinkError(f"cannot parse {p}: {first_line(e)}") from None
    except UnicodeDecodeError:
        raise ShrinkError(f"cannot parse {p}: not a UTF-8 text file") from None
    except OSError as e:
        raise ShrinkError(f"cannot read {p}: {e.strerror or e}") from None
    except RecursionError:
        raise ShrinkError(f"cannot parse {p}: nested too deeply") from None
    return check_settings(data, str(p))


def config_from_args(argv: list[str] | None = None, description: str | None = None) -> RunConfig:
    """Parse ``argv``: defaults < the run's saved config.yaml (with --resume) < the --config YAML < flags.

    Every value, wherever it came from, passes the same checks (:meth:`RunConfig.validate`). A
    ``--data-path`` without a data set given anywhere means ``--data-set folder`` (as in timm's
    train.py). Of --remove-ratio and --remove-layers the later level wins; both at one level is an error.
    """
    ns = vars(build_parser(description).parse_args(argv))
    levels: list[tuple[str, dict[str, Any]]] = []
    if ns.get("resume"):  # continue with the settings the run was started with
        out = ns.get("output_dir", RunConfig.output_dir)
        saved = Path(out) / "config.yaml" if str(out).strip() else None
        if saved is not None and saved.is_file():
            old = load_yaml(saved)
            old.pop("resume", None)
            old.pop("output_dir", None)
            levels.append((str(saved), old))
    if "config" in ns:
        path = ns.pop("config")
        levels.append((str(path), load_yaml(path)))
    levels.append(("flag", ns))
    return resolve_settings(levels)


# ----------------------------------------------------------------------------------------------
# configs/embedded.yaml: RunConfig's defaults written out (tests/test_config.py keeps them equal)
# ----------------------------------------------------------------------------------------------

EMBEDDED_YAML = Path(__file__).resolve().parents[2] / "configs" / "embedded.yaml"
_EMBEDDED_HEAD = """\
# The embedded default, written out: main_lambda.py with no --config uses exactly these values.
# Generated from shrink.training.config.RunConfig's defaults (tests/test_config.py fails when they
# differ); after changing a default, regenerate it:
#   python -c "from shrink.cli.run_flags import embedded_yaml; embedded_yaml(write=True)"
# vit_digits (12 blocks) on scikit-learn's digits, starting from the dense weights in models/weights.
# No layer is removed unless asked: the README's main job adds --remove-ratio 0.4.
"""


def embedded_yaml(write: bool = False, path: str | Path = EMBEDDED_YAML, defaults: RunConfig | None = None) -> str:
    """The text of configs/embedded.yaml: every RunConfig field with its default, by group; ``write``
    writes it to ``path``. ``defaults``: another RunConfig (a subclass with other defaults) to write."""
    defaults = RunConfig() if defaults is None else defaults
    lines, group = [_EMBEDDED_HEAD.rstrip("\n")], None
    for f in dataclasses.fields(defaults):
        if f.metadata.get("group") != group:
            group = f.metadata.get("group")
            lines.append(f"\n# {group}")
        value = yaml.safe_dump({f.name: getattr(defaults, f.name)}, default_flow_style=True, width=1 << 16)
        lines.append(value.strip()[1:-1])  # {key: value} -> key: value
    text = "\n".join(lines) + "\n"
    if write:
        Path(path).write_text(text, encoding="utf-8")
    return text
