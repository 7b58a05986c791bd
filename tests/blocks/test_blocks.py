"""The block contract (shrink/blocks/) on one tiny model per timm block class and per option that
changes the block: lambda = 1 is timm, lambda = 0 is the export, the export loses exactly the
attention-only parameters, save/load is exact, ToMe r = 0 is a no-op, selection and counting run.

The two slow subprocesses (training every family, benchmark.py on every family) run side by side
(``family_runs``): one thread each, on CI's 2 cores."""
from __future__ import annotations

import copy
import json
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from timm.models.vision_transformer import ParallelScalingBlock

import shrink
from shrink.bench.measure import count_macs, count_parameters
from shrink.blocks.contract import FAMILIES, AttentionFreeBlock, block_family, classify_block
from shrink.blocks.parts import removed_parameter_count

from .._families import CASES, build, images

KEYS = list(CASES)
# cases where ToMe merges (r > 0); the rest are refused in one line (windowed SAM)
MERGING = {"vit", "vit-qknorm-reg-ls", "vit-map-head", "deit-distilled", "respost", "parallel-things",
           "parallel-scaling", "diff-parallel-scaling", "naflexvit", "eva02-rope", "dinov3-rope", "rope-mixed",
           "eva-postnorm", "cait", "beit", "beit-shared-bias", "relpos", "relpos-shared", "relpos-respost"}


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    yield


@pytest.mark.parametrize("key", KEYS)
def test_family_is_recognised(key):
    model = build(key)
    assert {block_family(b).name for b in model.blocks} == {CASES[key][3]}


@pytest.mark.parametrize("key", KEYS)
def test_lambda1_is_timm_and_lambda0_is_export(key):
    model, x = build(key), images(key)
    ref = model(x)
    layers = [0, 2]
    d = shrink.dilute(copy.deepcopy(model), layers)
    assert maxdiff(d(x), ref) <= 1e-5
    shrink.set_lambda(d, 0.3)
    mid = d(x)
    assert torch.isfinite(mid).all() and maxdiff(mid, ref) > 1e-6  # lambda really acts
    shrink.set_lambda(d, 0.0)
    y0 = d(x)
    small = shrink.export(d)
    assert [classify_block(b) for b in small.blocks] == ["attention-free", "attention", "attention-free"]
    assert maxdiff(small(x), y0) <= 1e-5
    # exactly the attention-only parameters are gone
    assert n_params(small) == n_params(model) - removed_parameter_count(model, layers)
    assert removed_parameter_count(model, layers) > 0
    # the MLP half of each block keeps its state-dict keys
    kept = set(small.state_dict())
    assert kept <= set(d.state_dict()) | set(model.state_dict())


@pytest.mark.parametrize("key", KEYS)
def test_every_layer_removed_drops_shared_tables(key):
    model, x = build(key), images(key)
    layers = list(range(len(model.blocks)))
    d = shrink.dilute(copy.deepcopy(model), layers, lam=0.0)
    small = shrink.export(d)
    assert maxdiff(small(x), d(x)) <= 1e-5
    assert n_params(small) == n_params(model) - removed_parameter_count(model, layers)
    for attr in ("rel_pos_bias", "shared_rel_pos", "rope"):
        if getattr(model, attr, None) is not None and type(model).__name__ in ("Beit", "VisionTransformerRelPos", "Eva"):
            assert getattr(small, attr) is None, attr


