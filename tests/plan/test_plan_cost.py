"""The measured cost model's bookkeeping (shrink.plan.cost): the prediction is the sum of the table
along a plan's token counts (exact arithmetic on hand-made tables), interpolation, the key and its
cache, save / load, corrupt files; the build on a depth-2 ViT (structure only: no timing claims)."""
from __future__ import annotations

import copy
import json
import logging

import pytest

from shrink.errors import ShrinkError
from shrink.merging.merge import max_merge
from shrink.merging.patch import tome_token_counts
from shrink.plan.candidate import Candidate, token_counts
from shrink.plan.cost import (
    KINDS,
    SCHEMA,
    CostKey,
    CostTable,
    build_cost_table,
    build_plan_model,
    cache_path,
    cached_cost_table,
    cost_key_for,
    default_validation,
    fit_coefficients,
    smooth_parts,
    token_grid,
)
from tests.conftest import tiny_vit

pytestmark = pytest.mark.usefixtures("one_thread")

GRID, RG = [2, 5, 9], [1, 2, 4]


def plain(n):
    return 10.0 * n


def attn(n):
    return 3.0 * n


def mlp(n):
    return 5.0 * n


def free(n):
    return 6.0 * n


def edges(n):
    return 100.0 + n


def merge(n, r):
    return 0.5 * n + r


def merge_hidden(n, r):
    return 0.25 * n + 2 * r


def _key(**kw) -> CostKey:
    d = dict(model="toy", input_size=(3, 16, 16), num_tokens=9, num_protected=1, depth=3, device="cpu", dtype="fp32",
             batch_size=4, threads=1, runtime="eager", versions={"torch": "1", "timm": "2"})
    d.update(kw)
    return CostKey(**d)


def _table(**kw) -> CostTable:
    """Linear parts: linear interpolation between grid points is exact, so sums can be checked exactly."""
    parts = {"plain": [plain(n) for n in GRID], "attn": [attn(n) for n in GRID], "mlp": [mlp(n) for n in GRID],
             "free": [free(n) for n in GRID], "edges": [edges(n) for n in GRID],
             "merge": [[merge(n, r) for r in RG] for n in GRID],
             "merge_hidden": [[merge_hidden(n, r) for r in RG] for n in GRID]}
    return CostTable(key=_key(), grid=list(GRID), r_grid=list(RG), parts=parts, **kw)


def test_dense_is_edges_plus_plain_blocks():
    t = _table()
    assert t.dense_ms() == pytest.approx(edges(9) + 3 * plain(9), abs=1e-9)
    assert t.predict_ms(Candidate()) == t.dense_ms() and t.predict_speedup(Candidate()) == 1.0


def test_prediction_is_the_sum_along_the_token_counts():
    """kinds [attn, free, attn], r=2, policy none: schedule [2, 0, 2], tokens 9 -> 7 -> 7 -> 5."""
    t = _table()
    cand = Candidate(removed=(1,), tome_r=2)
    assert cand.schedule(3) == [2, 0, 2] and token_counts(9, 1, [2, 0, 2]) == [9, 7, 7, 5]
    want = (attn(9) + merge(9, 2) + mlp(7)  # block 0 merges 2 (its attention on 9 tokens, MLP on 7)
            + free(7)  # block 1: attention-free, policy none: tokens pass
            + attn(7) + merge(7, 2) + mlp(5)  # block 2: after a merge, proportional attention
            + edges(5))
    assert t.sum_ms(cand) == pytest.approx(want, abs=1e-9)
    assert t.predict_speedup(cand) == pytest.approx((edges(9) + 3 * plain(9)) / want, rel=1e-12)


def test_plain_blocks_until_the_first_merge_and_sized_after_it():
    """start_idx=1: block 0 runs the plain timm forward; block 1 merges; block 2 (r=2) too."""
    t = _table(coef={**dict.fromkeys(KINDS, 1.0), "plain": 3.0, "merge": 0.5})
    cand = Candidate(tome_r=2, tome_start_idx=1)
    assert cand.schedule(3) == [0, 2, 2]
    want = plain(9) + attn(9) + merge(9, 2) + mlp(7) + attn(7) + merge(7, 2) + mlp(5) + edges(5)
    assert t.sum_ms(cand) == pytest.approx(want, abs=1e-9)
    # each part weighted by its kind's coefficient
    weighted = 3.0 * plain(9) + attn(9) + 0.5 * merge(9, 2) + mlp(7) + attn(7) + 0.5 * merge(7, 2) + mlp(5) + edges(5)
    assert t.predict_ms(cand) == pytest.approx(weighted, abs=1e-9)
    assert t.kind_sums(cand) == pytest.approx({"plain": plain(9), "attn": attn(9) + attn(7), "mlp": mlp(7) + mlp(5),
                                               "free": 0.0, "merge": merge(9, 2) + merge(7, 2), "edges": edges(5)})


