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


def run(args: list[str], timeout: float = 600, threads: int = 1, cwd: Path = ROOT,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a command in its own process group; on timeout the whole group (launcher + workers) dies."""
    proc = subprocess.Popen(args, cwd=cwd, env=subprocess_env(threads) if env is None else env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
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


# =================================================================================================
# Model families (models/): helpers shared by test_bottleneck_mlp.py, test_ff_vit.py, test_fnet.py,
# test_ms_mlp.py, test_mlp_presets.py, test_vit_digits.py and test_checkpoint_formats.py.
# Appended section; expected values are written out here, not read back from the code under test.
# =================================================================================================

IMAGENET_MEAN_STD = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CIFAR100_MEAN_STD = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def on_meta(name: str, **kwargs) -> torch.nn.Module:
    """Build without allocating or initialising weights (parameter counts and cfgs only)."""
    with torch.device("meta"):
        return timm.create_model(name, **kwargs)


def linear(i: int, o: int) -> int:
    """Parameters of a Linear(i, o) with bias."""
    return i * o + o


def bottleneck_count(blocks: int, width: int, res: int = 64, classes: int = 11230) -> int:
    """BottleneckMLP parameters by hand: flattened-image stem, blocks of LayerNorm + MLP (4w), head."""
    block = 2 * width + linear(width, 4 * width) + linear(4 * width, width)
    return linear(3 * res * res, width) + blocks * block + linear(width, classes)


def registered(module: str) -> set[str]:
    """The timm names registered by one model file (timm keys them by the file's last name component)."""
    return set(timm.list_models(module=module))


def assert_pretrained_cfg(name: str, input_size: tuple[int, int, int], mean_std, classes: int) -> None:
    """The cfg's input size, mean / std and classes, also as timm's data config resolves them; nothing to download."""
    from timm.data import resolve_data_config

    mean, std = mean_std
    model = on_meta(name)
    cfg = model.pretrained_cfg
    assert tuple(cfg["input_size"]) == input_size
    assert tuple(cfg["mean"]) == pytest.approx(mean) and tuple(cfg["std"]) == pytest.approx(std)
    assert cfg["num_classes"] == classes == model.num_classes
    assert not cfg.get("url") and not cfg.get("hf_hub_id")  # nothing that would be downloaded
    data = resolve_data_config({}, model=model)
    assert data["input_size"] == input_size and tuple(data["mean"]) == pytest.approx(mean)


def assert_no_pretrained_weights(name: str) -> None:
    """pretrained=True: timm's own RuntimeError; through shrink.create_model a one-line ShrinkError."""
    with pytest.raises(RuntimeError, match="No pretrained weights exist"):
        timm.create_model(name, pretrained=True)
    with pytest.raises(shrink.ShrinkError, match="no pretrained weights") as e:
        shrink.create_model(name, pretrained=True)
    assert "\n" not in str(e.value)


def train_step(model: torch.nn.Module, batch: int = 2) -> float:
    """One SGD step on random data at the cfg's input size; the loss."""
    c = model.pretrained_cfg
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *c["input_size"], generator=g)
    y = torch.randint(0, model.num_classes, (batch,), generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


def check_nano_training(name: str, record_property) -> None:
    """A nano model: finite eval logits of the right shape, and a training step that changes the weights (< 5 s)."""
    import math
    import time

    torch.manual_seed(0)
    model = timm.create_model(name)
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(3, *model.pretrained_cfg["input_size"]))
    assert out.shape == (3, model.num_classes) and torch.isfinite(out).all()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_step(model, batch=8)  # warm-up
    t0 = time.perf_counter()
    loss = train_step(model, batch=8)
    seconds = time.perf_counter() - t0
    record_property("train_step_seconds", seconds)
    assert math.isfinite(loss)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert seconds < 5.0  # the target is < 1 s; the bound is loose so a busy machine does not flake


def check_default_forward_and_train(name: str) -> None:
    """A default-size model: one finite forward at the cfg's size and a finite training step."""
    import math

    model = timm.create_model(name).eval()
    with torch.no_grad():
        out = model(torch.randn(1, *model.pretrained_cfg["input_size"]))
    assert out.shape == (1, model.num_classes) and torch.isfinite(out).all()
    assert math.isfinite(train_step(model))


def assert_removal_is_one_line_error(name: str) -> None:
    """No attention to remove: shrink.dilute refuses in one line."""
    with pytest.raises(shrink.ShrinkError) as e:
        shrink.dilute(timm.create_model(name), [0])
    assert "\n" not in str(e.value)


def assert_save_load_round_trip(name: str, tmp_path: Path) -> None:
    """shrink.save then shrink.load gives the same outputs, bit for bit."""
    model = shrink.create_model(name).eval()
    shrink.save(model, tmp_path / "m")
    back = shrink.load(tmp_path / "m")
    x = torch.randn(2, *model.pretrained_cfg["input_size"])
    with torch.no_grad():
        assert torch.equal(model(x), back(x))


def same_outputs(a: torch.nn.Module, b: torch.nn.Module, atol: float = 1e-5) -> bool:
    """Both models in eval mode give the same outputs (to ``atol``) on one random batch at a's input size."""
    x = torch.randn(2, *a.pretrained_cfg["input_size"])
    a.eval()
    b.eval()
    with torch.no_grad():
        return (a(x) - b(x)).abs().max().item() <= atol


def rename_state(sd: dict, rules: list[tuple[str, str]]) -> dict:
    """A copy of a state dict with regex renames applied to its keys (to write checkpoints in other formats)."""
    import re

    out = {}
    for k, v in sd.items():
        for pattern, repl in rules:
            k = re.sub(pattern, repl, k)
        out[k] = v.clone()
    return out


def check_feature_api(name: str, levels: int, tokens: bool) -> None:
    """timm's feature API on a (small) model: forward_intermediates, feature_info, features_only, pruning.

    The maps are NCHW with feature_info's widths and strides (and, for token models, the NLC tokens
    are the same values); the final output is forward_features'; the features_only model (timm's
    FeatureGetterNet) gives the last three maps; stop_early and a pruned model give the first map
    unchanged, and a pruned model's forward_features ends there.
    """
    import copy

    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    c, h, w = model.pretrained_cfg["input_size"]
    x = torch.randn(2, c, h, w)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        assert torch.equal(final, model.forward_features(x))
        assert len(maps) == len(model.feature_info) == levels
        for info, m in zip(model.feature_info, maps, strict=True):
            r = info["reduction"]
            assert m.shape == (2, info["num_chs"], h // r, w // r)

        def as_map(t: torch.Tensor) -> torch.Tensor:  # tokens (B, N, C), class token already dropped
            return t if t.ndim == 4 else t.transpose(1, 2).reshape(maps[0].shape)

        if tokens:
            nlc = model.forward_intermediates(x, indices=[0], output_fmt="NLC", intermediates_only=True)
            assert torch.equal(as_map(nlc[0]), maps[0])
        first = model.forward_intermediates(x, indices=[0], stop_early=True, intermediates_only=True)
        assert torch.equal(first[0], maps[0])
        pruned = copy.deepcopy(model)
        kept = pruned.prune_intermediate_layers([0], prune_norm=True)
        assert torch.equal(pruned.forward_intermediates(x, indices=kept, intermediates_only=True)[0], maps[0])
        ends = pruned.forward_features(x)
        assert torch.equal(as_map(ends if ends.ndim == 4 else ends[:, getattr(model, "num_prefix_tokens", 0):]), maps[0])
        torch.manual_seed(0)
        features = timm.create_model(name, features_only=True)
        assert features.feature_info.channels() == [i["num_chs"] for i in model.feature_info[-3:]]
        for got, want in zip(features.eval()(x), maps[-3:], strict=True):
            assert torch.equal(got, want)


def check_script_and_trace(name: str) -> None:
    """TorchScript and torch.fx (timm's tracer, its leaf modules and functions) give the eager outputs."""
    import warnings

    from timm.models import create_feature_extractor, get_graph_node_names

    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    x = torch.randn(2, *model.pretrained_cfg["input_size"])
    with torch.no_grad():
        want = model(x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated (still timm's test)
            scripted = torch.jit.script(model)
        torch.testing.assert_close(scripted(x), want)
        last = get_graph_node_names(model)[1][-1]
        traced = create_feature_extractor(model, return_nodes=[last])
        torch.testing.assert_close(traced(x)[last], want)


def check_mlp_config(path: Path) -> None:
    """A configs/mlp/*.yaml: loads, names a registered model at its cfg's input size, plain training."""
    import yaml

    from shrink.cli.run_flags import load_yaml

    raw = yaml.safe_load(path.read_text())
    cfg = load_yaml(path)  # the integrator's loader accepts every key
    assert timm.is_model(cfg["model"]), path
    assert raw["remove_ratio"] == 0 and raw["pretrained"] is False, path
    assert cfg["input_size"] == on_meta(cfg["model"]).pretrained_cfg["input_size"][-1], path
    assert {"batch_size", "epochs", "lr"} <= set(raw), path


# =================================================================================================
# Real image files (appended for issue 20): crops of scikit-learn's two sample photos, written as
# PNG and JPEG files of mixed sizes and modes, one class per photo.
# =================================================================================================

REAL_MODES = ("RGB", "L", "RGBA", "CMYK", "P", "LA", "I;16", "RGB")


def real_image_folder(root: Path, per_class: int = 12, val_per_class: int = 4, seed: int = 0,
                      truncated: bool = True) -> Path:
    """An ImageFolder (train/ and val/, classes ``china`` and ``flower``) of real photo crops.

    Sizes vary from 24 to 96 pixels a side (not square); modes cycle through REAL_MODES (CMYK as
    JPEG, the others as PNG or JPEG where JPEG can hold them); with ``truncated`` the last train
    image of each class is a JPEG cut short.
    """
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images  # china.jpg, flower.jpg: 427 x 640 RGB
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("val", val_per_class)):
        for ci, (cls, photo) in enumerate(zip(("china", "flower"), photos, strict=True)):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                h, w = int(rng.integers(24, 97)), int(rng.integers(24, 97))
                y, x = int(rng.integers(0, photo.shape[0] - h)), int(rng.integers(0, photo.shape[1] - w))
                img = Image.fromarray(photo[y:y + h, x:x + w])
                mode = REAL_MODES[(i + ci) % len(REAL_MODES)]
                if mode == "I;16":
                    img = Image.fromarray(np.asarray(img.convert("L"), dtype=np.uint16) * 257)
                elif mode == "P":
                    img = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
                else:
                    img = img.convert(mode)
                cut = truncated and split == "train" and i == n - 1
                jpeg = cut or mode == "CMYK" or (mode in ("RGB", "L") and i % 2 == 1)
                path = root / split / cls / f"{i:03d}.{'jpg' if jpeg else 'png'}"
                if jpeg:
                    (img.convert("RGB") if cut else img).save(path, quality=90)
                else:
                    img.save(path)
                if cut:
                    data = path.read_bytes()
                    path.write_bytes(data[: len(data) * 2 // 3])
    return root


# ------------------------------------------------------------------------------------------------
# timm's own test suite (tests/models/test_timm_contract.py): fetched here, once, on first use
# ------------------------------------------------------------------------------------------------

def _fetch_script():
    """scripts/fetch_timm_tests.py as a module: the one copy of the download-and-extract logic."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fetch_timm_tests", ROOT / "scripts" / "fetch_timm_tests.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def timm_tests() -> Path:
    """The ``tests/`` folder of the installed timm's sdist, cached in ``.cache/timm-tests/<version>``.

    Fetched inside the test session (``pip download`` of the sdist, no second set-up command); a
    machine that cannot reach the package index skips the tests that need it, saying why.
    ``SHRINK_TIMM_TESTS_CACHE`` names another cache folder."""
    import tarfile

    fetch = _fetch_script()
    cache = Path(os.environ.get("SHRINK_TIMM_TESTS_CACHE") or fetch.DEFAULT_CACHE)
    try:
        version = fetch.installed_timm_version()
        path, _ = fetch.fetch(version, cache)
    except (fetch.FetchError, OSError, tarfile.TarError) as e:
        pytest.skip(f"timm's own tests could not be fetched ({' '.join(str(e).split())}); "
                    f"they are cached in .cache/timm-tests once the package index is reachable")
    return path