@pytest.mark.parametrize("key", KEYS)
def test_diluted_block_trains(key):
    model, x = build(key), images(key)
    d = shrink.dilute(model, [1], lam=0.5).train()
    d(x).sum().backward()
    grads = [p.grad for n, p in d.named_parameters() if n.startswith("blocks.1.") and p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("key", KEYS)
def test_save_load_exact(key, tmp_path):
    model, x = build(key), images(key)
    d = shrink.dilute(copy.deepcopy(model), [0, 2], lam=0.0)
    small = shrink.export(d)
    shrink.save(small, tmp_path / "m")
    back = shrink.load(tmp_path / "m").eval()
    assert maxdiff(back(x), small(x)) == 0.0
    assert [classify_block(b) for b in back.blocks] == [classify_block(b) for b in small.blocks]
    shrink.save(shrink.set_lambda(d, 0.25) or d, tmp_path / "diluted")
    back = shrink.load(tmp_path / "diluted").eval()
    assert maxdiff(back(x), d(x)) == 0.0


@pytest.mark.parametrize("key", KEYS)
def test_tome_r0_is_a_noop_and_merging_is_refused_or_works(key):
    model, x = build(key), images(key)
    ref = model(x)
    shrink.apply_tome(model, r=0)
    assert maxdiff(model(x), ref) == 0.0
    shrink.remove_tome(model)
    assert maxdiff(model(x), ref) == 0.0
    small = shrink.export(shrink.dilute(copy.deepcopy(model), [0], lam=0.0))
    y = small(x)
    shrink.apply_tome(small, r=0)
    assert maxdiff(small(x), y) == 0.0
    if key in MERGING:  # r > 0: fewer tokens after each merging block, finite outputs, dense and exported
        for m in (model, small):
            shrink.apply_tome(m, r=0)
            whole = shrink.tome_token_counts(m, input_size=CASES[key][2])
            shrink.apply_tome(m, r=2, policy="hidden")
            counts = shrink.tome_token_counts(m, input_size=CASES[key][2])
            assert counts[-1] < whole[-1] and counts == sorted(counts, reverse=True), (whole, counts)
            assert torch.isfinite(m(x)).all()
    else:
        with pytest.raises(shrink.ShrinkError) as e:
            shrink.apply_tome(model, r=1)
        assert "\n" not in str(e.value) and "r = 0 works" in str(e.value) or "attention pooling" in str(e.value)


@pytest.mark.parametrize("key", KEYS)
def test_selection_runs(key):
    model = build(key)
    x = images(key, batch=6)
    loader = [(x[:3], torch.zeros(3)), (x[3:], torch.zeros(3))]
    for criterion in ("transfer_entropy", "cosine"):
        layers = shrink.select_layers(model, loader, k=2, criterion=criterion, progress=False).layers
        assert len(layers) == 2 and set(layers) <= set(range(len(model.blocks)))
    assert len(layers) == 2 and set(layers) <= set(range(len(model.blocks)))


@pytest.mark.parametrize("key", KEYS)
def test_counts(key):
    model = build(key)
    small = shrink.export(shrink.dilute(copy.deepcopy(model), [0, 2], lam=0.0))
    size = (3, CASES[key][2], CASES[key][2])
    dense_p, small_p = count_parameters(model), count_parameters(small)
    removed = removed_parameter_count(model, [0, 2])
    assert small_p["in_blocks"]["attention"] == dense_p["in_blocks"]["attention"] - removed
    assert small_p["in_blocks"]["mlp"] == dense_p["in_blocks"]["mlp"]
    dense_m, small_m = count_macs(model, size), count_macs(small, size)
    assert 0 < small_m["total"] < dense_m["total"]


def test_fused_out_proj_parallel_scaling():
    model, x = build("parallel-scaling"), images("parallel-scaling")
    torch.manual_seed(3)
    for i in range(len(model.blocks)):
        blk = ParallelScalingBlock(32, 2, qkv_bias=True, fuse_out_proj=True, init_values=0.5).eval()
        with torch.no_grad():
            for p in blk.parameters():
                p.add_(0.05 * torch.randn_like(p))
        model.blocks[i] = blk
    ref = model(x)
    d = shrink.dilute(copy.deepcopy(model), [0, 1])
    assert maxdiff(d(x), ref) <= 1e-5
    shrink.set_lambda(d, 0.0)
    small = shrink.export(d)
    assert maxdiff(small(x), d(x)) <= 1e-5
    # q/k/v rows (with their biases) and the attention columns of out_proj are gone; the MLP's stay
    assert small.blocks[0].in_proj.weight.shape == (4 * 32, 32)
    assert small.blocks[0].out_proj.weight.shape == (32, 4 * 32)
    assert n_params(small) == n_params(model) - removed_parameter_count(model, [0, 1])


def test_post_norm_rule_is_identity_and_can_be_overridden():
    model, x = build("respost"), images("respost")
    d = shrink.dilute(copy.deepcopy(model), [0], lam=0.0)
    assert d.blocks[0].residual_scale == 1.0  # post-norm: the branch fades to x, not 2x
    ref_rule = shrink.dilute(copy.deepcopy(model), [0], lam=0.0, residual_scale=2.0)
    assert ref_rule.blocks[0].residual_scale == 2.0
    assert maxdiff(ref_rule(x), d(x)) > 1e-4
    small = shrink.export(ref_rule)
    assert small.blocks[0].residual_scale == 2.0 and maxdiff(small(x), ref_rule(x)) <= 1e-5


def test_residual_scale_round_trips(tmp_path):
    model, x = build("vit"), images("vit")
    d = shrink.dilute(model, [1], lam=0.0, residual_scale=1.0)
    shrink.save(shrink.export(d), tmp_path / "m")
    back = shrink.load(tmp_path / "m").eval()
    assert back.blocks[1].residual_scale == 1.0 and maxdiff(back(x), shrink.export(d)(x)) == 0.0
    fresh = build("vit")
    for bad in (0, -1, float("nan"), "two", True):
        with pytest.raises(shrink.ShrinkError, match="residual_scale"):
            shrink.dilute(fresh, [0, 1], residual_scale=bad)
        assert all(classify_block(b) == "attention" for b in fresh.blocks)  # nothing half-done


def test_unknown_blocks_are_refused_in_one_line():
    import timm

    mixer = timm.create_model("mixer_s16_224", img_size=32, num_classes=3)
    with pytest.raises(shrink.ShrinkError) as e:
        shrink.dilute(mixer, [0])
    assert "MixerBlock" in str(e.value) and "block contract" in str(e.value) and "\n" not in str(e.value)

    class MyBlock(type(build("vit").blocks[0])):  # a subclass with its own forward has no adapter
        def forward(self, x, attn_mask=None, is_causal=False):
            return x

    vit = build("vit")
    vit.blocks[0].__class__ = MyBlock
    with pytest.raises(shrink.ShrinkError, match="MyBlock"):
        shrink.dilute(vit, [0])


def test_every_family_is_in_the_table():
    assert {c[3] for c in CASES.values()} == set(FAMILIES)


def test_attention_free_block_needs_a_known_family():
    with pytest.raises(shrink.ShrinkError, match="unknown block family"):
        AttentionFreeBlock("nope", {})


@pytest.fixture
def traced_once(monkeypatch):
    """deploy.export_program remembers the programs of this test: deploy.to_onnx, which first traces the
    prepared model with the same arguments again (torch.export, ~1 s a case), converts the very program
    the test has just compared with eager. Another model or other arguments are traced as before."""
    import inspect

    from shrink import deploy

    real, seen = deploy.export_program, {}
    signature = inspect.signature(real)

    def export_program(model, *args, **kwargs):
        bound = signature.bind(model, *args, **kwargs)
        bound.apply_defaults()
        key = (id(model), repr([v for k, v in bound.arguments.items() if k != "model"]))
        if key not in seen:
            seen[key] = (model, real(model, *args, **kwargs))  # the model is kept: its id is not reused
        return seen[key][1]

    monkeypatch.setattr(deploy, "export_program", export_program)
    monkeypatch.setattr("shrink.deploy.onnx_export.export_program", export_program)  # the name to_onnx calls
    return seen


def test_traced_once_traces_each_model_and_arguments_once(traced_once):
    from shrink import deploy

    model, x = build("vit"), images("vit")
    size = tuple(x.shape[1:])
    ep = deploy.export_program(model, input_size=size, batch_size=2)
    assert deploy.export_program(model, input_size=size, batch_size=2, dynamic_batch=True) is ep
    assert deploy.export_program(model, input_size=size, batch_size=3) is not ep
    assert deploy.export_program(build("vit"), input_size=size, batch_size=2) is not ep
    assert len(traced_once) == 3


@pytest.mark.parametrize("key", KEYS)
def test_pt2_and_onnx_match_eager(key, traced_once):
    pytest.importorskip("onnxruntime")
    from shrink import deploy

    model, x = build(key), images(key)
    small = shrink.export(shrink.dilute(copy.deepcopy(model), [0, 2], lam=0.0))
    prep = deploy.prepare_model(small)
    y = prep(x)
    ep = deploy.export_program(prep, input_size=tuple(x.shape[1:]), batch_size=2)
    assert maxdiff(ep.module()(x), y) <= 1e-5
    proto = deploy.to_onnx(prep, input_size=tuple(x.shape[1:]), batch_size=2)
    deploy.check_attention_free(proto, [0, 2])  # the removed attention is not in the graph
    assert deploy.attention_nodes(proto, [1])[1]  # the kept one is
    sess = deploy.load_onnx_session(proto.SerializeToString())
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert abs(out - y.detach().numpy()).max() <= 1e-5


# one model per family (not per option): the training loop is the same code for all of them
TRAIN_KEYS = sorted({fam: key for key, (_, _, _, fam) in reversed(list(CASES.items()))}.values())


def _train_every_family(tmp: Path):
    from ..conftest import ROOT, run

    return run([sys.executable, str(ROOT / "tests" / "train_families_main.py"), str(tmp), *TRAIN_KEYS], timeout=900)


def _save_every_family(tmp: Path) -> Path:
    """The dense model of each TRAIN_KEYS family saved under ``tmp``; benchmark.py's models file naming them."""
    lines = []
    for key in TRAIN_KEYS:
        shrink.save(build(key), tmp / key)
        lines.append(f"{CASES[key][0]} checkpoint={tmp / key}")
    (tmp / "models.txt").write_text("\n".join(lines) + "\n")
    return tmp / "models.txt"


def _benchmark_every_family(tmp: Path):
    from ..conftest import ROOT, run

    return run([sys.executable, str(ROOT / "benchmark.py"), "--model", str(tmp / "models.txt"),
                "--remove-layers", "0,2", "--batch-size", "2", "--warmup", "0", "--iters", "1", "--repeats", "1",
                "--no-latency", "--threads", "1", "--no-progress", "--json", str(tmp / "out.json")], timeout=600)


@pytest.fixture(scope="module")
def family_runs(request, tmp_path_factory) -> dict[str, tuple[Path, Future]]:
    """The two slow tests' subprocesses (one thread each, independent), started side by side on first use:
    CI has 2 cores and the pytest process only waits for them. name -> (its folder, Future of the run)."""
    tests = {"train": "test_main_job_trains_every_family_through_the_switch",
             "benchmark": "test_benchmark_reports_params_and_gmacs_for_every_family"}
    selected = {item.originalname for item in request.session.items if item.module is request.module}
    folders = {name: tmp_path_factory.mktemp(name) for name, test in tests.items() if test in selected}
    if "benchmark" in folders:
        _save_every_family(folders["benchmark"])  # here, not in a thread: build() seeds torch's global RNG
    jobs = {"train": _train_every_family, "benchmark": _benchmark_every_family}
    pool = ThreadPoolExecutor(2)
    yield {name: (tmp, pool.submit(jobs[name], tmp)) for name, tmp in folders.items()}
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.slow
def test_main_job_trains_every_family_through_the_switch(family_runs):
    tmp_path, job = family_runs["train"]
    res = job.result()
    assert res.returncode == 0, res.stderr[-3000:]
    for key in TRAIN_KEYS:
        run_dir = tmp_path / key / "run"
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["lambda"] for r in rows] == [1.0, 0.0]  # through the switch
        best = shrink.load(run_dir / "best")
        assert [classify_block(b) for b in best.blocks] == ["attention-free", "attention", "attention-free"], key
        assert block_family(best.blocks[0]).name == CASES[key][3]
        size = CASES[key][2]
        assert torch.isfinite(best(torch.randn(1, 3, size, size))).all()