def test_hidden_policy_merges_in_attention_free_blocks():
    t = _table()
    cand = Candidate(removed=(1,), tome_r=1, tome_policy="hidden")
    sched = cand.schedule(3)
    counts = token_counts(9, 1, sched)
    assert sched == [1, 1, 1] and counts == [9, 8, 7, 6]
    want = (attn(9) + merge(9, 1) + mlp(8)
            + free(8) + merge_hidden(8, 1) + mlp(7) - mlp(8)  # the MLP runs on the merged tokens
            + attn(7) + merge(7, 1) + mlp(6) + edges(6))
    assert t.sum_ms(cand) == pytest.approx(want, abs=1e-9)


def test_merging_is_capped_as_the_model_caps_it():
    """r = 100 merges at most half the unprotected tokens: 9 -> 5 -> 3 -> 2; the table is read at those."""
    t = _table()
    cand = Candidate(tome_r=100)
    assert token_counts(9, 1, cand.schedule(3)) == [9, 5, 3, 2]
    want = (attn(9) + merge(9, 4) + mlp(5) + attn(5) + merge(5, 2) + mlp(3) + attn(3) + merge(3, 1) + mlp(2)
            + edges(2))
    assert t.sum_ms(cand) == pytest.approx(want, abs=1e-9)


def test_interpolation_between_grid_points_and_clamped_outside():
    parts = _table().parts
    parts["plain"] = [1.0, 4.0, 20.0]
    parts["merge"] = [[0.0, 0.0, 0.0], [1.0, 2.0, 4.0], [3.0, 5.0, 9.0]]
    t = CostTable(key=_key(), grid=list(GRID), r_grid=list(RG), parts=parts)
    assert t.part_ms("plain", 7) == pytest.approx(4.0 + 0.5 * 16.0)
    assert t.part_ms("plain", 3) == pytest.approx(1.0 + 3.0 / 3.0)
    assert t.part_ms("plain", 1) == 1.0 and t.part_ms("plain", 50) == 20.0
    # bilinear: n = 7 is halfway from 5 to 9; r = 3 halfway from 2 to 4
    assert t.merge_ms(7, 3) == pytest.approx(0.5 * (0.5 * (2.0 + 5.0) + 0.5 * (4.0 + 9.0)))
    assert t.merge_ms(7, 0) == 0.0


def test_token_grid_covers_both_ends():
    assert token_grid(197, 1, 8) == sorted({*range(197, 1, -8), 2})
    assert token_grid(9, 1, 100) == [2, 9]
    with pytest.raises(ShrinkError, match="token_step"):
        token_grid(9, 1, 0)


def test_save_load_round_trip(tmp_path):
    t = _table(coef={**dict.fromkeys(KINDS, 1.5), "free": 0.75})
    path = t.save(tmp_path / "t.json")
    back = CostTable.load(path, expect=_key())
    assert back.to_dict() == t.to_dict()
    cand = Candidate(removed=(1,), tome_r=2)
    assert back.predict_ms(cand) == t.predict_ms(cand)
    assert not list(tmp_path.glob(".*"))  # atomic: no temporary file left


@pytest.mark.parametrize("change, field", [
    ({"versions": {"torch": "9", "timm": "2"}}, "torch: table 1, wanted 9"), ({"device": "cuda:0"}, "device"),
    ({"batch_size": 8}, "batch_size"), ({"threads": 2}, "threads"), ({"runtime": "onnxruntime"}, "runtime"),
])
def test_a_table_for_another_key_is_refused_in_one_line(tmp_path, change, field):
    path = _table().save(tmp_path / "t.json")
    with pytest.raises(ShrinkError, match="another setting") as e:
        CostTable.load(path, expect=_key(**change))
    assert field in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("text, message", [
    ("{not json", "not valid JSON"), ('["a"]', f"not a {SCHEMA} table"),
    ('{"schema": "other"}', f"not a {SCHEMA}"), (None, "cannot read"),
])
def test_corrupt_tables_are_one_line_errors(tmp_path, text, message):
    path = tmp_path / "t.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ShrinkError, match=message) as e:
        CostTable.load(path)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["parts"].pop("mlp"), "part 'mlp'"),
    (lambda d: d["parts"]["plain"].__setitem__(0, float("nan")), "part 'plain'"),
    (lambda d: d["parts"]["merge"][1].pop(), "part 'merge'"),
    (lambda d: d.__setitem__("grid", [9, 5, 2]), "ascending"),
    (lambda d: d["key"].pop("depth"), "cost key fields"),
    (lambda d: d["key"].__setitem__("batch_size", "4"), "integers"),
    (lambda d: d["coef"].__setitem__("free", -1), "coef"),
    (lambda d: d["coef"].pop("merge"), "coef"),
    (lambda d: d.pop("coef"), "no 'coef'"),
    (lambda d: d.pop("r_grid"), "no 'r_grid'"),
])
def test_malformed_tables_are_one_line_errors(tmp_path, edit, message):
    d = copy.deepcopy(_table().to_dict())
    d = json.loads(json.dumps(d))
    edit(d)
    path = tmp_path / "t.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ShrinkError, match=message) as e:
        CostTable.load(path)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------
