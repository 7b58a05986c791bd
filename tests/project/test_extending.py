"""docs/extending.md's examples run as written: one new registered entry each, used through the public
entry point, printing what the comment beside the last ``print`` says."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "extending.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)


def test_the_doc_has_an_example_per_registry():
    used = " ".join(BLOCKS)
    for decorator in ("register_criterion", "register_schedule", "register_data_set", "register_family",
                      "register_format"):
        assert f"@{decorator}(" in used, f"docs/extending.md has no example of @{decorator}"


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_an_example_runs_and_prints_what_it_says(index, tmp_path):
    code = BLOCKS[index]
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last_print = [ln for ln in code.splitlines() if ln.startswith("print(")][-1]
    if "#" in last_print:  # the expected output, up to an explanation after a colon
        expected = last_print.split("#", 1)[1].split(":")[0].strip()
        assert proc.stdout.strip().splitlines()[-1] == expected, proc.stdout
    else:
        assert proc.stdout.strip(), "the example prints nothing"