def test_optimizer_state_follows_the_cut_of_fused_projections():
    from shrink.training.sharding import export_for_training

    model, x = build("parallel-scaling"), images("parallel-scaling")
    d = shrink.dilute(model, [0], lam=0.0).train()
    opt = torch.optim.AdamW(d.parameters(), lr=1e-3)
    d(x).sum().backward()
    opt.step()
    old = {n: opt.state[p]["exp_avg"].clone() for n, p in d.named_parameters() if p in opt.state}
    hidden = d.blocks[0].in_split[0]

    def prepare(m):
        return m, torch.optim.AdamW(m.parameters(), lr=1e-3)

    _, bare, new_opt = export_for_training(d, opt, prepare)
    state = {n: new_opt.state[p]["exp_avg"] for n, p in bare.named_parameters() if p in new_opt.state}
    assert torch.equal(state["blocks.0.in_proj.weight"], old["blocks.0.in_proj.weight"][:hidden])
    assert torch.equal(state["blocks.1.in_proj.weight"], old["blocks.1.in_proj.weight"])  # untouched block
    assert len(state) == sum(1 for _ in bare.parameters())


@pytest.mark.slow
def test_benchmark_reports_params_and_gmacs_for_every_family(family_runs):
    tmp_path, job = family_runs["benchmark"]
    res = job.result()
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads((tmp_path / "out.json").read_text())["results"]
    for key in TRAIN_KEYS:
        dense, pruned = (r for r in rows if r["checkpoint"] == str(tmp_path / key))
        model = build(key)
        assert dense["params"]["total"] == n_params(model)
        assert pruned["params"]["total"] == n_params(model) - removed_parameter_count(model, [0, 2]), key
        assert 0 < pruned["gmacs"] < dense["gmacs"], key