# On a real (tiny) model: the walk follows the model's own token counts; build, cache
# ------------------------------------------------------------------------------------------------

def _tiny():
    return tiny_vit(depth=2)


@pytest.mark.parametrize("cand", [Candidate(), Candidate(removed=(0,), tome_r=3),
                                  Candidate(tome_r=4, tome_inflection=-0.5), Candidate(removed=(1,), tome_r=2,
                                                                                       tome_policy="hidden")])
def test_the_plan_model_has_the_token_counts_the_table_walks(cand):
    model = _tiny()
    key = cost_key_for(model, "tiny", batch_size=2, threads=1)
    assert (key.num_tokens, key.num_protected, key.depth, key.input_size) == (17, 1, 2, (3, 16, 16))
    planned = build_plan_model(model, cand)
    want = token_counts(key.num_tokens, key.num_protected, cand.schedule(key.depth))
    assert tome_token_counts(planned, (3, 16, 16)) == want[1:]


def test_build_on_a_depth_2_vit_and_the_cache(tmp_path, caplog):
    model = _tiny()
    kw = dict(cache_dir=tmp_path, batch_size=2, threads=1, token_step=64, repeats=1, warmup=0, progress=False)
    t = cached_cost_table(model, "tiny", **kw)
    assert t.grid == [2, 17] and t.r_grid == [1, 2, 4, 8]
    assert all(len(t.parts[k]) == 2 and all(v > 0 for v in t.parts[k]) for k in ("plain", "attn", "mlp", "free", "edges"))
    assert t.parts["merge"][0] == [0.0] * 4 and all(v > 0 for v in t.parts["merge"][1])  # 2 tokens cannot merge
    fit, check = default_validation(t.key)
    assert [v["fit"] for v in t.validation] == [True] * len(fit) + [False] * len(check) and len(fit) == 4
    assert [Candidate(**v["candidate"]) for v in t.validation] == fit + check
    assert t.validation[0]["measured_speedup"] == 1.0 and set(t.coef) == set(KINDS)
    assert t.key.versions["allocator"].startswith("steady")
    path = cache_path(tmp_path, t.key)
    assert path.is_file() and CostTable.load(path, expect=t.key).to_dict() == t.to_dict()
    again = cached_cost_table(model, "tiny", **kw)  # the cached table, not a rebuild
    assert again.to_dict() == t.to_dict()
    # a cache made with other versions is not used: the reason is logged and the table rebuilt
    d = json.loads(path.read_text())
    d["key"]["versions"]["torch"] = "0.0-other"
    path.write_text(json.dumps(d))
    with caplog.at_level(logging.WARNING, logger="shrink.plan.cost"):
        rebuilt = cached_cost_table(model, "tiny", **kw)
    assert "another setting (torch: table 0.0-other, wanted" in caplog.text and "rebuilding" in caplog.text
    assert rebuilt.key == t.key and json.loads(path.read_text())["key"]["versions"]["torch"] != "0.0-other"
    d = json.loads(path.read_text())  # a table in an earlier layout is rebuilt, with the reason logged
    d["schema"] = "shrink.plan.cost/1"
    path.write_text(json.dumps(d))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="shrink.plan.cost"):
        cached_cost_table(model, "tiny", **kw)
    assert "another version of shrink (shrink.plan.cost/1): rebuilding" in caplog.text
    assert json.loads(path.read_text())["schema"] == SCHEMA
    path.write_text("{broken")  # a corrupt cache is an error, not silently replaced
    with pytest.raises(ShrinkError, match="not valid JSON.*delete it"):
        cached_cost_table(model, "tiny", **kw)


def test_build_refuses_a_key_of_another_model():
    model = _tiny()
    with pytest.raises(ShrinkError, match="blocks"):
        build_cost_table(model, _key(depth=3, num_tokens=17), repeats=1, warmup=0, progress=False, validate=[])


