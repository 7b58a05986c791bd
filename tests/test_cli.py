"""shrink.cli: block-index and device parsing, one-line messages, cli_main's exit codes."""
from __future__ import annotations

import pytest
import torch

from shrink.cli import cli_main, one_line, parse_device, parse_layers
from shrink.errors import ShrinkError


@pytest.mark.parametrize("text, layers", [("0,2,4", [0, 2, 4]), ("[0, 2, 4]", [0, 2, 4]), ("", []), ("3,", [3])])
def test_parse_layers(text, layers):
    assert parse_layers(text) == layers


def test_parse_layers_refuses_non_integers():
    with pytest.raises(ShrinkError, match="--remove-layers: expected comma-separated integers"):
        parse_layers("0,x", "--remove-layers")


def test_parse_device():
    assert parse_device("cpu") == torch.device("cpu")
    with pytest.raises(ShrinkError, match="--device"):
        parse_device("tpu")
    with pytest.raises(ShrinkError, match="unknown --dev"):
        parse_device("cuda:x", "--dev")


def test_one_line_collapses_newlines_and_spaces():
    assert one_line("a\n  b\tc ") == "a b c"


@pytest.mark.parametrize("exc, code, message", [
    (ShrinkError("bad\ninput"), 2, "error: bad input"),
    (FileNotFoundError(2, "No such file or directory", "x.pth"), 2, "error: x.pth: No such file or directory"),
    (KeyboardInterrupt(), 130, "interrupted"),
])
def test_cli_main_turns_user_errors_into_one_line(capsys, exc, code, message):
    def body(argv):
        raise exc

    assert cli_main(body, [], verbose=False) == code
    assert capsys.readouterr().err == message + "\n"


def test_cli_main_returns_the_body_code_and_keeps_bugs():
    assert cli_main(lambda argv: 0, [], verbose=False) == 0
    with pytest.raises(ZeroDivisionError):
        cli_main(lambda argv: 1 // 0, [], verbose=False)
