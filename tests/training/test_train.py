"""shrink.training.trainer: whole runs (embedded default, DDP), the best rule, NaN loss, the lambda = 0 phase, fine-tuning."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import main_lambda
import shrink
from shrink.blocks.dilution import DilutedBlock
from shrink.training import state
from shrink.training import trainer as train_mod
from shrink.training.config import RunConfig
from shrink.training.loop import prepare_on_device

from ..conftest import accelerate, image_folder, metrics, run

SHORT = ["--epochs", "4", "--dilution-epochs", "2", "--calib-images", "128", "--no-progress"]


def _files(out: Path) -> set[str]:
    return {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and "state" not in p.parts}


# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_embedded_default(tmp_path):
    """`accelerate launch main_lambda.py --remove-ratio 0.4` with no other flag (output dir aside)."""
    out = tmp_path / "embedded"
    t0 = time.perf_counter()
    res = run(accelerate(1) + ["main_lambda.py", "--remove-ratio", "0.4", "--output-dir", str(out),
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
    rows = metrics(out)
    assert [r["epoch"] for r in rows] == list(range(40))
    assert rows[-1]["lambda"] == 0.0 and rows[0]["lambda"] == 1.0
    assert "best deployable top-1" in res.stdout and "[" in res.stdout
    best = shrink.load(out / "best")
    assert shrink.attention_free_indices(best) == sorted(s["removed_layers"])


@pytest.mark.slow
def test_ddp_two_processes_matches_single_process_outputs(tmp_path):
    args = ["main_lambda.py", "--remove-layers", "0,2,4", *SHORT]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    r1 = run([sys.executable, *args, "--output-dir", str(single)])
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = run(accelerate(2) + [*args, "--output-dir", str(ddp)])
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert _files(single) == _files(ddp)
    s1, s2 = (json.loads((d / "summary.json").read_text()) for d in (single, ddp))
    assert s1.keys() == s2.keys() and s2["num_processes"] == 2 and s1["num_processes"] == 1
    m1, m2 = metrics(single), metrics(ddp)
    assert [r.keys() for r in m1] == [r.keys() for r in m2]
    assert [r["lambda"] for r in m2] == [1.0, 0.5, 0.0, 0.0]  # the lambda = 0 phase ran under DDP
    for row in m2:  # every val image counted once by the 2 processes, also after the phase switch
        assert round(row["acc"] * 360 / 100, 6).is_integer()
    assert s2["removed_layers"] == [0, 2, 4]
    assert not list(ddp.glob(".*.tmp")) and not list(ddp.glob(".*.old"))


def test_best_is_the_best_deployable_model(tmp_path):
    """Accuracy at the current lambda peaks early, deploy accuracy late: the late epoch is best."""
    current = iter([90.0, 80.0, 70.0, 60.0, 50.0])  # dense, then epochs 0..3
    deploy = iter([10.0, 20.0, 30.0, 60.0, 40.0])   # start, then epochs 0..3

    class Scripted(train_mod.Trainer):
        def evaluate(self, model, desc):
            """Deploy mode is lambda = 0 in every diluted block (an attention-free model has none)."""
            diluted = [b for b in model.modules() if isinstance(b, DilutedBlock)]
            acc = next(deploy if diluted and not any(b.attn_active for b in diluted) else current, None)
            return super().evaluate(model, desc) if acc is None else acc  # the final check of best/

    cfg = RunConfig(remove_layers=[0, 5], epochs=4, dilution_epochs=3, output_dir=str(tmp_path / "o"),
                    progress=False).validate()
    s = train_mod.run(cfg, trainer=Scripted)
    assert s["best_epoch"] == 2 and s["deploy_acc_best"] == 60.0
    extra = json.loads((tmp_path / "o" / "best" / "config.json").read_text())["extra"]
    assert extra["epoch"] == 2 and extra["acc_deploy"] == 60.0
    assert shrink.attention_free_indices(shrink.load(tmp_path / "o" / "best")) == [0, 5]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, capsys):
    calls = {"n": 0}

    class NanAfterFirstEpoch(train_mod.Trainer):
        def build_loss(self, mixup_active):
            base = super().build_loss(mixup_active)

            def loss(logits, target):
                calls["n"] += 1
                value = base(logits, target)
                return value * float("nan") if calls["n"] > 22 else value
            return loss

    out = tmp_path / "o"
    code = main_lambda.main(["--remove-layers", "0", "--epochs", "3", "--output-dir", str(out), "--no-progress"],
                            trainer=NanAfterFirstEpoch)
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("WARNING ")]
    assert code == 2 and len(err) == 1 and "loss is nan" in err[0]  # (warm-up as long as the run: a warning)
    assert (out / "best" / "model.safetensors").is_file()
    assert json.loads((out / "state" / "trainer_state.json").read_text())["epoch"] == 0
    assert len(metrics(out)) == 1


def test_image_folder_with_deit_pth_finetune(tmp_path):
    """Real-use path on stand-ins: ImageNet-style folders + a DeiT-format .pth (224 px, 1000 classes)."""
    data = image_folder(tmp_path / "imgs")
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
    # what really happened is recorded (issue 20 item 12): the weights came from --finetune, the head is new
    want = {"pretrained": False, "source": "finetune", "path": str(tmp_path / "deit_tiny.pth"),
            "head_reinitialised": True}
    assert s["weights"] == want and s["pretrained"] is False
    assert json.loads((out / "best" / "config.json").read_text())["extra"]["weights"] == want
    assert any("classifier head does not fit the 2 classes" in w for w in s["warnings"]), s["warnings"]
    assert not torch.equal(best.blocks[1].attn.qkv.weight.cpu(), deit.blocks[1].attn.qkv.weight)  # trained


def test_ema_distill_repeated_aug_across_the_lambda_zero_switch(tmp_path):
    out = tmp_path / "o"
    cfg = RunConfig(remove_layers=[0, 3], epochs=2, dilution_epochs=1, model_ema=True, model_ema_decay=0.9,
                    distill=True, repeated_aug=True, output_dir=str(out), progress=False).validate()
    s = train_mod.run(cfg)
    rows = metrics(out)
    assert [r["lambda"] for r in rows] == [1.0, 0.0]
    assert all("ema_acc_deploy" in r for r in rows)
    assert s["best_source"] in ("model", "ema")
    assert (out / "state" / "ema.safetensors").is_file()
    ema_keys = load_file(str(out / "state" / "ema.safetensors")).keys()
    assert not any(k.startswith(("blocks.0.attn.", "blocks.3.attn.")) for k in ema_keys)  # EMA exported too


def test_dilution_epochs_zero_reports_the_dense_accuracy(tmp_path):
    """With lambda = 0 from the start, the dense accuracy is still the untouched model's."""
    from shrink.data.datasets import build_dataset
    from shrink.training.loop import evaluate

    cfg = RunConfig(remove_layers=[0, 2, 4], epochs=1, dilution_epochs=0, output_dir=str(tmp_path / "o"),
                    progress=False).validate()
    s = train_mod.run(cfg)
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    dense = shrink.create_model("vit_digits", pretrained=True)
    loader = acc.prepare(torch.utils.data.DataLoader(build_dataset("digits", "val"), batch_size=64))
    assert s["dense_acc"] == pytest.approx(evaluate(dense.to(acc.device), loader, acc, progress=False))
    assert s["deploy_acc_start"] != s["dense_acc"]
    assert [r["lambda"] for r in metrics(tmp_path / "o")] == [0.0]


