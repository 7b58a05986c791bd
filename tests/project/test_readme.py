"""README.md, run as written: its shell commands, in order, in a fresh copy of the repository.

The README promises that its commands chain on a fresh clone after the install, on a CPU and
offline. ``test_readme_commands_run_in_order`` takes every command of its ```bash blocks and runs
it, in order, with ``bash`` in a copy of the repository's files (what a clone holds), except:

- the commands of the "Install" section (the test runs in the installed environment) and
  ``pytest`` (the suite itself);
- commands tagged in the comment lines just above them, or on their own line, with one of
  :data:`TAGS` (they need a GPU, the network, or data the user has);
- the main job, shortened by :data:`SHORTEN`, as the README says next to it.

The embedded config file is checked against the code's defaults here too.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ..conftest import run

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"

TAGS = ("[GPU]", "[internet]", "[your data]")
SKIP_SECTIONS = ("Install",)  # the environment is the test's own
# the README's main job is 40 epochs (tests/training/test_train.py::test_embedded_default runs it in full);
# here it is shortened by these flags, and the README says so in these words
SHORTEN = {"accelerate launch main_lambda.py --remove-ratio 0.4": "--epochs 3 --dilution-epochs 1"}
SHELLS = ("bash", "sh", "shell")


@dataclasses.dataclass
class Command:
    text: str          # the command as written (continuation lines included, comments stripped)
    line: int          # 1-based line of README.md where it starts
    section: str       # the "## " heading it is under
    tags: list[str]    # the TAGS found in its comments

    @property
    def skip_reason(self) -> str | None:
        if self.section in SKIP_SECTIONS:
            return f"section {self.section}"
        if self.text.split()[0] == "pytest":
            return "the test suite itself"
        if self.tags:
            return " ".join(self.tags)
        return None


def _code(line: str) -> str:
    """A shell line without its comment (the README's commands hold no '#' inside quotes)."""
    return line.split(" #", 1)[0].rstrip() if not line.lstrip().startswith("#") else ""


def readme_commands(text: str) -> list[Command]:
    """Every command of the README's shell code blocks, in order."""
    out: list[Command] = []
    section, fence, comments = "", None, []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if fence is None:
            if line.startswith("## "):
                section = line[3:].strip()
            m = re.match(r"^```(\w*)", line)
            if m:
                fence, comments = m.group(1), []
            i += 1
            continue
        if line.startswith("```"):
            fence = None
            i += 1
            continue
        if fence not in SHELLS or not line.strip():
            i += 1
            continue
        if line.lstrip().startswith("#"):
            comments.append(line)
            i += 1
            continue
        start, parts, raw = i, [], []
        while True:
            raw.append(lines[i])
            code = _code(lines[i])
            if code.endswith("\\"):
                parts.append(code[:-1].rstrip())
                i += 1
                continue
            parts.append(code)
            i += 1
            break
        found = " ".join(comments + raw)
        tags = [t for t in TAGS if t in found]
        out.append(Command(" ".join(p.strip() for p in parts if p.strip()), start + 1, section, tags))
        comments = []
    return out


def _runnable(commands: list[Command]) -> list[Command]:
    return [c for c in commands if c.skip_reason is None]


def _copy_repository(dest: Path) -> None:
    """The files a clone of the working tree would hold: tracked, plus untracked files git does not ignore."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                                capture_output=True, check=True, timeout=60).stdout.decode().split("\0")
    except (OSError, subprocess.SubprocessError):
        listed = None
    if listed is None:  # not a git checkout: everything but the usual build and run outputs
        shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(".git", ".venv", "venv", "out", "runs", "__pycache__",
                                                                  "*.egg-info", ".pytest_cache", ".ruff_cache"))
        return
    for name in filter(None, listed):
        src = ROOT / name
        if src.is_file():  # skips files deleted in the working tree
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def _digest(root: Path) -> dict[str, str]:
    skip = ("out", ".hf")
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file() and p.relative_to(root).parts[0] not in skip and "__pycache__" not in p.parts}


def _run(cmd: str, cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return run(["bash", "-c", "set -euo pipefail\n" + cmd], timeout=timeout, cwd=cwd, env=env)


# ------------------------------------------------------------------------------------------------
# Fast checks of the README's structure and of configs/embedded.yaml
# ------------------------------------------------------------------------------------------------

def test_the_readme_commands_are_found_and_every_skip_has_a_reason():
    text = README.read_text()
    commands = readme_commands(text)
    runnable = _runnable(commands)
    assert runnable and runnable[0].text == next(iter(SHORTEN)), "the main job comes first"
    # the shortening is the README's own words, next to the main job
    for cmd, extra in SHORTEN.items():
        assert any(c.text == cmd for c in runnable), f"the README no longer has {cmd!r}"
        assert f"shortened by `{extra}`" in text, f"README must say the test shortens {cmd!r} by {extra!r}"
    # every [tag] in a shell comment is a known one (a misspelt tag would let a GPU command run here)
    comments = [ln.split("#", 1)[1] for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, re.S)
                for ln in block.splitlines() if "#" in ln]
    tags = {t for c in comments for t in re.findall(r"\[[^\]]+\]", c)}
    assert tags <= set(TAGS), f"unknown tags {sorted(tags - set(TAGS))}; known: {TAGS}"
    assert any(c.tags for c in commands) and len(runnable) >= 8
    # no command writes into a path that another command's run owns before it: every new run has its
    # own --output-dir (or the default out/run, once)
    new_runs = [c for c in runnable if "main_lambda.py" in c.text and "--resume" not in c.text and "--eval" not in c.text]
    dirs = [re.search(r"--output-dir (\S+)", c.text).group(1) if "--output-dir" in c.text else "out/run" for c in new_runs]
    assert len(dirs) == len(set(dirs)), f"two README runs write the same output folder: {dirs}"


def test_readme_parser_on_a_small_example():
    text = "\n".join([
        "## Install", "```bash", "pip install -e .", "```", "## Use", "```bash",
        "# a comment", "python a.py --x 1 \\", "    --y 2   # trailing", "# [GPU] needs cuda", "python b.py",
        "python c.py  # [internet]", "```", "```python", "print(1)", "```", "```bash", "pytest -x", "```"])
    got = [(c.text, c.line, c.section, c.skip_reason) for c in readme_commands(text)]
    assert got == [("pip install -e .", 3, "Install", "section Install"),
                   ("python a.py --x 1 --y 2", 8, "Use", None),
                   ("python b.py", 11, "Use", "[GPU]"),
                   ("python c.py", 12, "Use", "[internet]"),
                   ("pytest -x", 18, "Use", "the test suite itself")]


def test_embedded_yaml_is_the_defaults():
    """configs/embedded.yaml says 'no --config uses exactly these values': every key it lists has the
    code's default value, and --config with it resolves to the same settings as no --config."""
    from shrink.cli.run_flags import config_from_args, load_yaml
    from shrink.training.config import RunConfig

    path = ROOT / "configs" / "embedded.yaml"
    data = load_yaml(path)
    defaults = RunConfig()
    differ = {k: (v, getattr(defaults, k)) for k, v in data.items() if v != getattr(defaults, k)}
    assert not differ, f"configs/embedded.yaml differs from RunConfig's defaults (file, code): {differ}"
    assert "exactly these values" in path.read_text()
    assert config_from_args(["--config", str(path)]).to_dict() == config_from_args([]).to_dict()


# ------------------------------------------------------------------------------------------------
# The README, run
# ------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_readme_commands_run_in_order(tmp_path):
    commands = _runnable(readme_commands(README.read_text()))
    repo = tmp_path / "clone"
    repo.mkdir()
    _copy_repository(repo)
    before = _digest(repo)
    bindir = str(Path(sys.executable).parent)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", MPLBACKEND="Agg", HF_HUB_OFFLINE="1",
               PYTHONPATH=str(repo), HF_HOME=str(repo / ".hf"), PATH=bindir + os.pathsep + os.environ.get("PATH", ""))
    env.pop("ACCELERATE_USE_CPU", None)
    env.pop("ACCELERATE_CONFIG_FILE", None)
    resume, seconds = None, []
    for c in commands:
        cmd = c.text + (" " + SHORTEN[c.text] if c.text in SHORTEN else "")
        t0 = time.perf_counter()
        p = _run(cmd, repo, env, timeout=300)
        seconds.append((round(time.perf_counter() - t0, 1), c.line, cmd[:70]))
        print(*seconds[-1])  # shown with pytest -s: where the time goes
        if p.returncode != 0:
            tail = "\n".join((p.stderr or p.stdout).strip().splitlines()[-15:])
            pytest.fail(f"README.md line {c.line} ({c.section}) failed with exit code {p.returncode}:\n  {cmd}\n{tail}")
        if "--resume" in c.text:
            resume = c
    # what the commands promise to leave
    assert (repo / "out/run/best/model.safetensors").is_file() and (repo / "out/run/metrics.png").is_file()
    assert (repo / "out/merges.png").read_bytes()[:4] == b"\x89PNG"
    # no command changed or added a file of the repository outside out/
    after = _digest(repo)
    assert after == before, sorted(set(after.items()) ^ set(before.items()))[:5]
    # the run still resumes after every documented command (exports, benchmarks, pictures included)
    assert resume is not None, "the README shows no --resume"
    p = _run(resume.text, repo, env, timeout=300)
    assert p.returncode == 0, f"{resume.text} after the README's commands: {p.stderr.strip().splitlines()[-3:]}"
