"""benchmark.py, the benchmark CLI: one-line errors with exit code 2, end to end in a subprocess."""
from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")


ROOT = Path(__file__).resolve().parents[1]


def _cli():
    spec = importlib.util.spec_from_file_location("benchmark_cli", ROOT / "benchmark.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("args, message", [
    (["--model", "no_such_model_xyz"], "unknown model 'no_such_model_xyz'"),
    (["--model", "deit_tiny_patch16_224", "--checkpoint", "{tmp}/bad.pth"], "cannot read"),
    (["--model", "deit_tiny_patch16_224", "--checkpoint", "{tmp}/missing.pth"], "checkpoint not found"),
    (["--model", "mixer_s16_224", "--remove-layers", "0,2"], "mixer_s16_224 has no attention layers to remove"),
    (["--model", "resnet18", "--tome-r", "4"], "ToMe needs a model with a sequence of tokens"),
    (["--model", "mixer_s16_224", "--tome-r", "2"], "not a timm VisionTransformer|ToMe not available|not supported by ToMe"),
    (["--model", "deit_tiny_patch16_224", "--remove-ratio", "0.25"], "--selection sel.json"),
    (["--model", "deit_tiny_patch16_224", "--compare", "dense,pruned"], "needs --remove-layers"),
    (["--model", "deit_tiny_patch16_224", "--tome-r", "4", "--compare", "dense"], r"no \+tome configuration"),
    (["--model", "deit_tiny_patch16_224", "--remove-layers", "1", "--compare", "dense"], "no pruned configuration"),
    (["--model", "deit_tiny_patch16_224,mixer_s16_224", "--checkpoint", "x.pth"], "exactly one model"),
    (["--model", "deit_tiny_patch16_224", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["--model", "deit_tiny_patch16_224", "--baseline", "no_such_model_xyz"], "unknown model 'no_such_model_xyz'"),
    (["--model", "deit_tiny_patch16_224", "--baseline", ""], "--baseline is empty"),
    (["--model", "deit_tiny_patch16_224", "--device", "cuda:0"] if not torch.cuda.is_available()
     else ["--model", "deit_tiny_patch16_224", "--device", "tpu"], "cuda|not supported|unknown device"),
])
def test_cli_errors_are_one_line_with_exit_code_2(tmp_path, capsys, args, message):
    (tmp_path / "bad.pth").write_bytes(b"this is not a checkpoint")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    out_json = tmp_path / "out.json"
    rc = _cli().main([*args, "--no-progress", "--json", str(out_json)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len(err) == 1 and err[0].startswith("benchmark.py: error: "), err
    assert re.search(message, err[0], re.IGNORECASE), err[0]
    assert not out_json.exists() and not list(tmp_path.glob(".out.json*"))


@pytest.mark.slow  # two fresh interpreters importing torch + timm
def test_cli_end_to_end_in_a_subprocess(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmark.py"), "--model", "deit_tiny_patch16_224", "--img-size", "32",
           "--remove-layers", "0,2,4", "--batch-size", "2", "--warmup", "0", "--iters", "1", "--repeats", "1",
           "--no-latency", "--no-progress", "--threads", "1", "--json", str(tmp_path / "r.json")]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("| model | configuration |") and "pruned [0,2,4]" in p.stdout
    assert "Unsupported operator" not in p.stderr and "Warning" not in p.stderr, p.stderr
    assert json.loads((tmp_path / "r.json").read_text())["command"].startswith("python benchmark.py --model")
    bad = subprocess.run([*cmd[:3], "no_such_model_xyz", "--no-progress"], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip() == "benchmark.py: error: unknown model 'no_such_model_xyz': not a timm model name (see timm.list_models())"
