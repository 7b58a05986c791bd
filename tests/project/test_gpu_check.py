"""scripts/gpu_check.sh: it starts on a bare machine (a clone, the project not installed) and its
--dry-run runs every step's set-up and smallest version on a CPU; it writes nothing when it cannot run.

"Not installed" is made real: the clone is a copy of the working tree in a temporary folder, run by
an interpreter of a fresh virtual environment that sees this environment's packages (torch, timm,
accelerate, ...) through a plain path line, so the editable install's import hook (which maps
``shrink`` and ``shrink.models`` to this checkout) is never loaded and PYTHONPATH is unset.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = "scripts/gpu_check.sh"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "OUT", "QUICK", "PYTHON")}
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> tuple[Path, str]:
    """(a copy of the working tree, the python of a bare environment that has the dependencies only)."""
    root = tmp_path_factory.mktemp("clone")
    tree = root / "shrink-clone"
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():  # a file deleted in the working tree is still in the index
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, tree / name)
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, capture_output=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # a path line only: the .pth files of this environment (the editable install's hook) are not run
    (Path(purelib) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return tree, str(python)


def test_the_clone_imports_its_own_models_without_the_install(clone):
    """Issue 20: 'cannot import name models from partially initialized module shrink' from a clone."""
    tree, python = clone
    code = ("import runpy, sys, shrink\n"
            "print(shrink.models.__file__, shrink.models.vit_digits.__file__, "
            "any('editable' in getattr(f, '__module__', '') for f in sys.meta_path))\n"
            "sys.argv = ['main_lambda.py', '--help']\n"
            "runpy.run_path('main_lambda.py', run_name='__main__')\n")  # python main_lambda.py --help
    r = subprocess.run([python, "-c", code], cwd=tree, env=_env(PYTHONPATH="."), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "--remove-ratio" in r.stdout, r.stderr[-2000:]
    models, digits, hooked = r.stdout.split("\n")[0].split()
    assert models == str(tree / "models" / "__init__.py") and digits == str(tree / "models" / "vit_digits.py")
    assert hooked == "False"  # the installed package's mapping really is absent


@pytest.mark.parametrize("args, env, match", [
    ([], {}, "no CUDA GPU visible"),                                    # a CPU machine without --dry-run
    (["--dry-run", "--fast"], {}, "unknown argument '--fast'"),
    (["--dry-run"], {"PYTHON": "/nonexistent/python3"}, "no interpreter"),
    (["--dry-run"], {"OUT": "{tmp}/file/out"}, "not a writable folder"),
    (["--dry-run"], {"OUT": "{tmp}/file"}, "is a file"),
])
def test_it_writes_nothing_when_it_cannot_run(clone, tmp_path, args, env, match):
    """Issue 20: the script made its output folder before it found that there was no GPU."""
    tree, python = clone
    if not args and _has_cuda():
        pytest.skip("this machine has a GPU")
    (tmp_path / "file").write_text("x")
    env = {"PYTHON": python, **{k: v.format(tmp=tmp_path) for k, v in env.items()}}

    def files():
        return sorted(str(p) for p in tree.rglob("*")), sorted(str(p) for p in tmp_path.rglob("*"))

    before = files()  # OUT is the default, out/gpu_check in the clone
    r = subprocess.run(["bash", SCRIPT, *args], cwd=tree, env=_env(**env), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and match in r.stderr, r.stderr
    assert files() == before  # not even a __pycache__


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.slow
def test_dry_run_passes_from_a_clone_without_the_install(clone):
    """What CI runs: every step's set-up and smallest version on the CPU, the report skeleton, exit 0."""
    tree, python = clone
    r = subprocess.run(["bash", SCRIPT, "--dry-run"], cwd=tree, env=_env(PYTHON=python), capture_output=True,
                       text=True, timeout=900)
    report = tree / "out" / "gpu_check" / "REPORT.md"
    assert r.returncode == 0, (report.read_text() if report.is_file() else "") + r.stderr[-3000:]
    text = report.read_text()
    assert "DRY RUN" in text and "FAILED" not in text
    assert f"shrink from {tree / 'shrink' / '__init__.py'}, shrink.models from {tree / 'models' / '__init__.py'}" in text
    for step in ("GPU tests", "recipe deit_tiny", "FSDP2 config", "resume, fp32", "selection", "benchmark.py"):
        assert f"- {step}" in text and text.split(f"- {step}")[1].split("\n")[0].endswith(": ok"), step
    assert (tree / "out" / "gpu_check" / "deit_tiny" / "best" / "model.safetensors").is_file()
