"""Layer selection: Gaussian entropy, transfer entropy, the other criteria, ratio -> k, model hygiene."""
from __future__ import annotations

import json
import math

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import DataLoader, TensorDataset

from shrink import ShrinkError
from shrink.selection.criteria import pre_logits
from shrink.selection.layers import CRITERIA, layer_table, ratio_to_k, select_layers, transfer_entropy

from ..conftest import tiny_vit


def loader(n: int = 48, batch: int = 16, seed: int = 1) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    ds = TensorDataset(torch.randn(n, 3, 16, 16, generator=g), torch.zeros(n, dtype=torch.long))
    return DataLoader(ds, batch_size=batch, shuffle=False)


def zero_attention(model: VisionTransformer, i: int) -> None:
    with torch.no_grad():
        model.blocks[i].attn.proj.weight.zero_()
        model.blocks[i].attn.proj.bias.zero_()


@pytest.mark.parametrize("ratio,depth,k", [
    (0.25, 12, 3), (0.3, 12, 4), (0.4, 12, 5), (0.5, 12, 6),  # the reference table
    (0.125, 12, 2),   # 1.5: both rules give 2
    (0.375, 12, 5),   # 4.5: half-up gives 5, Python's round() (banker's) would give 4
    (0.125, 4, 1),    # 0.5: half-up gives 1, round() gives 0
    (0.58, 25, 15),   # 14.499999999999998 in floats: the tolerance reads it as 14.5
    (0.0, 12, 0), (0.99, 12, 12),
])
def test_ratio_to_k_rounds_half_up(ratio, depth, k):
    assert ratio_to_k(ratio, depth) == k


def test_ratio_to_k_differs_from_banker_rounding_deliberately():
    assert round(0.375 * 12) == 4 and ratio_to_k(0.375, 12) == 5


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), "x"])
def test_ratio_to_k_rejects_bad_ratio(bad):
    with pytest.raises(ShrinkError):
        ratio_to_k(bad, 12)


def test_transfer_entropy_of_empty_set_is_zero():
    assert transfer_entropy(tiny_vit(), loader(), []) == 0.0


def test_zero_attention_layer_has_zero_te_and_zero_cosine():
    m = tiny_vit()
    zero_attention(m, 3)
    dl = loader()
    assert transfer_entropy(m, dl, [3]) == 0.0
    assert transfer_entropy(m, dl, [1]) != 0.0
    res = select_layers(m, dl, k=1, criterion="cosine", progress=False)
    cos = res.scores["per_layer"]["cosine"]
    assert cos[3] == 0.0
    assert all(v > 0 for i, v in cos.items() if i != 3)
    assert res.layers == [3]
    te = select_layers(m, dl, k=1, criterion="transfer_entropy", progress=False, te_abs=True)
    assert te.scores["steps"][0]["candidates"][3] == 0.0
    assert te.layers == [3]  # |TE| = 0 is the unique minimum


def test_greedy_te_distinct_in_range_deterministic_and_counts_passes():
    m = tiny_vit()
    dl = loader()
    a = select_layers(m, dl, ratio=0.5, criterion="transfer_entropy", progress=False)
    b = select_layers(m, dl, ratio=0.5, criterion="transfer_entropy", progress=False)
    assert a.layers == b.layers
    assert a.scores["steps"] == b.scores["steps"]
    assert len(a.layers) == 3 == len(set(a.layers)) and all(0 <= i < 6 for i in a.layers)
    assert a.forward_passes == 1 + (6 + 5 + 4)  # base pass + one per candidate per step
    # each step picks the minimum signed TE among its candidates, and its TE is TE of the chosen prefix
    for s, step in enumerate(a.scores["steps"]):
        assert step["layer"] == min(step["candidates"], key=lambda li: (step["candidates"][li], li))
        assert step["score"] == pytest.approx(transfer_entropy(m, dl, a.layers[: s + 1]), abs=1e-9)
    json.dumps(a.to_json())  # JSON-able


def test_one_shot_te_ranks_single_layer_te():
    m = tiny_vit(depth=4)
    dl = loader(32)
    r = select_layers(m, dl, k=2, criterion="transfer_entropy", greedy=False, progress=False)
    single = {i: transfer_entropy(m, dl, [i]) for i in range(4)}
    assert r.layers == sorted(single, key=lambda i: single[i])[:2]
    assert r.forward_passes == 1 + 4 + 1  # base, one per layer, TE of the chosen set


@pytest.mark.parametrize("criterion", ["entropy", "cosine", "block_influence"])
@pytest.mark.parametrize("greedy", [True, False])
def test_scored_criteria_pick_lowest(criterion, greedy):
    m = tiny_vit()
    r = select_layers(m, loader(), k=2, criterion=criterion, greedy=greedy, progress=False)
    key = {"entropy": "attn_entropy"}.get(criterion, criterion)
    first = r.scores["per_layer"][key]
    assert r.layers[0] == min(first, key=first.get)
    assert len(set(r.layers)) == 2
    assert r.forward_passes == 1 + (1 if greedy else 0) + 1


