"""main_lambda.py end to end: the embedded default, DDP, kill + resume, the best rule, bad input."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import main_lambda
import shrink
from shrink import train as train_mod
from shrink.config import RunConfig
from shrink.dilution import lambda_reference

ROOT = Path(__file__).resolve().parents[1]
SHORT = ["--epochs", "4", "--dilution-epochs", "2", "--calib-images", "128", "--no-progress"]


def _env(threads: int = 1) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    env.pop("ACCELERATE_USE_CPU", None)
    return env


def _run(args: list[str], timeout: float = 600, threads: int = 1) -> subprocess.CompletedProcess:
    """Run a command in its own process group; on timeout the whole group (launcher + workers) dies."""
    proc = subprocess.Popen(args, cwd=ROOT, env=_env(threads), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"{' '.join(args[:6])} ... did not finish in {timeout} s")
    return subprocess.CompletedProcess(args, proc.returncode, out, err)


def _accelerate(n: int) -> list[str]:
    """`accelerate launch` for n CPU processes. Accelerate's `--cpu` flag always takes its single-process
    launcher (several CPU processes go through MPI), so n > 1 uses `--multi_gpu`, i.e. torchrun + gloo,
    which on a machine without GPUs runs CPU DDP."""
    mode = ["--multi_gpu"] if n > 1 else ["--cpu"]
    return [sys.executable, "-m", "accelerate.commands.launch", *mode, "--num_processes", str(n),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def _metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]


def _files(out: Path) -> set[str]:
    return {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and "state" not in p.parts}


# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_embedded_default(tmp_path):
    """`accelerate launch main_lambda.py --remove-ratio 0.4` with no other flag (output dir aside)."""
    out = tmp_path / "embedded"
    t0 = time.perf_counter()
    res = _run(_accelerate(1) + ["main_lambda.py", "--remove-ratio", "0.4", "--output-dir", str(out),
                                 "--no-progress"])
    seconds = time.perf_counter() - t0
    assert res.returncode == 0, res.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    print(f"embedded default: {seconds:.0f} s wall, dense {s['dense_acc']:.2f}, deployable {s['deploy_acc_best']:.2f}")
    assert len(s["removed_layers"]) == 5 and s["criterion"] == "transfer_entropy"
    assert s["deploy_acc_best"] >= s["dense_acc"] - 1.0
    assert s["best_acc_reloaded"] == pytest.approx(s["deploy_acc_best"])
    assert s["params_deploy"] < s["params_dense"]
    for name in ("config.yaml", "metrics.jsonl", "metrics.png", "summary.json", "best/model.safetensors",
                 "best/config.json", "last/model.safetensors", "state/trainer_state.json"):
        assert (out / name).is_file(), name
    rows = _metrics(out)
    assert [r["epoch"] for r in rows] == list(range(40))
    assert rows[-1]["lambda"] == 0.0 and rows[0]["lambda"] == 1.0
    assert "best deployable top-1" in res.stdout and "[" in res.stdout
    best = shrink.load(out / "best")
    assert shrink.attention_free_indices(best) == sorted(s["removed_layers"])


@pytest.mark.slow
def test_ddp_two_processes_matches_single_process_outputs(tmp_path):
    args = ["main_lambda.py", "--remove-layers", "0,2,4", *SHORT]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    r1 = _run([sys.executable, *args, "--output-dir", str(single)])
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = _run(_accelerate(2) + [*args, "--output-dir", str(ddp)])
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert _files(single) == _files(ddp)
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (single, ddp))
    assert s1.keys() == s2.keys() and s2["num_processes"] == 2 and s1["num_processes"] == 1
    m1, m2 = _metrics(single), _metrics(ddp)
    assert [r.keys() for r in m1] == [r.keys() for r in m2]
    assert [r["lambda"] for r in m2] == [1.0, 0.5, 0.0, 0.0]  # the lambda = 0 phase ran under DDP
    for row in m2:  # every val image counted once by the 2 processes, also after the phase switch
        assert round(row["acc"] * 360 / 100, 6).is_integer()
    assert s2["removed_layers"] == [0, 2, 4]
    assert not list(ddp.glob(".*.tmp")) and not list(ddp.glob(".*.old"))


@pytest.mark.slow
def test_sigkill_then_resume(tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "main_lambda.py", "--remove-layers", "1,3", "--epochs", "8", "--dilution-epochs", "4",
            "--no-progress", "--output-dir", str(out)]
    proc = subprocess.Popen(args, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline:
        if (out / "metrics.jsonl").exists() and len(_metrics(out)) >= 3:
            break
        if proc.poll() is not None:
            pytest.fail(f"run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(_metrics(out))
    assert 3 <= done < 8, "the run must be killed mid-training"
    # whatever was on disk at the kill is whole
    for f in out.rglob("*.json"):
        json.loads(f.read_text())
    load_file(str(out / "best" / "model.safetensors"))
    res = _run([sys.executable, "main_lambda.py", "--resume", "--output-dir", str(out), "--no-progress"])
    assert res.returncode == 0, res.stderr[-3000:]
    rows = _metrics(out)
    assert [r["epoch"] for r in rows] == list(range(8))
    expected = [lambda_reference(e, 4) for e in range(8)]
    assert [r["lambda"] for r in rows] == pytest.approx(expected)
    s = json.loads((out / "summary.json").read_text())
    assert s["best_acc_reloaded"] == pytest.approx(s["deploy_acc_best"])
    assert shrink.attention_free_indices(shrink.load(out / "best")) == [1, 3]
    assert not list(out.glob(".*.tmp")) and not list(out.glob(".*.old"))


def test_best_is_the_best_deployable_model(tmp_path, monkeypatch):
    """Accuracy at the current lambda peaks early, deploy accuracy late: the late epoch is best."""
    current = iter([90.0, 80.0, 70.0, 60.0, 50.0])  # dense, then epochs 0..3
    deploy = iter([10.0, 20.0, 30.0, 60.0, 40.0])   # start, then epochs 0..3

    def fake_eval(model, loader, accelerator, cfg, desc, *, deploy):
        return next(deploy_accs if deploy else current)

    deploy_accs = deploy
    monkeypatch.setattr(train_mod, "_eval", fake_eval)
    cfg = RunConfig(remove_layers=[0, 5], epochs=4, dilution_epochs=3, output_dir=str(tmp_path / "o"),
                    progress=False).validate()
    s = train_mod.run(cfg)
    assert s["best_epoch"] == 2 and s["deploy_acc_best"] == 60.0
    extra = json.loads((tmp_path / "o" / "best" / "config.json").read_text())["extra"]
    assert extra["epoch"] == 2 and extra["acc_deploy"] == 60.0
    assert shrink.attention_free_indices(shrink.load(tmp_path / "o" / "best")) == [0, 5]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    real = train_mod.build_loss
    calls = {"n": 0}

    def nan_after_first_epoch(cfg, mixup_active):
        base = real(cfg, mixup_active)

        def loss(logits, target):
            calls["n"] += 1
            value = base(logits, target)
            return value * float("nan") if calls["n"] > 22 else value
        return loss

    monkeypatch.setattr(train_mod, "build_loss", nan_after_first_epoch)
    out = tmp_path / "o"
    code = main_lambda.main(["--remove-layers", "0", "--epochs", "3", "--output-dir", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "loss is nan" in err[0]
    assert (out / "best" / "model.safetensors").is_file()
    assert json.loads((out / "state" / "trainer_state.json").read_text())["epoch"] == 0
    assert len(_metrics(out)) == 1


@pytest.mark.parametrize("argv, match", [
    (["--remove-ratio", "1.0"], "remove-ratio"),
    (["--remove-ratio", "-0.1"], "remove-ratio"),
    (["--remove-ratio", "abc"], "invalid"),
    (["--remove-layers", "0,0"], "repeated"),
    (["--remove-layers", "12"], "out of range"),
    (["--remove-layers", "1,x"], "comma-separated"),
    (["--batch-size", "0"], "batch-size"),
    (["--data-set", "folder", "--data-path", "/nonexistent/imagenet"], "not found"),
    (["--data-set", "folder"], "data-path"),
    (["--finetune", "/nonexistent/deit.pth"], "not found"),
    (["--model", "resnet18", "--remove-ratio", "0.4", "--no-pretrained"], "not a ViT"),
    (["--model", "not_a_model_name"], "unknown model"),
    (["--eval"], "checkpoint"),
])
def test_bad_input_one_line_exit_2_no_output(tmp_path, capsys, argv, match):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        sys.exit(main_lambda.main([*argv, "--output-dir", str(out), "--no-progress"]))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0], err
    assert "Traceback" not in err[0]
    assert not out.exists()


def test_unreadable_checkpoint_cli(tmp_path, capsys):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"garbage")
    out = tmp_path / "out"
    assert main_lambda.main(["--finetune", str(junk), "--output-dir", str(out), "--no-progress"]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert not out.exists()


def test_refuses_to_overwrite_a_run(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "config.yaml").write_text("model: vit_digits\n")
    (out / "summary.json").write_text("{}")
    assert main_lambda.main(["--output-dir", str(out), "--no-progress"]) == 2
    assert "--resume" in capsys.readouterr().err


def test_bad_input_subprocess_has_no_traceback(tmp_path):
    res = _run([sys.executable, "main_lambda.py", "--remove-ratio", "1.5", "--output-dir", str(tmp_path / "o")])
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "Traceback" not in res.stderr
    assert not (tmp_path / "o").exists()


def test_eval_command_with_tome(tmp_path, capsys):
    m = shrink.create_model("vit_digits", pretrained=True)
    shrink.dilute(m, [0, 2], lam=0.0)
    shrink.save(shrink.export(m), tmp_path / "best")
    code = main_lambda.main(["--eval", "--checkpoint", str(tmp_path / "best"), "--tome-r", "2",
                             "--tome-start-idx", "1", "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    assert "top-1 with ToMe r=2" in out
    # 17 tokens; blocks 0 and 2 have no attention; ToMe starts at the 2nd attention block (block 3)
    # r is capped at half the unprotected tokens: 16 -> 14 -> ... -> 4 -> 2 -> 1 -> 1
    assert "[17, 17, 17, 15, 13, 11, 9, 7, 5, 3, 2, 2]" in out


def test_configs_parse():
    from shrink.config import load_yaml

    for path in sorted((ROOT / "configs").glob("*.yaml")):
        cfg = RunConfig(**load_yaml(path))
        assert cfg.epochs > 0, path
    deit = RunConfig(**load_yaml(ROOT / "configs" / "deit_base_40.yaml"))
    assert deit.remove_layers == [0, 1, 3, 4, 6] and deit.epochs == 400 and deit.dilution_epochs == 299
    assert deit.lr is None and deit.batch_size == 256


def test_help_explains_flags(capsys):
    with pytest.raises(SystemExit) as e:
        main_lambda.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--remove-ratio", "--remove-layers", "--finetune", "--resume", "--tome-r", "--lambda-schedule"):
        assert flag in text



def _image_folder(root: Path, classes=("cat", "dog"), per_class=6, size=40) -> Path:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for ci, c in enumerate(classes):
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                px = (torch.rand(size, size, 3, generator=g) * 80 + ci * 150).clamp(0, 255).to(torch.uint8)
                Image.fromarray(px.numpy()).save(root / split / c / f"{i}.png")
    return root


def test_image_folder_with_deit_pth_finetune(tmp_path):
    """Real-use path on stand-ins: ImageNet-style folders + a DeiT-format .pth (224 px, 1000 classes)."""
    data = _image_folder(tmp_path / "imgs")
    deit = shrink.create_model("deit_tiny_patch16_224")
    torch.save({"model": deit.state_dict(), "epoch": 299}, tmp_path / "deit_tiny.pth")
    out = tmp_path / "o"
    cfg = RunConfig(model="deit_tiny_patch16_224", finetune=str(tmp_path / "deit_tiny.pth"), data_set="folder",
                    data_path=str(data), input_size=32, batch_size=4, num_workers=0, remove_layers=[0, 2, 4],
                    epochs=2, dilution_epochs=1, mixup=0.8, cutmix=1.0, output_dir=str(out),
                    progress=False).validate()
    s = train_mod.run(cfg)
    assert s["removed_layers"] == [0, 2, 4] and s["params_deploy"] < s["params_dense"]
    best = shrink.load(out / "best")
    assert best.num_classes == 2 and best.pos_embed.shape[1] == 1 + 4  # head re-initialised, pos_embed resampled
    assert not torch.equal(best.blocks[1].attn.qkv.weight.cpu(), deit.blocks[1].attn.qkv.weight)  # trained


def test_ema_distill_repeated_aug_across_the_lambda_zero_switch(tmp_path):
    out = tmp_path / "o"
    cfg = RunConfig(remove_layers=[0, 3], epochs=2, dilution_epochs=1, model_ema=True, model_ema_decay=0.9,
                    distill=True, repeated_aug=True, output_dir=str(out), progress=False).validate()
    s = train_mod.run(cfg)
    rows = _metrics(out)
    assert [r["lambda"] for r in rows] == [1.0, 0.0]
    assert all("ema_acc_deploy" in r for r in rows)
    assert s["best_source"] in ("model", "ema")
    assert (out / "state" / "ema.safetensors").is_file()
    ema_keys = load_file(str(out / "state" / "ema.safetensors")).keys()
    assert not any(k.startswith(("blocks.0.attn.", "blocks.3.attn.")) for k in ema_keys)  # EMA exported too


def test_tracker_without_its_package_is_a_clear_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith(("tensorboard", "wandb")) else real(name, *a))
    with pytest.raises(shrink.ShrinkError, match="pip install tensorboard"):
        RunConfig(log_with="tensorboard").validate()


def test_dilution_epochs_zero_reports_the_dense_accuracy(tmp_path):
    """With lambda = 0 from the start, the dense accuracy is still the untouched model's."""
    from shrink.data import build_dataset
    from shrink.engine import evaluate

    cfg = RunConfig(remove_layers=[0, 2, 4], epochs=1, dilution_epochs=0, output_dir=str(tmp_path / "o"),
                    progress=False).validate()
    s = train_mod.run(cfg)
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    dense = shrink.create_model("vit_digits", pretrained=True)
    loader = acc.prepare(torch.utils.data.DataLoader(build_dataset("digits", "val"), batch_size=64))
    assert s["dense_acc"] == pytest.approx(evaluate(dense.to(acc.device), loader, acc, progress=False))
    assert s["deploy_acc_start"] != s["dense_acc"]
    assert [r["lambda"] for r in _metrics(tmp_path / "o")] == [0.0]


