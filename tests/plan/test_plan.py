"""shrink.plan's proxy and search: the search on a hand-made cost table (exact), the proxy on a depth-2 ViT
(exact against the exported, merged model), the MAC counter against fvcore, the plan files, bad input."""
from __future__ import annotations

import copy
import json
import math
import re

import pytest
import torch
import yaml

import shrink
from shrink.errors import ShrinkError
from shrink.plan import Candidate, block_kinds, token_counts
from shrink.plan.outputs import check_plan_config, plan_yaml, write_outputs
from shrink.plan.proxy import Proxy, removal_order
from shrink.plan.search import (
    Entry,
    MacCounter,
    Target,
    enumerate_candidates,
    pareto_front,
    r_grid,
    search,
)

from ..conftest import tiny_vit

pytestmark = pytest.mark.usefixtures("one_thread")


class FakeTable:
    """A cost table by hand: an attention block costs 3 ms per token in + 1 per token out, an
    attention-free block 1 per token out, merging 0.5 per merged token, 10 ms outside the blocks."""

    def __init__(self, depth: int, num_tokens: int, num_protected: int):
        self.depth, self.n, self.p = depth, num_tokens, num_protected
        self.key = {"model": "fake", "depth": depth}

    def predict_ms(self, cand: Candidate) -> float:
        counts = token_counts(self.n, self.p, cand.schedule(self.depth))
        kinds = block_kinds(self.depth, cand.removed)
        ms = 10.0
        for i, kind in enumerate(kinds):
            ms += (3 * counts[i] if kind == "attn" else 0) + counts[i + 1] + 0.5 * (counts[i] - counts[i + 1])
        return ms

    def dense_ms(self) -> float:
        return self.predict_ms(Candidate())

    def predict_speedup(self, cand: Candidate) -> float:
        return self.dense_ms() / self.predict_ms(cand)


class FakeScore:
    def __init__(self, kl: float, agree: float = 1.0):
        self.kl, self.top1_agreement, self.top1_acc = kl, agree, None

    def as_dict(self):
        return {"kl": self.kl, "top1_agreement": self.top1_agreement, "top1_acc": None}


def fake_kl(c: Candidate) -> float:
    """Removing costs 1 per layer, merging 0.3 per r, a ramp 0.05, a later start saves 0.1 per block."""
    return len(c.removed) + 0.3 * c.tome_r + 0.05 * abs(c.tome_inflection) - 0.1 * c.tome_start_idx * (c.tome_r > 0)


def _score(cands):
    return [FakeScore(fake_kl(c)) for c in cands]


DEPTH, TOKENS, PROT = 6, 17, 1
ORDER = [4, 1, 5, 2, 0]


@pytest.fixture(scope="module")
def cands():
    return enumerate_candidates(ORDER, DEPTH, TOKENS, PROT)  # r in {0, 1, 2, 3} and the most merging (8)


# ------------------------------------------------------------------------------------------------
# candidates
# ------------------------------------------------------------------------------------------------

def test_r_grid_matches_the_model_size():
    assert r_grid(17, 1, 12) == [0, 1, 2]  # the digits model: 16 patches over 12 blocks
    assert r_grid(197, 1, 12) == [0, 2, 4, 6, 8, 10, 12, 14, 16]  # a 224 px ViT-S/16
    assert r_grid(3, 1, 12) == [0, 1]
    assert r_grid(17, 1, 6) == [0, 1, 2, 3]


def test_candidates_are_distinct_valid_and_hold_the_most_merging(cands):
    keys = set()
    for c in cands:
        counts = token_counts(TOKENS, PROT, c.schedule(DEPTH))  # every one is a valid schedule
        keys.add((c.removed, tuple(counts)))
        assert c.removed == tuple(sorted(ORDER[:len(c.removed)]))  # prefixes of the order
    assert len(keys) == len(cands)  # no two build the same model
    for j in range(len(ORDER) + 1):  # every removal set with its most merging (r = cap = 8)
        assert Candidate(tuple(sorted(ORDER[:j])), 8, 0.0, 0, "hidden") in cands
    final = {c: token_counts(TOKENS, PROT, c.schedule(DEPTH))[-1] for c in cands}
    assert min(final.values()) == 2 and final[Candidate((), 8, 0.0, 0, "hidden")] == 2  # 17 -> 9 -> 5 -> 3 -> 2
    assert Candidate() in cands and {c.tome_r for c in cands} == {0, 1, 2, 3, 8}
    assert {c.tome_r for c in enumerate_candidates(ORDER, DEPTH, TOKENS, PROT, r_values=[2])} == {0, 2}
    # with every layer of the order removed one attention block is left: start 1 / 2 are not possible there
    assert not any(len(c.removed) == 5 and c.tome_start_idx > 0 and c.tome_policy == "none" for c in cands)
    # r = 0 once per removal set
    assert sum(1 for c in cands if c.tome_r == 0) == len(ORDER) + 1