def test_random_is_seeded_last_and_manual():
    m = tiny_vit()
    r0 = select_layers(m, None, k=3, criterion="random", seed=0)
    assert r0.layers == select_layers(m, None, k=3, criterion="random", seed=0).layers
    seeds = {tuple(select_layers(m, None, k=3, criterion="random", seed=s).layers) for s in range(5)}
    assert len(seeds) > 1
    assert r0.forward_passes == 0
    assert select_layers(m, None, k=2, criterion="last").layers == [4, 5]
    assert select_layers(m, None, criterion="manual", layers=[3, 0]).layers == [3, 0]
    with pytest.raises(ShrinkError):
        select_layers(m, None, k=2, criterion="manual")
    with pytest.raises(ShrinkError):
        select_layers(m, None, k=2, criterion="manual", layers=[0, 1, 2])
    with pytest.raises(ShrinkError):
        select_layers(m, None, criterion="manual", layers=[0, 9])


def test_bad_arguments():
    m = tiny_vit()
    with pytest.raises(ShrinkError):
        select_layers(m, loader(), ratio=0.4, criterion="nope")
    with pytest.raises(ShrinkError):
        select_layers(m, loader(), ratio=0.4, k=2)
    with pytest.raises(ShrinkError):
        select_layers(m, None, ratio=0.4)  # transfer entropy needs data
    with pytest.raises(ShrinkError):
        select_layers(m, loader(), k=7)
    with pytest.raises(ShrinkError):
        select_layers(m, loader(), ratio=1.0)


def test_k_zero_returns_empty():
    r = select_layers(tiny_vit(), loader(), ratio=0.0, progress=False)
    assert r.layers == [] and r.scores["steps"] == []


def test_selection_leaves_model_unchanged():
    m = tiny_vit()
    m.train()
    m.blocks[1].eval()  # a mixed mode must survive too
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(3, 3, 16, 16)
    modes = [mod.training for mod in m.modules()]
    m.eval()
    with torch.no_grad():
        out = m(x)
    m.train()
    m.blocks[1].eval()
    for c in CRITERIA:
        kw = {"layers": [0, 2]} if c == "manual" else {"k": 2}
        select_layers(m, loader(), criterion=c, progress=False, **kw)
    assert [mod.training for mod in m.modules()] == modes
    assert m.state_dict().keys() == sd.keys()
    assert all(torch.equal(m.state_dict()[k], v) for k, v in sd.items())
    assert all(not mod._forward_hooks and not mod._forward_pre_hooks for mod in m.modules())
    assert all("forward" not in b.__dict__ for b in m.blocks)
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(x), out, rtol=0, atol=0)


def test_avg_pool_model_without_class_token():
    m = tiny_vit(class_token=False, global_pool="avg")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(m.head(pre_logits(m, x)), m(x), rtol=0, atol=1e-6)
    r = select_layers(m, loader(), k=2, progress=False)
    assert len(set(r.layers)) == 2


@pytest.mark.parametrize("name", ["mixer_s16_224", "resmlp_12_224"])
def test_model_without_attention_is_refused(name):
    m = timm.create_model(name, pretrained=False, img_size=32, num_classes=10)
    with pytest.raises(ShrinkError, match="no attention blocks"):
        select_layers(m, loader(8, batch=4), ratio=0.4, progress=False)


def test_diluted_model_is_refused():
    import shrink

    m = tiny_vit()
    shrink.dilute(m, [0])
    with pytest.raises(ShrinkError, match="untouched"):
        select_layers(m, loader(), ratio=0.4, progress=False)


def test_table_and_plot(tmp_path):
    r = select_layers(tiny_vit(), loader(), ratio=0.4, progress=False)
    text = layer_table(r)
    assert "H(attn)" in text and "TE" in text and str(r.layers) in text
    from shrink.selection.layers import plot_selection

    plot_selection(r, tmp_path / "sel.png")
    assert (tmp_path / "sel.png").read_bytes()[:4] == b"\x89PNG"
    assert not math.isnan(r.scores["feature_entropy"])


def test_loader_is_read_once_per_selection():
    class Counting:
        def __init__(self, dl):
            self.dl, self.iters = dl, 0

        def __iter__(self):
            self.iters += 1
            return iter(self.dl)

    dl = Counting(loader())
    r = select_layers(tiny_vit(depth=4), dl, k=2, progress=False)
    assert r.forward_passes == 1 + 4 + 3 and dl.iters == 1  # later passes reuse the cached batches


def test_a_registered_criterion_runs_through_select_layers():
    from shrink.selection.registry import register_criterion, unregister_criterion

    @register_criterion("first_first")
    def first_first(scoring, skipped, remaining):  # lower removes first: the lowest index
        assert scoring.stats(skipped, remaining).images == 48  # measured on the calibration images
        return {li: float(li) for li in remaining}

    try:
        assert "first_first" in CRITERIA
        r = select_layers(tiny_vit(depth=4), loader(), k=2, criterion="first_first", progress=False)
        assert r.layers == [0, 1] and r.criterion == "first_first"
        assert [s["layer"] for s in r.scores["steps"]] == [0, 1]
        with pytest.raises(ShrinkError, match="needs calibration images"):
            select_layers(tiny_vit(depth=4), None, k=1, criterion="first_first")
    finally:
        unregister_criterion("first_first")
    assert "first_first" not in CRITERIA


def test_an_unknown_criterion_is_one_line():
    with pytest.raises(ShrinkError) as e:
        select_layers(tiny_vit(depth=4), None, k=1, criterion="entropyy")
    assert str(e.value) == ("unknown selection criterion 'entropyy'; choose one of transfer_entropy, entropy, "
                            "cosine, block_influence, random, last, manual")