@pytest.mark.parametrize("name", ["swin_tiny_patch4_window7_224", "hiera_tiny_224", "pvt_v2_b0"])
def test_hierarchical_transformers_are_refused_in_one_line(name):
    import timm

    with torch.device("meta"):
        model = timm.create_model(name)
    with pytest.raises(shrink.ShrinkError) as e:
        shrink.dilute(model, [0])
    assert ("no `blocks`" in str(e.value) or "no adapter" in str(e.value)) and "\n" not in str(e.value)


def test_dilution_under_token_merging_is_refused():
    model = build("eva02-rope")
    shrink.apply_tome(model, r=0)
    with pytest.raises(shrink.ShrinkError, match="remove_tome"):
        shrink.dilute(model, [1])
    shrink.remove_tome(model)
    shrink.dilute(model, [1])
    assert classify_block(model.blocks[1]) == "diluted"


def test_compiled_and_checkpointed_diluted_models_match_eager():
    model, x = build("eva02-rope"), images("eva02-rope")
    d = shrink.dilute(model, [0, 2], lam=0.5)
    y = d(x)
    assert maxdiff(torch.compile(d, backend="eager")(x), y) == 0.0
    d.set_grad_checkpointing(True)
    d.train()
    d(x).sum().backward()
    assert all(p.grad is not None for n, p in d.named_parameters() if n.startswith("blocks.0.") and p.requires_grad)


