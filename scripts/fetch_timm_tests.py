#!/usr/bin/env python
"""Fetch timm's own test suite for the installed timm, for ``tests/models/test_timm_contract.py``.

Downloads the source distribution of the *installed* timm version with pip (``pip download
timm==<version> --no-deps --no-binary :all:``) and extracts its ``tests/`` folder to
``.cache/timm-tests/<version>/tests``. The test session calls it on first use (the ``timm_tests``
fixture of ``tests/conftest.py``), so ``pytest`` alone is enough; by hand, to fetch ahead of time:

    python scripts/fetch_timm_tests.py

Idempotent: an existing extraction is kept (``--force`` fetches again). Standard library only,
so it works before anything else of the project is importable. Errors are one line on stderr,
exit code 2.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CACHE = REPO / ".cache" / "timm-tests"


class FetchError(Exception):
    """A failure reported as one line (exit code 2)."""


def installed_timm_version() -> str:
    try:
        return importlib.metadata.version("timm")
    except importlib.metadata.PackageNotFoundError:
        raise FetchError("timm is not installed in this environment (pip install -e '.[dev]')") from None


def tests_dir(version: str, cache: Path = DEFAULT_CACHE) -> Path:
    """Where the extracted ``tests/`` folder of timm ``version`` lives."""
    return cache / version / "tests"


def download_sdist(version: str, into: Path) -> Path:
    """``pip download`` timm's source distribution of ``version`` into ``into``; the archive's path."""
    cmd = [sys.executable, "-m", "pip", "download", f"timm=={version}", "--no-deps", "--no-binary", ":all:",
           "--disable-pip-version-check", "--quiet", "-d", str(into)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()]
        errors = [ln.removeprefix("ERROR:").strip() for ln in lines if ln.startswith("ERROR:")]
        reason = (errors or lines or [f"exit code {proc.returncode}"])[0]
        reason = reason if len(reason) <= 200 else reason[:197] + "..."
        raise FetchError(f"pip download timm=={version} failed: {reason}")
    archives = sorted(into.glob("timm-*.tar.gz"))
    if not archives:
        raise FetchError(f"pip download timm=={version} produced no source archive in {into}")
    return archives[0]


def extract_tests(archive: Path, dest: Path) -> int:
    """Extract the archive's top-level ``tests/`` folder to ``dest`` (atomically); the number of files."""
    with tarfile.open(archive, "r:gz") as tar:
        members = []
        for m in tar.getmembers():
            parts = Path(m.name).parts
            if len(parts) >= 3 and parts[1] == "tests" and (m.isfile() or m.isdir()):
                m.name = str(Path(*parts[1:]))  # strip the timm-<version>/ prefix
                members.append(m)
        if not any(m.name == "tests/test_models.py" for m in members):
            raise FetchError(f"{archive.name} has no tests/test_models.py")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tests-", dir=dest.parent))
        try:
            tar.extractall(tmp, members=members, filter="data")  # no absolute paths, links or devices
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(tmp / "tests", dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return sum(1 for m in members if m.isfile())


def fetch(version: str, cache: Path = DEFAULT_CACHE, force: bool = False) -> tuple[Path, bool]:
    """Make sure timm ``version``'s tests are extracted; (their folder, whether they were fetched now)."""
    dest = tests_dir(version, cache)
    if (dest / "test_models.py").is_file() and not force:
        return dest, False
    with tempfile.TemporaryDirectory(prefix="timm-sdist-") as tmp:
        archive = download_sdist(version, Path(tmp))
        extract_tests(archive, dest)
    return dest, True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", default=None, help="timm version (default: the installed one)")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help=f"default: {DEFAULT_CACHE}")
    p.add_argument("--force", action="store_true", help="download and extract again")
    args = p.parse_args(argv)
    try:
        version = args.version or installed_timm_version()
        dest, fetched = fetch(version, args.cache, args.force)
    except (FetchError, OSError, tarfile.TarError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(f"timm {version} tests {'extracted to' if fetched else 'already in'} {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