# ------------------------------------------------------------------------------------------------
# Resume state: the bare model's keys whatever wraps it, tensors onto accelerator.device (issue 20 items 4, 7)

def _prepared_tiny(compile: bool, seed: int):
    from accelerate import Accelerator

    from ..conftest import tiny_vit

    accelerator = Accelerator(cpu=True)
    state.keep_bare_model_keys(accelerator)
    raw = tiny_vit(seed=seed).train()
    optimizer = torch.optim.AdamW(raw.parameters(), lr=1e-3)
    model, optimizer, _ = prepare_on_device(accelerator, raw, optimizer, compile=compile)
    return accelerator, raw, model


@pytest.mark.parametrize("saved_compiled", [True, False], ids=["compiled-then-eager", "eager-then-compiled"])
def test_state_resumes_across_a_change_of_compile(tmp_path, saved_compiled):
    """state/model.safetensors holds the bare model's keys (no ``_orig_mod.``), so a resume may switch
    --compile on or off (before the fix the keys followed torch.compile's wrapper and either direction failed)."""
    from safetensors import safe_open

    accelerator, raw, model = _prepared_tiny(saved_compiled, seed=0)
    assert hasattr(model, "_orig_mod") == saved_compiled  # the training model really is compiled
    state.save_state(accelerator, tmp_path, state.TrainerState(), None)
    with safe_open(str(tmp_path / "state" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys == set(raw.state_dict()), sorted(keys)[:3]

    accelerator, other, _ = _prepared_tiny(not saved_compiled, seed=1)
    assert not torch.equal(other.pos_embed, raw.pos_embed)
    state.restore_state(accelerator, tmp_path / "state", state.TrainerState(), None)
    for k, v in raw.state_dict().items():
        assert torch.equal(other.state_dict()[k], v), k


def test_state_tensors_load_onto_the_accelerator_device_and_lose_wrapper_prefixes(tmp_path):
    """A multi-process CPU run's device is ``cpu:0``, which safetensors refuses as a name (the EMA resume
    failed with 'device cpu:0 is invalid'); older states may carry torch.compile / DDP prefixes."""
    from safetensors.torch import save_file

    path = tmp_path / "ema.safetensors"
    save_file({"_orig_mod.module.w": torch.ones(2), "b": torch.zeros(1)}, str(path))
    with pytest.raises(Exception, match="cpu:0"):
        load_file(str(path), device="cpu:0")
    got = state.load_state_tensors(path, torch.device("cpu:0"))
    assert set(got) == {"w", "b"} and got["w"].device.type == "cpu" and torch.equal(got["w"], torch.ones(2))


# ------------------------------------------------------------------------------------------------
# A run that talks (issue 20 items 11, 12): one line per epoch, a warning line per silent surprise

def test_a_dilution_longer_than_the_run_is_warned_about(tmp_path, caplog):
    import logging

    cfg = RunConfig(data_set="synthetic", synthetic_images=64, remove_layers=[1], epochs=1, dilution_epochs=3,
                    warmup_epochs=0, output_dir=str(tmp_path / "o"), progress=False).validate()
    with caplog.at_level(logging.WARNING, logger="shrink.training.trainer"):
        s = train_mod.run(cfg)
    assert s["warnings"] == ["--dilution-epochs 3 >= --epochs 1: lambda never reaches 0 in this run, so the "
                             "attention-free model is never trained (best/ is the diluted model evaluated at "
                             "lambda = 0)"]
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == s["warnings"]


def test_epoch_line_names_everything_and_dashes_what_was_not_measured():
    row = {"epoch": 3, "lambda": 0.25, "lr": 0.000334, "train_loss": 0.41234, "train_acc": 88.5, "acc": 90.0,
           "acc_deploy": 85.25, "ema_acc_deploy": 86.0}
    assert train_mod.epoch_line(row, 40, "diluted", 12.34) == (
        "epoch 3/40 diluted: lambda 0.250, loss 0.4123, top-1 train 88.50 eval 90.00 deployable 85.25 ema 86.00, "
        "lr 0.000334, 12.3 s")
    skipped = {"epoch": 4, "lambda": None, "lr": 1e-3, "train_loss": 1.0, "train_acc": 50.0}  # --eval-every 2
    assert train_mod.epoch_line(skipped, 5, "dense", 1.0) == (
        "epoch 4/5 dense: lambda -, loss 1.0000, top-1 train 50.00 eval - deployable -, lr 0.001, 1.0 s")


def test_a_run_prints_each_epoch_and_warns_about_warmup_and_calibration(tmp_path, capsys, caplog):
    """--no-progress: a line per epoch on stdout; --warmup-epochs >= --epochs and --calib-images beyond
    the train split are one warning line each, kept in summary.json with the count really used."""
    import logging

    cfg = RunConfig(data_set="synthetic", synthetic_images=64, remove_ratio=0.25, calib_images=5000, epochs=2,
                    dilution_epochs=1, warmup_epochs=2, output_dir=str(tmp_path / "o"), progress=False).validate()
    with caplog.at_level(logging.WARNING, logger="shrink.training.trainer"):
        s = train_mod.run(cfg)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in lines] == ["epoch 0/2 diluted", "epoch 1/2 attention-free"], lines
    assert all("top-1 train" in line and "deployable" in line and line.endswith(" s") for line in lines)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 2 and warned == s["warnings"], warned
    assert "--warmup-epochs 2 >= --epochs 2" in warned[0] or "--warmup-epochs 2 >= --epochs 2" in warned[1]
    assert any("--calib-images 5000: the train split has 64 images" in w for w in warned)
    assert s["calib_images_used"] == 64 and s["selection"]["calib_images"] == 64
    assert s["weights"]["source"] == "pretrained" and s["pretrained"] is True
    assert all("train_acc" in r for r in metrics(tmp_path / "o"))


def test_run_applies_threads_first(tmp_path):
    """--threads reaches torch before anything is built, for training and for --eval (issue 20 item 14)."""
    seen = []

    class Stop(Exception):
        pass

    class FirstThing(train_mod.Trainer):
        def __init__(self, cfg):  # the first thing of a training run: torch has the threads already
            seen.append(torch.get_num_threads())
            raise Stop

    before = torch.get_num_threads()
    try:
        with pytest.raises(Stop):
            train_mod.run(RunConfig(threads=1, output_dir=str(tmp_path / "o"), progress=False).validate(),
                          trainer=FirstThing)
    finally:
        torch.set_num_threads(before)
    assert seen == [1] and not (tmp_path / "o").exists()


def test_pretrained_weights_for_another_class_count_warn_that_the_head_is_new(tmp_path, caplog):
    """vit_digits' shipped weights have 10 classes; --num-classes 5 gets a fresh head from timm, silently
    before (issue 20 item 12); now a warning line and summary.json / best/config.json say so."""
    import logging

    cfg = RunConfig(data_set="synthetic", synthetic_images=64, num_classes=5, epochs=1, warmup_epochs=0,
                    output_dir=str(tmp_path / "o"), progress=False).validate()
    with caplog.at_level(logging.WARNING, logger="shrink.training.trainer"):
        s = train_mod.run(cfg)
    assert s["warnings"] == ["the pretrained 10-class classifier head does not fit the 5 classes of the data: it "
                             "starts re-initialised (head)"]
    assert s["weights"]["source"] == "pretrained" and s["weights"]["head_reinitialised"] is True
    assert json.loads((tmp_path / "o" / "best" / "config.json").read_text())["extra"]["weights"] == s["weights"]


def test_a_state_saved_with_compiles_wrapper_keys_still_resumes(tmp_path):
    """States written before the fix carry ``_orig_mod.`` keys; they load into the bare model too."""
    from safetensors.torch import save_file

    accelerator, raw, _ = _prepared_tiny(False, seed=0)
    state.save_state(accelerator, tmp_path, state.TrainerState(), None)
    path = tmp_path / "state" / "model.safetensors"
    save_file({f"_orig_mod.{k}": v.contiguous() for k, v in load_file(str(path)).items()}, str(path))
    accelerator, other, _ = _prepared_tiny(True, seed=1)
    state.restore_state(accelerator, tmp_path / "state", state.TrainerState(), None)
    for k, v in raw.state_dict().items():
        assert torch.equal(other.state_dict()[k], v), k