def test_no_merging_gives_the_removal_prefixes_only():
    out = enumerate_candidates([3, 0], 4, 17, 1, merging=False)
    assert out == [Candidate(()), Candidate((3,)), Candidate((0, 3))]
    with pytest.raises(ShrinkError, match="repeats"):
        enumerate_candidates([1, 1], 4, 17, 1)


# ------------------------------------------------------------------------------------------------
# the search
# ------------------------------------------------------------------------------------------------

def test_search_exact_on_a_hand_made_table(cands):
    table = FakeTable(DEPTH, TOKENS, PROT)
    target = Target("speedup", 1.6)
    res = search(cands, table, target, depth=DEPTH, num_tokens=TOKENS, num_protected=PROT, score=_score,
                 max_candidates=10)
    dense = table.dense_ms()
    assert res.dense_ms == dense
    meeting = [c for c in cands if dense / table.predict_ms(c) >= 1.6]
    assert res.meeting == len(meeting) and 10 < len(meeting) < len(cands)
    # the 10 scored: those meeting the target with the smallest speed-up (closest to it)
    speedups = sorted(dense / table.predict_ms(c) for c in meeting)
    assert sorted(e.predicted_speedup for e in res.scored) == pytest.approx(speedups[:10])
    assert all(e.predicted_speedup >= 1.6 for e in res.scored)
    # the chosen plan has the lowest KL of the scored ones
    assert res.chosen.score.kl == min(fake_kl(e.candidate) for e in res.scored)
    # the front, by brute force: no scored entry is at least as fast and at least as good and better in one
    def dominated(e):
        return any(o.predicted_speedup >= e.predicted_speedup and o.score.kl <= e.score.kl
                   and (o.predicted_speedup > e.predicted_speedup or o.score.kl < e.score.kl) for o in res.scored)
    assert {id(e) for e in res.front} == {id(e) for e in res.scored if not dominated(e)}
    assert [e.predicted_speedup for e in res.front] == sorted(e.predicted_speedup for e in res.front)
    assert res.best_reachable == max(dense / table.predict_ms(c) for c in cands)


def test_search_ms_and_gmacs_targets(cands):
    table = FakeTable(DEPTH, TOKENS, PROT)
    res = search(cands, table, Target("ms", 200.0), depth=DEPTH, num_tokens=TOKENS, num_protected=PROT,
                 score=_score, max_candidates=5)
    assert res.meeting == sum(table.predict_ms(c) <= 200.0 for c in cands)
    assert all(e.predicted_ms <= 200.0 for e in res.scored)
    assert max(e.predicted_ms for e in res.scored) == max(table.predict_ms(c) for c in cands
                                                          if table.predict_ms(c) <= 200.0)

    def macs(c):  # tokens through the blocks, as a stand-in
        return float(sum(token_counts(TOKENS, PROT, c.schedule(DEPTH))) - 2 * len(c.removed))

    res = search(cands, table, Target("gmacs", 80.0), depth=DEPTH, num_tokens=TOKENS, num_protected=PROT,
                 score=_score, gmacs=macs, max_candidates=4)
    assert res.meeting == sum(macs(c) <= 80.0 for c in cands)
    assert sorted(e.gmacs for e in res.scored) == sorted(v for v in map(macs, cands) if v <= 80.0)[-4:]