def test_reference_schedule_keeps_a_fractional_length():
    assert [lambda_reference(e, 2.5) for e in range(4)] == pytest.approx([1.0, 0.6, 0.2, 0.0])
    assert [shrink.lambda_at("reference", e, dilution_epochs=2.5) for e in range(4)] == pytest.approx(
        [1.0, 0.6, 0.2, 0.0])


def test_deit_base_configs_use_a_constant_drop_path():
    from timm.layers import DropPath

    from shrink.config import load_yaml
    from shrink.recipe import build_model

    for name in ("deit_base_40", "deit_base_50"):
        values = load_yaml(ROOT / "configs" / f"{name}.yaml")
        assert values["drop_path_schedule"] == "constant" and values["drop_path"] == 0.1
    values.update(model="deit_tiny_patch16_224", pretrained=False, data_set="synthetic", data_path=None,
                  input_size=32)
    model = build_model(RunConfig(**values), num_classes=10)
    rates = [b.drop_path1.drop_prob for b in model.blocks] + [b.drop_path2.drop_prob for b in model.blocks]
    assert all(isinstance(b.drop_path1, DropPath) for b in model.blocks) and set(rates) == {0.1}
    small = build_model(RunConfig(**{**values, "drop_path_schedule": "linear"}), num_classes=10)
    assert small.blocks[0].drop_path1.__class__.__name__ == "Identity"  # timm's ramp starts at 0