def test_map_head_weighs_merged_tokens_by_size():
    """Pooling tokens [a, b] of sizes [2, 1] in the MAP head equals pooling [a, a, b] of size 1 each."""
    from shrink.merging.patch import tome_state

    model = build("vit-map-head")
    shrink.apply_tome(model, r=1)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 1, 32, generator=g), torch.randn(2, 1, 32, generator=g)
    prefix = torch.randn(2, model.num_prefix_tokens, 32, generator=g)
    merged = torch.cat([prefix, a, b], dim=1)
    state = tome_state(model)
    state.size = torch.tensor([1.0] * model.num_prefix_tokens + [2.0, 1.0]).expand(2, -1).unsqueeze(-1)
    pooled = model.forward_head(merged, pre_logits=True)
    state.size = None
    whole = model.forward_head(torch.cat([prefix, a, a, b], dim=1), pre_logits=True)
    assert maxdiff(pooled, whole) <= 1e-5


def test_bad_layers_and_hostile_residual_scales_are_one_line_errors(tmp_path):
    import json as _json

    model = build("vit")
    for bad in ([3], [-1], ["0"], [True]):
        with pytest.raises(shrink.ShrinkError):
            removed_parameter_count(model, bad)
    shrink.save(shrink.export(shrink.dilute(model, [0], lam=0.0)), tmp_path / "m")
    cfg_path = tmp_path / "m" / "config.json"
    good = _json.loads(cfg_path.read_text())
    for scales in ({"0": "two"}, {"0": 0}, {"0": True}, {"1": 2.0}, {"x": 2.0}, ["0"]):
        cfg_path.write_text(_json.dumps({**good, "residual_scales": scales}))
        with pytest.raises(shrink.ShrinkError) as e:
            shrink.load(tmp_path / "m")
        assert "residual_scales" in str(e.value) and "\n" not in str(e.value)


