"""main_lambda.py, the training CLI: bad input is one line with exit code 2 and no output; --eval (+ ToMe)."""
from __future__ import annotations

import sys

import pytest

import main_lambda
import shrink

from ..conftest import run


@pytest.mark.parametrize("argv, match", [
    (["--remove-ratio", "1.0"], "remove-ratio"),
    (["--remove-ratio", "-0.1"], "remove-ratio"),
    (["--remove-ratio", "abc"], "invalid"),
    (["--remove-layers", "0,0"], "repeated"),
    (["--remove-layers", "12"], "out of range"),
    (["--remove-layers", "1,x"], "comma-separated"),
    (["--batch-size", "0"], "batch-size"),
    (["--data-set", "folder", "--data-path", "/nonexistent/imagenet"], "not found"),
    (["--data-set", "folder"], "data-path"),
    (["--finetune", "/nonexistent/deit.pth"], "not found"),
    (["--model", "resnet18", "--remove-ratio", "0.4", "--no-pretrained"], "not a ViT"),
    (["--model", "not_a_model_name"], "unknown model"),
    (["--eval"], "checkpoint"),
])
def test_bad_input_one_line_exit_2_no_output(tmp_path, capsys, argv, match):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        sys.exit(main_lambda.main([*argv, "--output-dir", str(out), "--no-progress"]))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0], err
    assert "Traceback" not in err[0]
    assert not out.exists()


def test_unreadable_checkpoint_cli(tmp_path, capsys):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"garbage")
    out = tmp_path / "out"
    assert main_lambda.main(["--finetune", str(junk), "--output-dir", str(out), "--no-progress"]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert not out.exists()


def test_refuses_to_overwrite_a_run(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "config.yaml").write_text("model: vit_digits\n")
    (out / "summary.json").write_text("{}")
    assert main_lambda.main(["--output-dir", str(out), "--no-progress"]) == 2
    assert "--resume" in capsys.readouterr().err


def test_bad_input_subprocess_has_no_traceback(tmp_path):
    res = run([sys.executable, "main_lambda.py", "--remove-ratio", "1.5", "--output-dir", str(tmp_path / "o")])
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "Traceback" not in res.stderr
    assert not (tmp_path / "o").exists()


def test_eval_command_with_tome(tmp_path, capsys):
    m = shrink.create_model("vit_digits", pretrained=True)
    shrink.dilute(m, [0, 2], lam=0.0)
    shrink.save(shrink.export(m), tmp_path / "best")
    code = main_lambda.main(["--eval", "--checkpoint", str(tmp_path / "best"), "--tome-r", "2",
                             "--tome-start-idx", "1", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    assert "top-1 with ToMe r=2" in out
    # 17 tokens; blocks 0 and 2 have no attention; ToMe starts at the 2nd attention block (block 3)
    # r is capped at half the unprotected tokens: 16 -> 14 -> ... -> 4 -> 2 -> 1 -> 1
    assert "[17, 17, 17, 15, 13, 11, 9, 7, 5, 3, 2, 2]" in out
