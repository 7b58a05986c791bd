"""shrink.bench.spec: input sizes, model lists, removal sets and ratios."""
from __future__ import annotations

import json

import pytest
import timm

import shrink
from shrink import bench
from shrink.bench import ModelSpec

pytestmark = pytest.mark.usefixtures("one_thread")


def test_input_size_follows_build_and_pretrained_cfg():
    m384 = timm.create_model("vit_tiny_patch16_384")
    assert bench.input_size(m384) == (3, 384, 384)
    m64 = timm.create_model("vit_tiny_patch16_384", img_size=64)
    assert bench.input_size(m64) == (3, 64, 64)
    assert bench.input_size(m384, 96) == (3, 96, 96)  # shrink.introspect.input_size: an int is a square side


def test_model_list_file_and_comma_list(tmp_path):
    f = tmp_path / "models.txt"
    f.write_text("# DeiT-T twice\ndeit_tiny_patch16_224 remove=0,2,4 compare=dense,pruned\n"
                 "deit_tiny_patch16_224 remove=0,2,4,6 compare=pruned tome_r=3 tome_start=1  # 30%\n\n"
                 "mixer_s16_224\n")
    defaults = ModelSpec(name="", tome_start_idx=0)
    specs = bench.parse_models(str(f), defaults)
    assert [s.name for s in specs] == ["deit_tiny_patch16_224"] * 2 + ["mixer_s16_224"]
    assert specs[0].remove_layers == [0, 2, 4] and specs[0].compare == ["dense", "pruned"]
    assert specs[1].remove_layers == [0, 2, 4, 6] and (specs[1].tome_r, specs[1].tome_start_idx) == (3, 1)
    assert specs[2].remove_layers is None and specs[2].compare is None
    assert [s.name for s in bench.parse_models("a, b,c", defaults)] == ["a", "b", "c"]
    with pytest.raises(shrink.ShrinkError, match="bad entry"):
        bench.parse_model_line("deit_tiny_patch16_224 layers=1", defaults)
    with pytest.raises(shrink.ShrinkError, match="unknown configuration"):
        bench.parse_compare("dense,sparse")
    assert bench.parse_compare("dense,tome") == ["dense", "dense+tome"]


def test_removal_sets_and_ratio(tmp_path, deit_tiny_64):
    sel = tmp_path / "sel.json"
    sel.write_text(json.dumps({"layers": [4, 0, 2, 6, 9], "criterion": "transfer_entropy"}))
    spec = ModelSpec(name="deit_tiny_patch16_224", selection=str(sel))
    assert bench.resolve_removal(deit_tiny_64, spec) == [4, 0, 2, 6, 9]
    spec.remove_ratio = 0.3  # 12 blocks -> 4 layers, the first 4 of the ranking
    assert bench.resolve_removal(deit_tiny_64, spec) == [4, 0, 2, 6]
    spec.remove_ratio = 0.5  # 6 layers, the file lists 5
    with pytest.raises(shrink.ShrinkError, match="needs 6 layers"):
        bench.resolve_removal(deit_tiny_64, spec)
    sel.write_text(json.dumps({"layers": [0, 1], "depth": 24}))
    with pytest.raises(shrink.ShrinkError, match="made for 24 blocks"):
        bench.resolve_removal(deit_tiny_64, ModelSpec(name="x", selection=str(sel)))
    with pytest.raises(shrink.ShrinkError, match="--selection sel.json"):
        bench.resolve_removal(deit_tiny_64, ModelSpec(name="x", remove_ratio=0.25))
    with pytest.raises(shrink.ShrinkError, match="out of range"):
        bench.resolve_removal(deit_tiny_64, ModelSpec(name="x", remove_layers=[0, 12]))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"layer": [1]}))
    with pytest.raises(shrink.ShrinkError, match="no 'layers' list"):
        bench.resolve_removal(deit_tiny_64, ModelSpec(name="x", selection=str(bad)))


def test_a_removal_on_a_model_without_attention_is_reported_never_dropped():
    """A removal given for several models: the MLP-only one keeps its dense row, and each pruned
    configuration it cannot have is in ``skipped`` with the reason (it used to vanish without a word)."""
    cfg = bench.BenchConfig(models=[ModelSpec(name="deit_tiny_patch16_224", remove_layers=[0, 2]),
                                    ModelSpec(name="mixer_s16_224", remove_layers=[0, 2])], img_size=32)
    planned, skipped = bench.plan(cfg)
    assert [(p.spec.name, p.variant) for p in planned] == [
        ("deit_tiny_patch16_224", "dense"), ("deit_tiny_patch16_224", "pruned"), ("mixer_s16_224", "dense")]
    assert skipped == [{"model": "mixer_s16_224", "variant": "pruned",
                        "reason": "mixer_s16_224 has no attention layers to remove"}]
    # with ToMe asked too, both pruned configurations are reported; an explicit --compare says the same
    cfg.models[1].tome_r = cfg.models[0].tome_r = 1
    assert [(k["variant"], k["reason"]) for k in bench.plan(cfg)[1]] == [
        ("pruned", "mixer_s16_224 has no attention layers to remove"),
        ("pruned+tome", "mixer_s16_224 has no attention layers to remove")]
    cfg.models[1].tome_r = cfg.models[0].tome_r = None
    cfg.models[1].compare = ["dense", "pruned"]
    assert bench.plan(cfg)[1] == skipped
    # no model at all admits the removal: an error, as with one model
    cfg.models = [cfg.models[1], ModelSpec(name="resmlp_12_224", remove_layers=[0])]
    with pytest.raises(shrink.ShrinkError, match="no model admits configuration pruned: mixer_s16_224 has no attention"):
        bench.plan(cfg)


def test_the_baseline_is_measured_once_and_first_when_not_listed():
    deit = ModelSpec(name="deit_tiny_patch16_224", remove_layers=[0, 2], compare=["pruned"])
    assert bench.with_baseline([deit], None) == [deit]
    added = bench.with_baseline([deit], "deit_tiny_patch16_224")  # listed, but without its dense row
    assert [(s.name, s.compare, s.remove_layers) for s in added] == [
        ("deit_tiny_patch16_224", ["dense"], None), ("deit_tiny_patch16_224", ["pruned"], [0, 2])]
    mixer = ModelSpec(name="mixer_s16_224")
    assert bench.with_baseline([deit, mixer], "mixer_s16_224") == [deit, mixer]  # its dense row is there
    with pytest.raises(shrink.ShrinkError, match="--baseline is empty"):
        bench.with_baseline([deit], " ")
    planned, _ = bench.plan(bench.BenchConfig(models=[deit], img_size=32, baseline="resmlp_12_224"))
    assert [(p.spec.name, p.variant) for p in planned] == [("resmlp_12_224", "dense"),
                                                           ("deit_tiny_patch16_224", "pruned")]