# one case per block family and attention kernel (the ONNX exporter costs ~10 s a case on 2 cores);
# CaiT's is tests/merging/test_tome_cait.py's (its 'avg' head weighs the merged tokens too)
EXPORTED = ["vit-map-head", "deit-distilled", "respost", "parallel-things", "parallel-scaling", "diff-parallel-scaling",
            "eva02-rope", "dinov3-rope", "rope-mixed", "eva-postnorm", "beit", "relpos", "relpos-respost"]


@pytest.mark.parametrize("key", EXPORTED)
def test_merged_models_export_to_pt2_and_onnx(key, traced_once):
    pytest.importorskip("onnxruntime")
    from shrink import deploy

    model, x = build(key), images(key)
    small = shrink.export(shrink.dilute(copy.deepcopy(model), [0], lam=0.0))
    prep = deploy.prepare_model(small, tome_r=2, tome_policy="hidden")
    y = prep(x)
    ep = deploy.export_program(prep, input_size=tuple(x.shape[1:]), batch_size=2)
    assert maxdiff(ep.module()(x), y) <= 1e-5
    proto = deploy.to_onnx(prep, input_size=tuple(x.shape[1:]), batch_size=2)
    sess = deploy.load_onnx_session(proto.SerializeToString())
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert abs(out - y.detach().numpy()).max() <= 1e-5


def test_a_registered_family_dilutes_and_exports_its_block():
    from timm.layers import Mlp
    from timm.models.vision_transformer import Attention
    from torch import nn

    from shrink.blocks import Family, get_family, register_family, unregister_family

    class PlainBlock(nn.Module):  # a block class no timm family knows: pre-norm, no layer scale
        def __init__(self, dim: int):
            super().__init__()
            self.ln_a, self.mix, self.ln_m, self.ffn = nn.LayerNorm(dim), Attention(dim, 2), nn.LayerNorm(dim), Mlp(dim, 2 * dim)

        def forward(self, x):
            x = x + self.mix(self.ln_a(x))
            return x + self.ffn(self.ln_m(x))

    model = build("vit")
    model.blocks[1] = PlainBlock(model.embed_dim)
    x = images("vit")
    with pytest.raises(shrink.ShrinkError, match="no attention sublayer"):
        shrink.dilute(copy.deepcopy(model), [1])

    @register_family("plain-test", blocks=[PlainBlock], norm1="ln_a", attn="mix", scale1=None, drop1="none",
                     norm2="ln_m", mlp="ffn", scale2=None, drop2="none")
    class PlainFamily(Family):
        """Pre-norm; no layer scale and no drop path."""

        def attention_branch(self, blk, x, ctx, attn_call=None):
            return blk.mix(blk.ln_a(x), **ctx) if attn_call is None else attn_call(blk.mix, blk.ln_a(x), ctx)

        def mlp_branch(self, blk, x, ctx):
            return blk.ffn(blk.ln_m(x))

    try:
        assert get_family("plain-test").classes == (PlainBlock,)
        with torch.no_grad():
            y = model(x)
            diluted = shrink.dilute(copy.deepcopy(model), [1], lam=1.0)
            assert maxdiff(diluted(x), y) <= 1e-6
            shrink.set_lambda(diluted, 0.0)
            small = shrink.export(diluted)
            assert maxdiff(small(x), diluted(x)) <= 1e-6
        assert not any(k.startswith(("blocks.1.mix", "blocks.1.ln_a")) for k in small.state_dict())
    finally:
        unregister_family("plain-test")
    assert "plain-test" not in shrink.blocks.FAMILIES


def test_an_unknown_family_is_one_line():
    from shrink.blocks import get_family

    with pytest.raises(shrink.ShrinkError) as e:
        get_family("vitt")
    assert str(e.value).startswith("unknown block family 'vitt'; choose one of vit, eva, ")
    assert "\n" not in str(e.value)
