"""Shared fixtures and helpers: small random-initialised timm ViT variants (no network), image folders,
subprocess runs of the entry points (own process group, one thread) and their metrics."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

import shrink  # noqa: F401  (registers the project's models with timm)

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

ROOT = Path(__file__).resolve().parents[1]

IMG = 64  # a small resolution keeps the four DeiT variants fast on CPU


def _randomise_layerscale(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith(("ls1.gamma", "ls2.gamma")):
            with torch.no_grad():
                p.copy_(torch.rand(p.shape, generator=g) * 1.5 + 0.25)


def make_vit(variant: str) -> torch.nn.Module:
    """The four ViT variants the foundation must support, at 64 px, in eval mode."""
    torch.manual_seed(0)
    if variant == "deit_tiny":
        m = timm.create_model("deit_tiny_patch16_224", img_size=IMG)
    elif variant == "deit_tiny_distilled":
        m = timm.create_model("deit_tiny_distilled_patch16_224", img_size=IMG)
    elif variant == "deit3_small":
        m = timm.create_model("deit3_small_patch16_224", img_size=IMG)
        _randomise_layerscale(m)
    elif variant == "vit_qknorm":
        m = VisionTransformer(img_size=IMG, patch_size=16, embed_dim=96, depth=6, num_heads=3, qk_norm=True,
                              num_classes=10)
    else:
        raise ValueError(variant)
    return m.eval()


def tiny_vit(depth: int = 6, seed: int = 0, **kw) -> VisionTransformer:
    """A 6-block ViT at 16 px (4x4 patches), random weights, eval mode: fast on a CPU."""
    torch.manual_seed(seed)
    return VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=depth, num_heads=2,
                             num_classes=10, **kw).eval()


VARIANTS = ["deit_tiny", "deit_tiny_distilled", "deit3_small", "vit_qknorm"]


@pytest.fixture(params=VARIANTS)
def vit(request):
    return make_vit(request.param)


@pytest.fixture
def images():
    return torch.randn(2, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module: on a shared 2-core machine, two spinning threads per process are 10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def subprocess_env(threads: int = 1) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    env.pop("ACCELERATE_USE_CPU", None)
    return env


def run(args: list[str], timeout: float = 600, threads: int = 1) -> subprocess.CompletedProcess:
    """Run a command in its own process group; on timeout the whole group (launcher + workers) dies."""
    proc = subprocess.Popen(args, cwd=ROOT, env=subprocess_env(threads), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"{' '.join(args[:6])} ... did not finish in {timeout} s")
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def accelerate(n: int) -> list[str]:
    """`accelerate launch` for n CPU processes. Accelerate's `--cpu` flag always takes its single-process
    launcher (several CPU processes go through MPI), so n > 1 uses `--multi_gpu`, i.e. torchrun + gloo,
    which on a machine without GPUs runs CPU DDP."""
    mode = ["--multi_gpu"] if n > 1 else ["--cpu"]
    return [sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_processes", str(n),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def metrics(out: Path) -> list[dict]:
    """The rows of a run's ``metrics.jsonl``."""
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]


def image_folder(root: Path, classes=("cat", "dog"), per_class=6, size=40) -> Path:
    """An ImageFolder data set (train/ and val/, one colour per class) under ``root``."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for ci, c in enumerate(classes):
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                px = (torch.rand(size, size, 3, generator=g) * 80 + ci * 150).clamp(0, 255).to(torch.uint8)
                Image.fromarray(px.numpy()).save(root / split / c / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def mixed_run(tmp_path_factory):
    """One benchmark run (ViT dense/pruned/pruned+ToMe, MLP-Mixer dense/pruned): (report, output folder)."""
    from shrink import bench
    from shrink.bench import BenchConfig, ModelSpec

    out = tmp_path_factory.mktemp("bench")
    deit = ModelSpec(name="deit_tiny_patch16_224", remove_layers=[0, 2, 4], compare=["dense", "pruned", "pruned+tome"],
                     tome_r=1, tome_start_idx=1)
    specs = [deit, ModelSpec(name="mixer_s16_224", remove_layers=[0, 2, 4], compare=["dense", "pruned"])]
    cfg = BenchConfig(models=specs, img_size=32, train=True, json_path=str(out / "r.json"),
                      csv_path=str(out / "r.csv"), plot_path=str(out / "r.png"), command="pytest",
                      warmup=0, iters=1, repeats=1, batch_size=2, progress=False)
    return bench.run(cfg), out


@pytest.fixture(scope="module")
def deit_tiny_64():
    """timm's DeiT-Tiny at 64 px, random weights (seed 0), eval mode."""
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", img_size=64).eval()
