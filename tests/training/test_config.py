"""shrink.training.config and its edge shrink.cli.run_flags: the shipped YAML configs parse, configs/embedded.yaml
is RunConfig's defaults, the generated --help, tracker checks, the layering of the settings."""
from __future__ import annotations

import pytest

import main_lambda
import shrink
from shrink.training.config import RunConfig

from ..conftest import ROOT


def test_configs_parse():
    from shrink.cli.run_flags import load_yaml

    for path in sorted((ROOT / "configs").glob("*.yaml")):
        cfg = RunConfig(**load_yaml(path))
        assert cfg.epochs > 0, path
    deit = RunConfig(**load_yaml(ROOT / "configs" / "deit_base_40.yaml"))
    assert deit.remove_layers == [0, 1, 3, 4, 6] and deit.epochs == 400 and deit.dilution_epochs == 299
    assert deit.lr is None and deit.batch_size == 256


def test_help_explains_flags(capsys):
    with pytest.raises(SystemExit) as e:
        main_lambda.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--remove-ratio", "--remove-layers", "--finetune", "--resume", "--tome-r", "--lambda-schedule"):
        assert flag in text


def test_tracker_without_its_package_is_a_clear_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith(("tensorboard", "wandb")) else real(name, *a))
    with pytest.raises(shrink.ShrinkError, match="pip install tensorboard"):
        RunConfig(log_with="tensorboard").validate()


def test_finetune_records_pretrained_false_and_an_explicit_pretrained_is_warned_about(tmp_path, caplog):
    """--finetune gives the weights: config.yaml must not say pretrained: true (issue 20 item 12)."""
    import logging

    from safetensors.torch import save_file

    from shrink.cli.run_flags import config_from_args

    weights = tmp_path / "w.safetensors"
    save_file({"x": __import__("torch").zeros(1)}, str(weights))
    with caplog.at_level(logging.WARNING, logger="shrink.training.config"):
        quiet = config_from_args(["--finetune", str(weights)])
        assert quiet.pretrained is False and not caplog.records  # the default is not the user's word
        loud = config_from_args(["--finetune", str(weights), "--pretrained"])
    assert loud.pretrained is False
    assert [r.getMessage() for r in caplog.records] == [
        f"--pretrained is ignored: --finetune {weights} gives the starting weights (recorded as pretrained: false)"]
    assert config_from_args([]).pretrained is True  # without --finetune nothing changes


def test_embedded_yaml_is_generated_from_the_defaults():
    """configs/embedded.yaml lists every RunConfig field with its default; a default changed without the
    file (or the file edited by hand) fails here, with the command that regenerates it."""
    import dataclasses

    from shrink.cli.run_flags import EMBEDDED_YAML, config_from_args, embedded_yaml, load_yaml

    assert EMBEDDED_YAML == ROOT / "configs" / "embedded.yaml"
    regenerate = 'python -c "from shrink.cli.run_flags import embedded_yaml; embedded_yaml(write=True)"'
    assert EMBEDDED_YAML.read_text() == embedded_yaml(), f"configs/embedded.yaml is stale: {regenerate}"
    values, defaults = load_yaml(EMBEDDED_YAML), RunConfig()
    assert set(values) == {f.name for f in dataclasses.fields(RunConfig)}
    assert {k: v for k, v in values.items() if v != getattr(defaults, k)} == {}
    assert config_from_args(["--config", str(EMBEDDED_YAML)]).to_dict() == config_from_args([]).to_dict()


def test_embedded_yaml_check_fails_when_a_default_changes(tmp_path):
    """The check is not vacuous: a changed default no longer matches the file as written."""
    import dataclasses

    from shrink.cli.run_flags import EMBEDDED_YAML, embedded_yaml

    @dataclasses.dataclass
    class Changed(RunConfig):
        epochs: int = dataclasses.field(default=41, metadata=RunConfig.__dataclass_fields__["epochs"].metadata)

    changed = embedded_yaml(defaults=Changed())
    assert "epochs: 41" in changed and EMBEDDED_YAML.read_text() != changed
    out = tmp_path / "e.yaml"
    embedded_yaml(write=True, path=out, defaults=Changed())
    assert out.read_text() == changed


def test_settings_are_checked_and_merged_in_memory():
    """shrink.training.config works on values: a mapping's keys and types, then the levels merged."""
    from shrink.errors import ShrinkError
    from shrink.training.config import check_settings, resolve_settings

    assert check_settings({"min-lr": "1e-5", "remove_layers": "0,2"}, "x.yaml") == {"min_lr": 1e-5,
                                                                                 "remove_layers": [0, 2]}
    for bad, message in (([1], "x.yaml must hold a mapping"), ({"nope": 1}, "unknown setting"),
                         ({"lr": "fast"}, "x.yaml: lr: cannot read 'fast'"), ({"compile": "yes"}, "true or false"),
                         ({1: 2}, "setting names must be strings")):
        with pytest.raises(ShrinkError, match=message):
            check_settings(bad, "x.yaml")
    cfg = resolve_settings([("a.yaml", {"remove_ratio": 0.25, "epochs": 2}), ("flag", {"remove_layers": [1]})])
    assert (cfg.remove_ratio, cfg.remove_layers, cfg.epochs) == (0.0, [1], 2)
    with pytest.raises(ShrinkError, match="a.yaml: epochs must be an integer from 1"):
        resolve_settings([("a.yaml", {"epochs": 0})])
    with pytest.raises(ShrinkError, match="--epochs must be"):
        resolve_settings([("flag", {"epochs": 0})])


def test_the_settings_module_reads_no_files_and_parses_no_flags():
    """The layering: shrink.training.config (and its checks) import no shrink.cli, argparse or yaml; the
    moved names still answer there (deprecated) and are the same functions as shrink.cli's."""
    import ast
    import warnings

    import shrink.cli
    import shrink.training.config as config

    for name in ("config", "config_checks"):
        tree = ast.parse((ROOT / "shrink" / "training" / f"{name}.py").read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not {m for m in imported if m.split(".")[0] in ("argparse", "yaml")
                    or m.startswith("shrink.cli")}, (name, sorted(imported))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name in ("build_parser", "load_yaml", "config_from_args"):
            assert getattr(config, name) is getattr(shrink.cli, name)
    assert len(caught) == 3 and all(issubclass(w.category, PendingDeprecationWarning) for w in caught)