def test_impossible_target_is_one_line_with_the_best_reachable(cands):
    table = FakeTable(DEPTH, TOKENS, PROT)
    best = max(table.predict_speedup(c) for c in cands)
    with pytest.raises(ShrinkError) as e:
        search(cands, table, Target("speedup", best * 1.01), depth=DEPTH, num_tokens=TOKENS, num_protected=PROT,
               score=_score, device="cpu")
    msg = str(e.value)
    assert "\n" not in msg and f"{best:.3f}x" in msg and "out of reach on cpu" in msg
    fewest = min(table.predict_ms(c) for c in cands)
    with pytest.raises(ShrinkError, match=f"{fewest:.3f} ms"):
        search(cands, table, Target("ms", fewest * 0.99), depth=DEPTH, num_tokens=TOKENS, num_protected=PROT,
               score=_score)
    # exactly the best is reachable, and then the limit-like candidates are what is scored
    res = search(cands, table, Target("speedup", best), depth=DEPTH, num_tokens=TOKENS, num_protected=PROT,
                 score=_score, max_candidates=3)
    assert res.chosen.predicted_speedup == pytest.approx(best)


@pytest.mark.parametrize("kind, value, match", [("speedup", 0.5, "at least 1"), ("ms", -1.0, "positive"),
                                                ("gmacs", math.inf, "positive"), ("fps", 3.0, "unknown target")])
def test_bad_targets(kind, value, match):
    with pytest.raises(ShrinkError, match=match):
        Target(kind, value)


def test_pareto_front_by_hand():
    def e(s, kl):
        return Entry(Candidate(), 1.0 / s, s, [1], score=FakeScore(kl))
    pts = [e(1.5, 0.3), e(1.6, 0.2), e(1.7, 0.4), e(2.0, 0.5), e(1.6, 0.25), e(2.0, 0.6), e(1.5, 0.2)]
    front = pareto_front(pts)
    assert [(x.predicted_speedup, x.score.kl) for x in front] == [(1.6, 0.2), (1.7, 0.4), (2.0, 0.5)]


# ------------------------------------------------------------------------------------------------
# the proxy
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def vit2():
    return tiny_vit(depth=2, seed=3)


@pytest.fixture(scope="module")
def calib():
    g = torch.Generator().manual_seed(0)
    return torch.randn(24, 3, 16, 16, generator=g), torch.randint(0, 10, (24,), generator=g)


def _reference_log_probs(model, cand, x):
    """The candidate built the long way: a copy, diluted, exported, merged."""
    m = copy.deepcopy(model)
    if cand.removed:
        shrink.dilute(m, list(cand.removed), lam=0.0)
        m = shrink.export(m)
    if cand.tome_r:
        shrink.apply_tome(m, cand.r_arg, cand.tome_start_idx, cand.tome_policy)
    with torch.no_grad():
        return torch.log_softmax(m(x).double(), -1)


def test_proxy_on_a_depth_2_vit(vit2, calib):
    x, y = calib
    model = copy.deepcopy(vit2)
    with torch.no_grad():
        before = model(x)
    proxy = Proxy(model, x, y, batch_size=10)
    dense = proxy.score(Candidate())
    assert dense.kl == 0.0 and dense.top1_agreement == 1.0
    assert dense.top1_acc == pytest.approx((before.argmax(-1) == y).double().mean().item())
    cases = [Candidate((0,)), Candidate((1,)), Candidate((), 3), Candidate((0,), 2, 0.5, 0, "hidden"),
             Candidate((1,), 4, -0.5, 0, "none")]
    for c in cases:
        s = proxy.score(c)
        assert s.kl > 0 and 0.0 <= s.top1_agreement <= 1.0, c
        ref = _reference_log_probs(vit2, c, x)
        assert (proxy.log_probs(c) - ref).abs().max().item() < 1e-5, c  # the in-place candidate is the real one
        kl = (proxy.dense_logp.exp() * (proxy.dense_logp - ref)).sum(-1).mean().item()
        assert s.kl == pytest.approx(kl, abs=1e-6)
        assert s.top1_agreement == (ref.argmax(-1) == before.argmax(-1)).double().mean().item()
    with torch.no_grad():  # scoring leaves the dense model computing what it did
        assert torch.equal(model(x), before)
    assert proxy.score(Candidate()).kl == 0.0


