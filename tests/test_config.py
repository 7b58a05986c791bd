"""shrink.training.config: the shipped YAML configs parse, the generated --help, tracker checks."""
from __future__ import annotations

import pytest

import main_lambda
import shrink
from shrink.training.config import RunConfig

from .conftest import ROOT


def test_configs_parse():
    from shrink.training.config import load_yaml

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

    from shrink.training.config import config_from_args

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
