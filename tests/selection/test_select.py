"""python -m shrink.select: the selection CLI writes its JSON; errors are one line and write nothing."""
from __future__ import annotations

import json

import pytest


def test_cli_writes_json(tmp_path, capsys):
    from shrink.select import main

    out = tmp_path / "sel"
    rc = main(["--model", "vit_digits", "--random-init", "--calib-images", "16", "--batch-size", "16",
               "--ratio", "0.1", "--num-workers", "0", "--quiet", "--no-plot", "--output-dir", str(out)])
    assert rc == 0
    doc = json.loads((out / "selection.json").read_text())
    assert doc["criterion"] == "transfer_entropy" and doc["k"] == 1 and len(doc["layers"]) == 1
    assert doc["forward_passes"] == 1 + 12 and doc["calib_images"] == 16 and doc["log_base"] == "e"
    assert len(doc["scores"]["per_layer"]["attn_entropy"]) == 12
    assert not (out / "selection.png").exists()  # --no-plot (the PNG itself is tested in test_table_and_plot)
    printed = capsys.readouterr().out
    assert "H(attn)" in printed and "TE (nats)" in printed


@pytest.mark.parametrize("argv", [
    ["--ratio", "1.5", "--random-init"],
    ["--criterion", "manual", "--random-init"],
    ["--model", "mixer_s16_224", "--random-init", "--data-set", "synthetic", "--input-size", "32",
     "--calib-images", "4"],
])
def test_cli_errors_are_one_line_and_write_nothing(tmp_path, capsys, argv):
    from shrink.select import main

    out = tmp_path / "sel"
    assert main(argv + ["--quiet", "--num-workers", "0", "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert not out.exists()
