"""Merging during training (issue 21 item 4): --tome-train / --tome-r in a training run.

The settings are checked in one line; a run with --tome-train merges in every forward (train and every
evaluation, the EMA too), logs the token counts, saves best/ and last/ as plain models with the settings
recorded, and `--eval --checkpoint best` with those settings gives the run's accuracy; a run killed
mid-way resumes to the uninterrupted run's weights and metrics. Tiny runs: vit_digits on 64 synthetic
images, one torch thread.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import main_lambda
import shrink
from shrink.blocks.contract import get_blocks
from shrink.blocks.dilution import deploy_mode, dilute, set_lambda
from shrink.cli.run_flags import config_from_args
from shrink.errors import ShrinkError
from shrink.merging.patch import apply_tome, is_tome, tome_info, tome_token_counts
from shrink.training import trainer as train_mod
from shrink.training.config import RunConfig, tome_r_arg, tome_schedule_for
from shrink.unwrap import unwrap

from ..conftest import metrics, run, tiny_vit

# vit_digits: 12 blocks, 16 patches + class token; blocks 1 and 3 lose their attention. ToMe r = 2 merges
# in every block (policy hidden: the attention-free ones too), capped at half the patches left. The
# removed blocks merge on their keys while diluted and on norm2(x) once attention-free, so a block
# that stopped merging at the switch would show in the counts.
RUN = ["--remove-layers", "1,3", "--epochs", "3", "--dilution-epochs", "2", "--warmup-epochs", "0",
       "--data-set", "synthetic", "--synthetic-images", "64", "--batch-size", "16", "--num-workers", "0",
       "--model-ema", "--model-ema-decay", "0.9", "--tome-r", "2", "--tome-policy", "hidden", "--tome-train",
       "--threads", "1", "--no-progress"]
R_PER_BLOCK = [2] * 12
TOKENS = [15, 13, 11, 9, 7, 5, 3, 2, 2, 2, 2, 2]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)  # the runs below set 1 thread (--threads 1) in this process


# ------------------------------------------------------------------------------------------------
# Settings

def _yaml(tmp_path: Path, text: str) -> str:
    (tmp_path / "c.yaml").write_text(text)
    return str(tmp_path / "c.yaml")


@pytest.mark.parametrize("argv, yaml_text, match", [
    (["--tome-train"], None, "--tome-train merges tokens while training: give --tome-r > 0"),
    (["--tome-train", "--tome-r", "0"], None, "give --tome-r > 0"),
    (["--tome-r", "-1"], None, "--tome-r must be an integer from 0"),
    (["--tome-r", "1", "--tome-inflection", "1.5"], None, "--tome-inflection must be in [-1, 1], got 1.5"),
    (["--tome-r", "1", "--tome-inflection", "nan"], None, "--tome-inflection"),
    (["--tome-r", "1", "--tome-inflection", "-1.01", "--tome-train"], None, "--tome-inflection must be in [-1, 1]"),
    (["--tome-r", "2", "--remove-ratio", "0.4", "--tome-start-idx", "7"], None,
     "--tome-r 2 (on the deployable model, 5 attention layer(s) removed): start_idx=7 but the model has only 7 "
     "attention blocks"),
    (["--tome-r", "2", "--remove-layers", "0,1,2,3,4,5,6,7,8,9,10,11"], None, "policy='none'"),
    (["--tome-r", "1", "--model", "mixer_s16_224", "--no-pretrained", "--tome-train"], None, "not supported by ToMe"),
    ([], "tome_train: 'yes'\ntome_r: 1\n", "tome_train: expected true or false, got 'yes'"),
    (["--tome-r", "1"], "tome_inflection: true\n", "tome_inflection must be a number"),
    ([], "tome_r: 1.5\ntome_train: true\n", "tome_r must be an integer"),
], ids=["train-without-r", "train-r0", "negative-r", "inflection-1.5", "inflection-nan", "inflection-below",
        "start-past-the-deployable-blocks", "nothing-left-to-merge", "mlp-family", "yaml-train-string",
        "yaml-inflection-bool", "yaml-r-float"])
def test_bad_tome_settings_are_one_line_errors_before_any_file(tmp_path, capsys, argv, yaml_text, match):
    if yaml_text is not None:
        argv = ["--config", _yaml(tmp_path, yaml_text), *argv]
    out = tmp_path / "out"
    try:
        code = main_lambda.main([*argv, "--output-dir", str(out), "--no-progress"])
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and match in err[0], err
    assert "Traceback" not in err[0] and not out.exists()


def test_a_planner_yaml_is_accepted_for_training_and_for_eval(tmp_path, caplog):
    """The planner's keys (no tome_train): a training run records them and reports merging at every eval;
    --eval applies them; tome settings with r = 0 are ignored with a warning line."""
    plan = _yaml(tmp_path, "remove_layers: [8, 6, 10, 4, 2]\ntome_r: 2\ntome_inflection: -0.5\ntome_start_idx: 1\n"
                           "tome_policy: none\n")
    cfg = config_from_args(["--config", plan, "--output-dir", str(tmp_path / "o")])
    assert (cfg.remove_layers, cfg.tome_r, cfg.tome_inflection, cfg.tome_start_idx, cfg.tome_train) == \
        ([8, 6, 10, 4, 2], 2, -0.5, 1, False)
    assert tome_r_arg(cfg) == (2, -0.5) and tome_r_arg(RunConfig(tome_r=3)) == 3
    m = shrink.create_model("vit_digits", pretrained=False)
    # the ramp over the 6 merging blocks of the deployable model (attention blocks 0, 1, 3, 5, 7, 9, 11; from the
    # 2nd): lo = int(2 * 1.5) = 3, hi = 1, int(3 - 0.4 i)
    assert tome_schedule_for(cfg, m, cfg.remove_layers) == [0, 3, 0, 2, 0, 2, 0, 1, 0, 1, 0, 1]
    best = tmp_path / "best"
    shrink.save(m, best)
    cfg = config_from_args(["--eval", "--checkpoint", str(best), "--config", _yaml(tmp_path, "tome_r: 2\n"
                            "tome_inflection: -0.5\ntome_start_idx: 1\ntome_policy: hidden\ntome_train: true\n")])
    assert cfg.eval and cfg.tome_policy == "hidden"
    with caplog.at_level("WARNING"):
        config_from_args(["--tome-start-idx", "3", "--output-dir", str(tmp_path / "o")])
    assert "--tome-start-idx is ignored: --tome-r is 0 (no token merging)" in caplog.text


@pytest.mark.parametrize("policy, inflection", [("none", 0.0), ("hidden", -0.5)])
def test_the_runs_schedule_on_the_diluted_model_is_evals_schedule_on_the_exported_one(policy, inflection):
    """The run merges the diluted model with the deployable model's r per block; in deploy mode that is
    the exported model under `apply_tome(r, start_idx, policy)` (what --eval does), within 1e-5; and
    the copy best/ gets is plain."""
    cfg = RunConfig(tome_r=2, tome_start_idx=1, tome_policy=policy, tome_inflection=inflection)
    model = tiny_vit(depth=6)
    dilute(model, [1, 3])
    set_lambda(model, 0.5)
    schedule = tome_schedule_for(cfg, model, [1, 3])
    apply_tome(model, schedule, policy=policy)
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with deploy_mode(model), torch.no_grad():
        merged_train = model(x)
        counts = tome_token_counts(model)
    small = train_mod.deployable(model)
    assert not is_tome(small) and not any("ToMe" in type(b).__name__ for b in small.modules())
    assert shrink.attention_free_indices(small) == [1, 3] and is_tome(model)
    apply_tome(small, tome_r_arg(cfg), cfg.tome_start_idx, cfg.tome_policy)
    assert tome_info(small)["schedule"] == schedule and tome_token_counts(small) == counts
    assert counts[-1] < 16  # it merges
    with torch.no_grad():
        assert (small(x) - merged_train).abs().max() <= 1e-5


def test_compiled_merging_trains_like_eager():
    """--compile with merging: torch.compile traces the ToMe blocks (dynamo; the eager backend keeps the
    test fast, inductor was checked by hand) and gives the eager loss and gradients."""
    torch.manual_seed(0)
    eager, comp = tiny_vit(depth=3).train(), tiny_vit(depth=3).train()
    for m in (eager, comp):
        dilute(m, [1])
        apply_tome(m, [1, 0, 2])
    compiled = torch.compile(comp, backend="eager")
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    for m in (eager, compiled):
        m(x).square().mean().backward()
    for (name, p), q in zip(eager.named_parameters(), comp.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), name


def test_gradient_checkpointing_with_merging_is_one_line():
    model = tiny_vit(depth=2).train()
    apply_tome(model, 1)
    model.set_grad_checkpointing(True)
    with pytest.raises(ShrinkError) as e:
        model(torch.randn(2, 3, 16, 16))
    assert "gradient checkpointing" in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------
# A run with --tome-train, its best/ and --eval

@pytest.fixture(scope="module")
def tome_run(tmp_path_factory):
    """The uninterrupted run, with the tokens after each block in every forward of training and evaluation."""
    out = tmp_path_factory.mktemp("tome") / "run"
    seen: list[tuple[str, list[int]]] = []

    def watch(model, what: str):
        blocks = get_blocks(unwrap(model))

        def first(_m, _i, o):
            seen.append((what, [int(o.shape[1])]))

        def later(_m, _i, o):
            seen[-1][1].append(int(o.shape[1]))

        return [b.register_forward_hook(first if i == 0 else later) for i, b in enumerate(blocks)]

    def unhook(hooks):
        for h in hooks:
            h.remove()

    class Watched(train_mod.Trainer):
        hooks: list = []

        def train_epoch(self, epoch):
            self.hooks = watch(self.parts.raw, "train")
            try:
                return super().train_epoch(epoch)
            finally:
                unhook(self.hooks)

        def switch_to_attention_free(self, epoch):
            # the blocks of the diluted model are replaced by exported ones: hook both phases
            super().switch_to_attention_free(epoch)
            unhook(self.hooks)
            self.hooks = watch(self.parts.raw, "train")

        def evaluate(self, model, desc):
            hooks = watch(model, desc.split(" ")[0])
            try:
                return super().evaluate(model, desc)
            finally:
                unhook(hooks)

    summary = train_mod.run(config_from_args([*RUN, "--output-dir", str(out)]), trainer=Watched)
    return out, summary, seen


def test_every_forward_of_the_run_merges_and_the_counts_are_logged(tome_run, capsys):
    out, s, seen = tome_run
    assert s["tome"] == {"r": 2, "inflection": 0.0, "start_idx": 0, "policy": "hidden", "train": True,
                         "r_per_block": R_PER_BLOCK}
    assert s["tokens_per_block"] == TOKENS
    whats = {w for w, _ in seen}
    assert {"train", "dense", "deploy@start", "eval", "deploy", "ema", "best", "best+tome"} <= whats, whats
    assert sum(w == "train" for w, _ in seen) == 3 * 4  # 4 steps per epoch
    for what, tokens in seen:  # every forward merges as the deployable model does, but best/ reloaded plain
        assert tokens == ([17] * 12 if what == "best" else TOKENS), (what, tokens)
    assert [r["lambda"] for r in metrics(out)] == [1.0, 0.5, 0.0]  # through the switch to attention-free blocks
    assert s["best_acc_reloaded"] == s["deploy_acc_best"] == s["best_acc_with_tome"]
    assert s["best_acc_without_tome"] is not None


def test_best_and_last_are_plain_models_with_the_settings_recorded(tome_run):
    out, s, _ = tome_run
    for name in ("best", "last"):
        model = shrink.load(out / name)
        assert not is_tome(model) and not any("ToMe" in type(m).__name__ for m in model.modules())
        assert shrink.attention_free_indices(model) == [1, 3]
        tome = json.loads((out / name / "config.json").read_text())["extra"]["tome"]
        assert tome == {**s["tome"], "tokens_per_block": TOKENS}
    assert "tome_train: true" in (out / "config.yaml").read_text()
    ema = load_file(str(out / "state" / "ema.safetensors"))
    assert not any(k.startswith("blocks.1.attn.") for k in ema)  # the EMA went through the switch too


def test_eval_with_the_recorded_settings_reproduces_the_runs_accuracy(tome_run):
    out, s, _ = tome_run
    tome = json.loads((out / "best" / "config.json").read_text())["extra"]["tome"]
    res = train_mod.run(config_from_args([
        "--eval", "--checkpoint", str(out / "best"), "--data-set", "synthetic", "--synthetic-images", "64",
        "--batch-size", "16", "--tome-r", str(tome["r"]), "--tome-start-idx", str(tome["start_idx"]),
        "--tome-policy", tome["policy"], "--threads", "1", "--no-progress"]))
    assert res["acc_tome"] == s["deploy_acc_best"] and res["acc"] == s["best_acc_without_tome"]
    assert res["tokens_per_block"] == TOKENS


# ------------------------------------------------------------------------------------------------
# Resume with merging

def test_killed_then_resumed_with_merging_is_the_uninterrupted_run(tome_run, tmp_path):
    """The process dies at epoch 1's last/ swap (the state after epoch 0 is on disk); --resume redoes epoch 1
    and the switch epoch 2 and ends with the uninterrupted run's metrics, weights and EMA, bit for bit."""
    ref, s_ref, _ = tome_run
    out = tmp_path / "run"
    killed = run([sys.executable, "tests/die_at_rename.py", ".last.old", "1", *RUN, "--output-dir", str(out)])
    assert killed.returncode == 137, killed.stderr[-2000:]
    assert json.loads((out / "state" / "trainer_state.json").read_text())["epoch"] == 0
    s = train_mod.run(config_from_args(["--resume", "--output-dir", str(out), "--no-progress"]))
    assert yaml.safe_load((out / "config.yaml").read_text())["tome_train"] is True
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(metrics(out)) == strip(metrics(ref))
    for key in ("deploy_acc_best", "best_epoch", "best_source", "best_acc_reloaded", "tome", "tokens_per_block",
                "best_acc_with_tome", "best_acc_without_tome"):
        assert s[key] == s_ref[key], key
    for f in ("last/model.safetensors", "best/model.safetensors", "state/ema.safetensors", "state/model.safetensors"):
        a, b = load_file(str(out / f)), load_file(str(ref / f))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f