def test_proxy_on_an_eva_model_with_rope(calib):
    """Another block family (timm's Eva: RoPE, SwiGLU): the in-place candidates are the real ones too."""
    import timm

    torch.manual_seed(0)
    eva = timm.create_model("eva02_tiny_patch14_224", img_size=16, patch_size=4, depth=2, embed_dim=32, num_heads=2,
                            num_classes=10).eval()
    x = calib[0][:8]
    proxy = Proxy(copy.deepcopy(eva), x)
    assert proxy.score(Candidate()).kl == 0.0
    for c in [Candidate((1,)), Candidate((), 3), Candidate((0,), 2, 0.5, 0, "hidden")]:
        assert proxy.score(c).kl > 0, c
        assert (proxy.log_probs(c) - _reference_log_probs(eva, c, x)).abs().max().item() < 1e-5, c


def test_proxy_refuses_a_model_that_is_not_dense(vit2, calib):
    m = shrink.dilute(copy.deepcopy(vit2), [0])
    with pytest.raises(ShrinkError, match="dense model"):
        Proxy(m, calib[0])
    with pytest.raises(ShrinkError, match="labels"):
        Proxy(copy.deepcopy(vit2), calib[0], calib[1][:3])


def test_removal_order_is_the_selection_order(vit2, calib):
    x, y = calib
    m = tiny_vit(depth=3, seed=1)
    order = removal_order(m, x, y, k=2, criterion="transfer_entropy")
    sel = shrink.select_layers(m, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64),
                               k=2, criterion="transfer_entropy", amp_dtype=torch.float32, progress=False)
    assert order == sel.layers and len(set(order)) == 2
    assert removal_order(m, x, y, k=2, criterion="last") == [2, 1]  # the last j blocks for every prefix
    with pytest.raises(ShrinkError, match="manual"):
        removal_order(m, x, y, k=1, criterion="manual")


def test_mac_counter_equals_fvcore_on_whole_models(vit2, calib):
    from shrink.bench.measure import count_macs

    proxy = Proxy(copy.deepcopy(vit2), calib[0][:2])
    counter = MacCounter(proxy.built, proxy.model, (3, 16, 16), 17, 1, 2)
    cases = [Candidate(), Candidate((1,)), Candidate((), 2), Candidate((0,), 3, 0.5, 0, "hidden"), Candidate((), 3),
             Candidate((0,), 3, 0.0, 0, "hidden")]
    for c in cases:
        with proxy.built(c) as m:
            want = count_macs(m, (3, 16, 16))["total"]
        assert counter.total(c) == want, c
    traces = counter.traces
    assert counter.total(Candidate((1,))) == count_macs(_exported(vit2, [1]), (3, 16, 16))["total"]
    assert counter.traces == traces  # remembered, not traced again
    assert counter.total(Candidate()) > counter.total(Candidate((1,))) > counter.total(Candidate((1,), 3))


def _exported(model, layers):
    m = shrink.dilute(copy.deepcopy(model), layers, lam=0.0)
    return shrink.export(m)


# ------------------------------------------------------------------------------------------------
# plan files
# ------------------------------------------------------------------------------------------------

def test_plan_yaml_keys_and_main_lambda_accepts_them():
    base = {"model": "vit_digits", "data_set": "digits", "seed": 0}
    cfg, eval_only = plan_yaml(Candidate((3, 1), 2, -0.5, 1, "hidden"), base)
    assert eval_only == {}
    assert cfg == {**base, "remove_layers": [1, 3], "tome_r": 2, "tome_start_idx": 1, "tome_policy": "hidden",
                   "tome_inflection": -0.5, "tome_train": True}
    check_plan_config(cfg)
    cfg, _ = plan_yaml(Candidate(), base)
    assert cfg == {**base, "remove_ratio": 0.0}
    check_plan_config(cfg)
    cfg, _ = plan_yaml(Candidate((2,), 1), base, tome_train=False)
    assert cfg["tome_train"] is False and "tome_inflection" not in cfg
    check_plan_config(cfg)
    with pytest.raises(ShrinkError, match="would not be accepted by main_lambda.py: .*remove_layers") as e:
        check_plan_config({**base, "remove_layers": [12]})
    assert "\n" not in str(e.value)


