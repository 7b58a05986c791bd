"""shrink.merging.vis and scripts/tome_visualize.py: the merge picture."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.models.vision_transformer import VisionTransformer

import shrink
from shrink.merging.patch import (
    apply_tome,
    tome_state,
    tome_token_counts,
)

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[2]


IMG = 64  # 4x4 = 16 patches per image: fast


def _tiny_vit(**kw) -> VisionTransformer:
    args = dict(img_size=IMG, patch_size=8, embed_dim=64, depth=4, num_heads=4, num_classes=10)
    args.update(kw)
    return VisionTransformer(**args).eval()


def _test_image(path: Path, size: int = 64) -> Path:
    a = np.zeros((size, size + 16, 3), np.uint8)
    a[: size // 2] = (220, 30, 30)
    a[size // 2:, size // 2:] = (20, 200, 40)
    Image.fromarray(a).save(path)
    return path


def test_merge_png_and_groups(tmp_path):
    from shrink.merging.vis import merge_groups, render_groups, save_merge_png

    model = _tiny_vit()
    with pytest.raises(shrink.ShrinkError):
        save_merge_png(model, _test_image(tmp_path / "in.png"), tmp_path / "x.png")
    apply_tome(model, 3)
    out = save_merge_png(model, tmp_path / "in.png", tmp_path / "merges.png", title="t")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp files left
    groups = merge_groups(model, torch.randn(3, IMG, IMG))
    assert groups.shape == (8, 8) and len(groups.unique()) == tome_token_counts(model)[-1] - 1
    assert tome_state(model).trace_source is False  # restored after the forward
    pic = render_groups(np.full((16, 16, 3), 0.5), torch.tensor([[0, 0], [1, 1]]))
    assert pic.shape == (16, 16, 3) and np.allclose(pic[0, 0], 0.5) and np.allclose(pic[7, 3], 1.0)


def _cli():
    spec = importlib.util.spec_from_file_location("tome_visualize", REPO / "scripts" / "tome_visualize.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_visualize_cli(tmp_path, capsys):
    img = _test_image(tmp_path / "in.png")
    common = ["--model", "deit_tiny_patch16_224", "--img-size", "64", "--image", str(img), "--r", "2"]
    cli = _cli()
    assert cli.main(common + ["--out", str(tmp_path / "m.png")]) == 0
    assert (tmp_path / "m.png").stat().st_size > 1000
    capsys.readouterr()
    assert cli.main(common + ["--start-idx", "99", "--out", str(tmp_path / "b.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: start_idx=99") and not any("Traceback" in e for e in err)
    assert not (tmp_path / "b.png").exists()
    assert cli.main(common[:-4] + ["--image", str(tmp_path / "missing.png"), "--out", str(tmp_path / "c.png")]) == 2
    assert not (tmp_path / "c.png").exists()


@pytest.mark.slow
def test_visualize_cli_subprocess(tmp_path):
    img = _test_image(tmp_path / "in.png")
    script = REPO / "scripts" / "tome_visualize.py"
    assert "--start-idx" in subprocess.run([sys.executable, str(script), "--help"], capture_output=True,
                                           text=True, timeout=120).stdout
    bad = subprocess.run([sys.executable, str(script), "--image", str(img), "--r", "2", "--start-idx", "99",
                          "--model", "deit_tiny_patch16_224", "--img-size", "64", "--out", str(tmp_path / "b.png")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("error: start_idx=99")
    assert not (tmp_path / "b.png").exists()


def test_merge_png_for_a_greyscale_model(tmp_path):
    """vit_digits takes 1-channel 8x8 images: an RGB picture is converted to grey, not refused."""
    from PIL import Image

    from shrink.merging.vis import save_merge_png

    model = shrink.create_model("vit_digits", pretrained=True).eval()
    shrink.apply_tome(model, r=2)
    Image.fromarray((torch.rand(16, 16, 3) * 255).to(torch.uint8).numpy()).save(tmp_path / "rgb.png")
    out = save_merge_png(model, tmp_path / "rgb.png", tmp_path / "m.png")
    assert out.is_file() and out.stat().st_size > 0
