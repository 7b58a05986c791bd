"""Deployment: torch.export (.pt2) and ONNX (ONNX Runtime) outputs equal eager PyTorch for dense,
diluted-at-0, attention-free (folded or not) and token-merged models; removed attention is gone
from the ONNX graph; metadata; CLI errors; safe .pt2 loading."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer

import shrink
from shrink import deploy
from shrink.deploy.__main__ import main as deploy_main
from shrink.errors import ShrinkError

ROOT = Path(__file__).resolve().parents[2]


IMG = 64


REMOVE = [0, 2, 4]


ATOL = 1e-4


onnx = pytest.importorskip("onnx", reason="the deploy extra is not installed (pip install -e '.[deploy]')")


pytest.importorskip("onnxscript", reason="the deploy extra is not installed")


def _deit_tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("deit_tiny_patch16_224", img_size=IMG).eval()


def _small_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2, num_classes=5).eval()


def _x(batch: int, size=(3, IMG, IMG), seed: int = 7) -> torch.Tensor:
    return torch.randn(batch, *size, generator=torch.Generator().manual_seed(seed))


def _eager(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def _ort(path: Path, x: torch.Tensor) -> torch.Tensor:
    s = deploy.load_onnx_session(path, providers=["CPUExecutionProvider"], threads=1)
    return torch.from_numpy(s.run(None, {"input": x.numpy()})[0])


def _diluted_at_zero(model: torch.nn.Module) -> torch.nn.Module:
    shrink.dilute(model, REMOVE, lam=0.0)  # still DilutedBlocks; prepare_model exports them
    return model


# the models of the issue, on random-initialised DeiT-T: name -> (base model, prepare_model kwargs)
_CASES = {
    "dense": (_deit_tiny, {}),
    "diluted0": (lambda: _diluted_at_zero(_deit_tiny()), {}),
    "diluted0_folded": (lambda: _diluted_at_zero(_deit_tiny()), {"fold": True}),
    "diluted0_tome": (lambda: _diluted_at_zero(_deit_tiny()), {"tome_r": 2, "tome_start_idx": 1}),
}


def _case(name: str) -> tuple[torch.nn.Module, dict]:
    """The model of one case, built fresh (only that one), and its prepare_model kwargs."""
    build, kw = _CASES[name]
    return build(), kw


@pytest.fixture(scope="module")
def onnx_exports(tmp_path_factory):
    """Each case exported once to ONNX (batch dynamic, example batch 2); (eager model, path, metadata)."""
    out = {}
    d = tmp_path_factory.mktemp("onnx")
    for name in _CASES:
        model, kw = _case(name)
        path = d / f"{name}.onnx"
        meta = deploy.deploy(model, path, "onnx", batch_size=2, **kw)
        out[name] = (deploy.prepare_model(model, **kw), path, meta)
    return out


@pytest.mark.parametrize("name", ["dense", "diluted0", "diluted0_folded", "diluted0_tome"])
def test_onnx_runtime_equals_eager(onnx_exports, name):
    model, path, meta = onnx_exports[name]
    for batch in (1, 3):  # dynamic batch: other sizes than the traced one
        x = _x(batch)
        got, ref = _ort(path, x), _eager(model, x)
        assert got.shape == ref.shape == (batch, 1000)
        assert (got - ref).abs().max().item() <= ATOL
    assert meta["verified"]["max_abs_diff"] <= ATOL
    assert meta["batch"]["dynamic"] is True


def test_onnx_graph_has_no_attention_in_removed_layers(onnx_exports):
    pruned = onnx.load(str(onnx_exports["diluted0"][1]))
    found = deploy.attention_nodes(pruned)
    assert not any(found.get(i) for i in REMOVE)
    assert all(found.get(i) for i in range(12) if i not in REMOVE)  # the kept blocks still have theirs
    deploy.check_attention_free(pruned, REMOVE)
    # the same check fails on the dense graph: it really looks at the removed layers
    dense = onnx.load(str(onnx_exports["dense"][1]))
    assert all(any(op.startswith("Softmax") for op in deploy.attention_nodes(dense, REMOVE)[i]) for i in REMOVE)
    with pytest.raises(ShrinkError, match="blocks.0"):
        deploy.check_attention_free(dense, REMOVE)
    # a smaller file: the qkv and proj weights of three blocks are gone (small tensors such as the
    # all-ones LayerNorm weights of a random init are shared by the optimiser, so compare the big ones)
    blk = _deit_tiny().blocks[0].attn
    big = 4 * len(REMOVE) * (blk.qkv.weight.numel() + blk.proj.weight.numel())
    saved = onnx_exports["dense"][1].stat().st_size - onnx_exports["diluted0"][1].stat().st_size
    assert big <= saved < big * 1.1


def test_folded_and_tome_graphs(onnx_exports):
    _, _, folded = onnx_exports["diluted0_folded"]
    assert folded["folded"] is True and folded["removed_attention_layers"] == REMOVE
    model, path, meta = onnx_exports["diluted0_tome"]
    assert meta["tome"]["r"] == 2 and meta["tome"]["start_idx"] == 1
    assert meta["tome"]["tokens_per_block"] == shrink.tome_token_counts(model, (3, IMG, IMG))
    assert meta["tome"]["tokens_per_block"][-1] < 17  # tokens really merge
    deploy.check_attention_free(onnx.load(str(path)), REMOVE)


def test_onnx_metadata_inside_and_sidecar(onnx_exports):
    _, path, meta = onnx_exports["diluted0_tome"]
    inside = deploy.read_metadata(path)
    side = json.loads(Path(str(path) + ".json").read_text())
    assert inside == side == meta
    cfg = timm.data.resolve_data_config({}, model=_deit_tiny())
    assert meta["schema"] == deploy.SCHEMA and meta["format"] == "onnx"
    assert meta["input_size"] == [3, IMG, IMG] and meta["num_classes"] == 1000
    assert meta["mean"] == list(cfg["mean"]) and meta["std"] == list(cfg["std"])
    assert meta["interpolation"] == cfg["interpolation"]
    proto = onnx.load(str(path))
    assert [i.name for i in proto.graph.input] == ["input"] and proto.graph.output[0].name == "logits"
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


@pytest.mark.parametrize("name", ["dense", "diluted0_folded", "diluted0_tome"])
def test_exported_program_equals_eager(tmp_path, name):
    model, kw = _case(name)
    path = tmp_path / "m.pt2"
    meta = deploy.deploy(model, path, "pt2", batch_size=2, **kw)
    ep, inside = deploy.load_program(path)
    assert inside == meta == json.loads(Path(str(path) + ".json").read_text())
    prepared = deploy.prepare_model(model, **kw)
    for batch in (1, 3):
        x = _x(batch)
        assert (ep.module()(x) - _eager(prepared, x)).abs().max().item() <= ATOL


def test_static_batch(tmp_path):
    small = _small_vit()
    shrink.dilute(small, [1], lam=0.0)
    model = deploy.prepare_model(small, tome_r=2)
    ep = deploy.export_program(model, batch_size=3, dynamic_batch=False)
    x = _x(3, (3, 16, 16))
    assert (ep.module()(x) - _eager(model, x)).abs().max().item() <= ATOL
    with pytest.raises(Exception):  # noqa: B017 - torch's guard error type varies by version
        ep.module()(_x(2, (3, 16, 16)))


def test_tome_stable_sort_ties_match_onnx(tmp_path):
    """ToMe breaks ties by position (stable sort); the exported TopK must order ties the same way."""
    class Sort(torch.nn.Module):
        def forward(self, x):
            x = x.flatten(1)
            return torch.cat([x.argsort(dim=-1, descending=True, stable=True), x.argsort(dim=-1, stable=True)], 1)

    x = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0, 1.0, 1.0, 5.0]]).view(2, 1, 1, 7)
    proto = deploy.to_onnx(Sort(), input_size=(1, 1, 7), batch_size=2)
    s = deploy.load_onnx_session(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = s.run(None, {s.get_inputs()[0].name: x.numpy()})
    assert torch.equal(torch.from_numpy(got), Sort()(x))


def test_prepare_model_refuses_live_lambda_and_leaves_input_alone():
    model = _deit_tiny()
    shrink.dilute(model, [1], lam=0.5)
    with pytest.raises(ShrinkError, match="lambda"):
        deploy.prepare_model(model)
    dense = _deit_tiny()
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    shrink.dilute(dense, REMOVE, lam=0.0)
    prepared = deploy.prepare_model(dense, fold=True, tome_r=2)
    assert shrink.attention_free_indices(prepared) == REMOVE
    assert isinstance(dense.blocks[0], shrink.DilutedBlock) and not shrink.merging.patch.is_tome(dense)
    assert all(torch.equal(before[k], v) for k, v in dense.state_dict().items() if k in before)


def _digits_pruned(tmp_path: Path) -> Path:
    model = shrink.create_model("vit_digits", pretrained=True).eval()
    shrink.dilute(model, REMOVE, lam=0.0)
    return shrink.save(shrink.export(model), tmp_path / "best")


def test_digits_model_cli_onnx_and_pt2(tmp_path, capsys):
    best = _digits_pruned(tmp_path)
    loaded = shrink.load(best)
    x = _x(5, (1, 8, 8))
    assert deploy_main(["--checkpoint", str(best), "--tome-r", "2", "--tome-start-idx", "1", "--batch-size", "4"]) == 0
    assert "wrote" in capsys.readouterr().out
    onnx_path = tmp_path / "deploy" / "best.onnx"  # the default: DIR/deploy/NAME.onnx
    meta = deploy.read_metadata(onnx_path)
    assert meta["num_classes"] == 10 and meta["input_size"] == [1, 8, 8] and meta["mean"] == [0.5]
    assert meta["interpolation"] == "nearest" and meta["removed_attention_layers"] == REMOVE
    tome_model = deploy.prepare_model(loaded, tome_r=2, tome_start_idx=1)
    assert (_ort(onnx_path, x) - _eager(tome_model, x)).abs().max().item() <= ATOL
    deploy.check_attention_free(onnx_path, REMOVE)

    assert deploy_main(["--checkpoint", str(best), "--format", "pt2", "--fold", "-q"]) == 0
    ep, meta = deploy.load_program(tmp_path / "deploy" / "best.pt2")
    assert meta["folded"] is True
    folded = deploy.prepare_model(loaded, fold=True)
    assert (ep.module()(x) - _eager(folded, x)).abs().max().item() <= ATOL


@pytest.mark.slow
def test_main_lambda_best_exports(tmp_path):
    """A short main_lambda.py run; its best/ (attention-free) exports to ONNX with equal outputs, into the
    run's deploy/ folder, and the run still resumes afterwards."""
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "main_lambda.py", "--remove-layers", "0,2,4", "--epochs", "2", "--dilution-epochs", "1",
           "--calib-images", "64", "--no-progress", "--output-dir", str(out)]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, capture_output=True, timeout=600)
    r = subprocess.run([sys.executable, "-m", "shrink.deploy", "--checkpoint", str(out / "best")], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    loaded = shrink.load(out / "best")
    x = _x(3, (1, 8, 8))
    assert (_ort(out / "deploy" / "best.onnx", x) - _eager(loaded, x)).abs().max().item() <= ATOL
    deploy.check_attention_free(out / "deploy" / "best.onnx", shrink.attention_free_indices(loaded))
    assert shrink.attention_free_indices(loaded) == REMOVE
    r = subprocess.run(cmd + ["--resume"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr


def _cli_error(args: list[str], capsys) -> str:
    assert deploy_main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def test_cli_errors(tmp_path, capsys):
    best = tmp_path / "best"
    best.mkdir()
    assert "not found" in _cli_error(["--checkpoint", str(tmp_path / "nope")], capsys)
    assert "--checkpoint" in _cli_error([], capsys)
    assert ".pt2" in _cli_error(["--checkpoint", str(best), "--format", "pt2", "--output", str(tmp_path / "x.onnx")],
                                capsys)
    (tmp_path / "deploy").mkdir()
    (tmp_path / "deploy" / "best.onnx").write_text("old")
    assert "--overwrite" in _cli_error(["--checkpoint", str(best)], capsys)
    assert (tmp_path / "deploy" / "best.onnx").read_text() == "old"
    assert "--batch-size" in _cli_error(["--model", "deit_tiny_patch16_224", "--output", str(tmp_path / "m.onnx"),
                                         "--batch-size", "0"], capsys)
    assert "--tome-r" in _cli_error(["--model", "deit_tiny_patch16_224", "--output", str(tmp_path / "m.onnx"),
                                     "--tome-start-idx", "1"], capsys)
    assert "--output" in _cli_error(["--model", "deit_tiny_patch16_224"], capsys)
    assert "opset" in _cli_error(["--model", "deit_tiny_patch16_224", "--output", str(tmp_path / "m.onnx"),
                                  "--opset", "11"], capsys)
    assert "config.json" in _cli_error(["--checkpoint", str(best), "--overwrite"], capsys)  # empty dir
    assert "out of range" in _cli_error(["--model", "deit_tiny_patch16_224", "--remove-layers", "0,99",
                                       "--output", str(tmp_path / "m.onnx")], capsys)
    assert not (tmp_path / "m.onnx").exists() and not (tmp_path / "m.onnx.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best", "deploy"]  # no temp files left
    assert [p.name for p in (tmp_path / "deploy").iterdir()] == ["best.onnx"]


def _fake_run(tmp_path: Path) -> Path:
    """A run's folder as main_lambda.py leaves it (config.yaml, metrics, state/), with a pruned best/."""
    run = tmp_path / "run"
    (run / "state").mkdir(parents=True)
    (run / "config.yaml").write_text("model: vit_digits\nepochs: 2\noutput_dir: run\n")
    (run / "metrics.jsonl").write_text("{}\n")
    _digits_pruned(run)
    return run


@pytest.mark.parametrize("fmt", ["onnx", "pt2"])
def test_deploying_a_runs_best_keeps_the_run_resumable(tmp_path, fmt):
    """Issue 20: RUN/best.onnx beside best/ made --resume refuse the run ("files no shrink run wrote")."""
    from shrink.training.run_folder import inspect_output_dir

    run = _fake_run(tmp_path)
    assert deploy_main(["--checkpoint", str(run / "best"), "--format", fmt, "-q", "--no-verify"]) == 0
    assert sorted(p.name for p in (run / "deploy").iterdir()) == [f"best.{fmt}", f"best.{fmt}.json"]
    assert inspect_output_dir(str(run), resume=True).started


def test_explicit_output_into_a_run_is_refused(tmp_path, capsys):
    run = _fake_run(tmp_path)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    err = _cli_error(["--checkpoint", str(run / "best"), "--output", str(run / "best.onnx")], capsys)
    assert "inside the run folder" in err and "deploy" in err
    err = _cli_error(["--checkpoint", str(run / "best"), "--output", str(run / "last" / "m.pt2"), "--format", "pt2"],
                     capsys)
    assert "inside the run folder" in err
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


def test_a_failed_export_leaves_no_empty_deploy_folder(tmp_path, capsys):
    """A format whose writer fails after making the folder (registered for the test, as a user would)."""
    best = _digits_pruned(tmp_path)

    @deploy.register_format("failing")
    def fail(model, out, **kw):  # as a writer fails after atomic_write made the folder
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        raise ShrinkError("export failed")

    try:
        assert "export failed" in _cli_error(["--checkpoint", str(best), "--format", "failing"], capsys)
    finally:
        deploy.unregister_format("failing")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


class _DiffersWhenExported(VisionTransformer):
    """A model whose exported graph computes something else than eager PyTorch (a real export bug's shape)."""

    def forward(self, x):
        y = super().forward(x)
        return y * 0 if torch.compiler.is_exporting() else y


def test_failed_verification_leaves_nothing(tmp_path):
    torch.manual_seed(0)
    model = _DiffersWhenExported(img_size=16, patch_size=4, embed_dim=32, depth=3, num_heads=2, num_classes=5).eval()
    for fmt in ("onnx", "pt2"):
        with pytest.raises(ShrinkError, match="differs from eager"):
            deploy.deploy(model, tmp_path / f"m.{fmt}", fmt)
    assert list(tmp_path.iterdir()) == []


def test_missing_extra_is_one_line(monkeypatch, capsys, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    with pytest.raises(ShrinkError, match=r"pip install -e \"\.\[deploy\]\""):
        deploy.require_deploy_extra()
    err = _cli_error(["--model", "deit_tiny_patch16_224", "--output", str(tmp_path / "m.onnx")], capsys)
    assert "onnxruntime" in err and "[deploy]" in err


def test_import_shrink_does_not_import_onnx():
    code = "import sys, shrink; import shrink.deploy; print(any(m in sys.modules for m in ('onnx', 'onnxruntime', 'onnxscript')))"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "False"
    # python -m shrink.deploy: one error line, no runpy warning about a module imported twice
    r = subprocess.run([sys.executable, "-m", "shrink.deploy", "--checkpoint", "/nonexistent/best"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr == "error: checkpoint not found: /nonexistent/best\n"


def test_pt2_with_pickled_payload_is_refused(tmp_path):
    ep = torch.export.export(torch.nn.Linear(2, 2).eval(), (torch.randn(1, 2),))
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    bad = tmp_path / "bad.pt2"
    with zipfile.ZipFile(bad, "w") as z:
        for item in src.infolist():
            data = src.read(item.filename)
            if item.filename.endswith("_weights_config.json"):
                cfg = json.loads(data)
                for entry in cfg["config"].values():
                    entry["use_pickle"] = True
                data = json.dumps(cfg).encode()
            z.writestr(item, data)
    with pytest.raises(ShrinkError, match="pickled"):
        deploy.load_program(bad)
    ok = tmp_path / "ok.pt2"
    ok.write_bytes(buf.getvalue())
    loaded, meta = deploy.load_program(ok)
    x = torch.randn(1, 2)
    assert torch.equal(loaded.module()(x), ep.module()(x)) and meta == {}


def test_a_registered_format_is_written_by_deploy(tmp_path):
    @deploy.register_format("state")
    def write_state(model, path, *, input_size, batch_size, dynamic_batch, verify):
        torch.save(model.state_dict(), path)
        return {"format": "state", "keys": len(model.state_dict())}

    try:
        assert "state" in deploy.FORMATS
        model = shrink.dilute(_small_vit(), [0], lam=0.0)
        meta = deploy.deploy(model, tmp_path / "m.state", "state", opset=18)  # opset: not its option, ignored
        saved = torch.load(tmp_path / "m.state", weights_only=True)
        assert meta["keys"] == len(saved)
        assert not any(k.startswith("blocks.0.attn.") for k in saved)  # the prepared (exported) model
    finally:
        deploy.unregister_format("state")
    assert "state" not in deploy.FORMATS


def test_an_unknown_format_is_one_line(tmp_path):
    with pytest.raises(ShrinkError) as e:
        deploy.deploy(_small_vit(), tmp_path / "m.tflite", "tflite")
    assert str(e.value) == "unknown format 'tflite'; choose one of onnx, pt2"