def test_write_outputs(tmp_path, cands):
    table = FakeTable(DEPTH, TOKENS, PROT)
    res = search(cands, table, Target("speedup", 1.6), depth=DEPTH, num_tokens=TOKENS, num_protected=PROT,
                 score=_score, max_candidates=8)
    res.order = ORDER
    base = {"model": "vit_digits", "data_set": "digits"}
    paths = write_outputs(res, tmp_path / "p", table=table, base_config=base, record={"model": "vit_digits"},
                          validate=False, plot=False)
    assert sorted(paths) == ["pareto.json", "pareto.md", "plan.json", "plan.yaml"]
    plan = json.loads((tmp_path / "p" / "plan.json").read_text())
    c = res.chosen
    assert plan["candidate"] == c.candidate.as_dict() and plan["predicted_speedup"] == c.predicted_speedup
    assert plan["dense_predicted_ms"] == table.dense_ms() and plan["cost_key"] == table.key
    assert plan["target"] == {"kind": "speedup", "value": 1.6} and plan["proxy"]["kl"] == c.score.kl
    assert plan["schedule"] == c.candidate.schedule(DEPTH) and plan["removal_order"] == ORDER
    cfg = yaml.safe_load((tmp_path / "p" / "plan.yaml").read_text())
    assert cfg == plan["config"] and cfg["model"] == "vit_digits"
    front = json.loads((tmp_path / "p" / "pareto.json").read_text())["front"]
    assert [f["predicted_speedup"] for f in front] == [e.predicted_speedup for e in res.front]
    md = (tmp_path / "p" / "pareto.md").read_text()
    assert md.count("\n| ") == len(res.front) + 1 and "**chosen**" in md


# ------------------------------------------------------------------------------------------------
# the command line: bad input is one line and exit 2, before any model is built
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv, match", [
    ([], "give exactly one of --target-speedup"),
    (["--target-speedup", "1.5", "--target-ms", "3"], r"exactly one .* \(got 2\)"),
    (["--target-speedup", "0.5"], "at least 1"),
    (["--target-speedup", "abc"], "expected a positive number"),
    (["--target-gmacs", "-1"], "expected a positive number"),
    (["--target-speedup", "1.5", "--policies", "none,merge"], "--policies"),
    (["--target-speedup", "1.5", "--r-values", "1,x"], "--r-values"),
    (["--target-speedup", "1.5", "--device", "tpu"], "tpu"),
    (["--target-speedup", "1.5", "--data-set", "folder"], "needs --data-path"),
    (["--target-speedup", "1.5", "--finetune", "/nonexistent/w.pth"], "not found"),
    (["--target-speedup", "1.5", "--max-candidates", "0"], "positive integer"),
    (["--target-speedup", "1.5", "--threads", "0"], "--threads"),
    (["--target-speedup", "1.5", "--bogus"], "unrecognized"),
])
def test_cli_bad_input_one_line_exit_2(argv, match, capsys, tmp_path):
    from shrink.plan.__main__ import main

    try:
        code = main([*argv, "--output-dir", str(tmp_path / "o")])
    except SystemExit as e:  # argparse's own errors (OneLineArgumentParser: one line, exit 2)
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and "Traceback" not in err
    assert re.search(match, err), err
    assert not (tmp_path / "o").exists()


def test_cli_output_dir_that_holds_other_files(tmp_path, capsys):
    from shrink.plan.__main__ import main

    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "notes.txt").write_text("mine")
    assert main(["--target-speedup", "1.5", "--output-dir", str(tmp_path / "o")]) == 2
    assert "did not write" in capsys.readouterr().err


def test_the_check_scripts_spearman_by_hand():
    """scripts/plan_proxy_check.py computes Spearman itself (scipy may be missing): known values, ties averaged."""
    import importlib.util

    from ..conftest import ROOT

    spec = importlib.util.spec_from_file_location("plan_proxy_check", ROOT / "scripts" / "plan_proxy_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.ranks([3.0, 1.0, 3.0, 2.0]) == [3.5, 1.0, 3.5, 2.0]
    assert mod.spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(1 - 6 * 2 / (4 * 15))  # 0.8
    assert mod.spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(1.5 / math.sqrt(3))
    assert mod.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