def test_smoothing_keeps_a_quadratic_and_drops_a_spike():
    grid = list(range(2, 60, 4))
    quad = [3.0 + 0.5 * n + 0.01 * n * n for n in grid]
    parts = {name: list(quad) for name in ("plain", "attn", "mlp", "free", "edges")}
    parts["plain"][5] *= 20  # one timing hit by other load
    parts["merge"] = parts["merge_hidden"] = [[v, 2 * v] for v in quad]
    out = smooth_parts(parts, grid, 1)
    assert out["attn"] == pytest.approx(quad, abs=1e-9)
    assert out["plain"] == pytest.approx(quad, rel=1e-6)  # the spike is left out of the fit
    assert max_merge(2, 1) == 0 and out["merge"][0] == [quad[0], 2 * quad[0]]  # no merge at 2 tokens: not fitted
    assert [row[1] for row in out["merge"][1:]] == pytest.approx([2 * v for v in quad[1:]], rel=1e-6)
    assert parts["plain"][5] == 20 * quad[5]  # the input is not changed


@pytest.mark.parametrize("key", ["cait", "parallel-scaling", "beit"])
def test_families_whose_parts_are_not_timed_are_refused_in_one_line(key):
    from shrink.plan.cost import cost_key_for

    from .._families import build

    with pytest.raises(ShrinkError, match="the cost model times") as e:
        cost_key_for(build(key), key, device="cpu", dtype="fp32", batch_size=2, threads=1, runtime="eager")
    assert "\n" not in str(e.value)


def test_an_eva_model_gets_a_table_with_its_own_kernel():
    from shrink.plan import Candidate
    from shrink.plan.cost import build_cost_table, cost_key_for

    from .._families import build

    model = build("dinov3-rope")
    key = cost_key_for(model, "dinov3-rope", device="cpu", dtype="fp32", batch_size=2, threads=1, runtime="eager")
    table = build_cost_table(model, key, token_step=4, repeats=1, warmup=0, progress=False)
    assert table.predict_ms(Candidate((0,), tome_r=1)) > 0 and table.dense_ms() > 0


def test_the_fit_recovers_per_kind_factors_it_can_see_and_reproduces_its_plans():
    """Whole models that cost 1.1 x their attention-free sums and 1.5 x their merge sums (the rest exact).
    Plans that tell every kind apart: the fit finds those factors and predicts plans it did not see.
    The four default plans cannot tell six kinds apart: the fit still reproduces each of them."""
    t = _table()  # its merge cost is linear in (n, r) like the halves': made quadratic in r to tell them apart
    t.parts["merge"] = [[merge(n, r) + r * r for r in RG] for n in GRID]
    truth = {**dict.fromkeys(KINDS, 1.0), "free": 1.1, "merge": 1.5}

    def measure(c):
        return sum(truth[k] * v for k, v in t.kind_sums(c).items())

    many = [Candidate(), Candidate(removed=(0, 1, 2)), Candidate(tome_r=1), Candidate(tome_r=4),
            Candidate(tome_r=1, tome_start_idx=1), Candidate(removed=(0,), tome_r=2), Candidate(removed=(2,), tome_r=1),
            Candidate(removed=(0, 1), tome_r=3, tome_policy="hidden")]
    coef = fit_coefficients([t.kind_sums(c) for c in many], [measure(c) for c in many], ridge=1e-9)
    assert coef == pytest.approx(truth, rel=1e-4)
    t.coef = coef
    for c in [Candidate(removed=(1,), tome_r=2, tome_policy="hidden"), Candidate(removed=(1, 2), tome_r=1)]:
        assert t.predict_ms(c) == pytest.approx(measure(c), rel=1e-4)
    fit, _ = default_validation(t.key)
    t.coef = fit_coefficients([t.kind_sums(c) for c in fit], [measure(c) for c in fit], ridge=1e-9)
    for c in fit:
        assert t.predict_ms(c) == pytest.approx(measure(c), rel=1e-6)
    # only the dense model measured: every kind takes its measured / summed ratio
    dense = Candidate()
    only = fit_coefficients([t.kind_sums(dense)], [2.0 * t.sum_ms(dense)])
    assert only == pytest.approx(dict.fromkeys(KINDS, 2.0))


@pytest.mark.parametrize("sums, measured", [([], []), ([{"plain": 1.0}], [0.0]), ([{"plain": 1.0}], [float("nan")]),
                                            ([{"plain": 0.0}], [1.0]), ([{"plain": 1.0}], [1.0, 2.0])])
def test_the_fit_refuses_what_it_cannot_fit(sums, measured):
    with pytest.raises(ShrinkError, match="fit_coefficients") as e:
        fit_coefficients(sums, measured)
    assert "\n" not in str(e.value)
