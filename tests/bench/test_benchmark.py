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


ROOT = Path(__file__).resolve().parents[2]


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
    env = json.loads((tmp_path / "r.json").read_text())["environment"]
    assert env["allocator"].startswith(("steady", "default (no glibc"))  # the default, recorded


_ALLOCATOR_PROBE = r"""
import json, sys
import psutil, torch
from shrink.bench.measure import set_allocator
from shrink.errors import ShrinkError

torch.ones(4096).add_(1).sum()  # the first op's one-time set-up (kernels, thread pool) is not measured

def rss_kept_after_free():  # 48 MiB allocated, written, freed: how much of it the process still holds
    before = psutil.Process().memory_info().rss
    t = torch.ones(12 * 1024 * 1024)
    del t
    return psutil.Process().memory_info().rss - before

out = {"first": set_allocator(sys.argv[1])}
out["kept_first"] = rss_kept_after_free()
out["keep"] = set_allocator("steady", keep=True)
out["steady"] = set_allocator("steady")
out["kept_steady"] = rss_kept_after_free()
out["back"] = set_allocator("default")
try:
    set_allocator("jemalloc")
except ShrinkError as e:
    out["bad"] = str(e)
print(json.dumps(out))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_the_steady_allocator_keeps_freed_memory_and_is_chosen_once():
    """Default glibc malloc hands a freed 48 MiB tensor back to the OS (the next one page-faults again);
    the steady allocator keeps it. An explicit "default" stands against the cost model's keep=True
    request; steady cannot be undone, and says so."""
    p = subprocess.run([sys.executable, "-c", _ALLOCATOR_PROBE, "default"], capture_output=True, text=True, cwd=ROOT,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    if out["steady"].startswith("default (no glibc"):
        pytest.skip("not glibc: the allocator is left alone")
    mib = 1024 * 1024
    assert out["first"] == out["keep"] == "default (malloc left as it is)"
    assert out["steady"] == out["back"] == "steady (glibc mmap and trim thresholds 1 GiB)"
    assert out["kept_first"] < 16 * mib, out  # returned to the OS (less than a third kept)
    assert out["kept_steady"] > 40 * mib, out  # kept for the next forward
    assert out["bad"] == "unknown allocator mode 'jemalloc'; choose from steady, default"
