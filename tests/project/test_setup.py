"""The two-command set-up: after the README's install, ``pytest`` alone fetches what the tests need."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_an_unreachable_index_skips_the_timm_contract_with_the_reason(tmp_path):
    """No second set-up command: the session fetches timm's tests itself; where the package index
    cannot be reached, the tests that need them are skipped and say why (nothing half-written)."""
    env = {**os.environ, "SHRINK_TIMM_TESTS_CACHE": str(tmp_path / "cache"), "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
           "PIP_RETRIES": "0", "PIP_TIMEOUT": "2", "PIP_NO_CACHE_DIR": "1", "PIP_FIND_LINKS": ""}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                           "tests/models/test_timm_contract.py", "-k", "collection_matches"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:]
    assert "1 skipped" in proc.stdout and "timm's own tests could not be fetched (pip download timm==" in proc.stdout
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").rglob("test_models.py"))


def test_ci_runs_the_readme_install_and_pytest_only():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    install = readme.split("## Install", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [ln.split("#")[0].strip() for ln in install.splitlines() if ln.split("#")[0].strip()]
    assert commands == ["python3 -m venv .venv && . .venv/bin/activate", 'pip install -e ".[dev,deploy]"']
    assert 'pip install -e ".[dev,deploy]"' in ci and "fetch_timm_tests" not in ci
    assert [ln.split("#")[0].strip() for ln in ci.splitlines() if ln.startswith("pytest")] == ["pytest"]
