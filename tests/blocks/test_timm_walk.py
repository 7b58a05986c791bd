"""Every model name of timm's isotropic transformer modules, built on the meta device (no memory, no
weights) and classified by the block contract: each block is accepted with its family's adapter
(and dilutes), or the model is refused with a one-line ShrinkError. No traceback, nothing unknown.
The numerical checks of each block class are in test_blocks.py (one tiny real model per class).

Weight init is skipped on meta tensors here (timm's truncated normal, torch.nn.init's fills): it fills
no values there, but each of its in-place ops runs through torch's Python reference kernels, which
took 9 of every 10 seconds of the walk."""
from __future__ import annotations

import collections

import pytest
import timm
import torch

import shrink
from shrink.blocks.contract import FAMILIES, block_family, classify_block

MODULES = ("vision_transformer", "deit", "eva", "beit", "cait", "vision_transformer_relpos",
           "vision_transformer_hybrid", "vision_transformer_sam", "naflexvit")


def _names() -> list[str]:
    return sorted({n for m in MODULES for n in timm.list_models(module=m)})


# the weight-filling functions that timm's models call while they are built
_TORCH_INIT = ("uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
               "xavier_normal_", "constant_", "zeros_", "ones_")


def _skip_on_meta(fill):
    return lambda t, *a, **kw: t if t.is_meta else fill(t, *a, **kw)


@pytest.fixture
def no_init_on_meta(monkeypatch):
    """timm's truncated normal and torch.nn.init's fills return a meta tensor unchanged (they fill no
    values there); any other tensor is filled as before."""
    from timm.layers import weight_init

    monkeypatch.setattr(weight_init, "_trunc_normal_", _skip_on_meta(weight_init._trunc_normal_))
    for name in _TORCH_INIT:
        monkeypatch.setattr(torch.nn.init, name, _skip_on_meta(getattr(torch.nn.init, name)))


def test_init_is_skipped_on_meta_only(no_init_on_meta):
    from timm.layers import trunc_normal_

    with torch.device("meta"):
        assert trunc_normal_(torch.empty(3)).is_meta and torch.nn.init.kaiming_uniform_(torch.empty(3, 3)).is_meta
        assert timm.create_model("vit_tiny_patch16_224").blocks[0].attn.qkv.weight.is_meta
    t = trunc_normal_(torch.zeros(1000), std=0.02)
    assert t.abs().max() <= 2.0 and t.std() == pytest.approx(0.02, rel=0.2)  # a real tensor is filled
    assert torch.nn.init.ones_(torch.zeros(3)).tolist() == [1.0, 1.0, 1.0]
    linear = torch.nn.Linear(64, 64)  # reset_parameters: kaiming_uniform_ on the weight
    assert 0 < linear.weight.abs().max() <= 1 / 8


@pytest.mark.slow
def test_every_isotropic_transformer_name_is_accepted_or_refused_in_one_line(one_thread, no_init_on_meta):
    names = _names()
    assert len(names) > 250  # timm 1.0.x lists ~300; a much smaller number means the walk broke
    families: collections.Counter[str] = collections.Counter()
    refused: dict[str, str] = {}
    for name in names:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
        blocks = model.blocks
        kinds = {classify_block(b) for b in blocks}
        if kinds != {"attention"}:
            with pytest.raises(shrink.ShrinkError) as e:
                shrink.dilute(model, range(len(blocks)))
            assert "\n" not in str(e.value)
            refused[name] = str(e.value)
            continue
        fams = {block_family(b).name for b in blocks}
        assert len(fams) == 1, (name, fams)
        shrink.dilute(model, range(len(blocks)), lam=0.5)  # every block takes the diluted form
        assert all(classify_block(b) == "diluted" for b in model.blocks), name
        families[fams.pop()] += 1
    assert not refused, refused  # today every block class of these modules has an adapter
    assert set(families) <= set(FAMILIES)
    # every family but the test-only variants (fused out_proj, use_post_norm) has real timm names
    assert {"vit", "eva", "eva-postnorm", "beit", "cait", "relpos", "relpos-respost", "respost", "sam",
            "parallel-things", "parallel-scaling", "diff-parallel-scaling"} <= set(families)
    assert sum(families.values()) == len(names)
    docs = {k: int(v["timm names"]) for k, v in docs_table().items()}
    assert docs == dict(families), "docs/families.md's name counts are not timm's: update the table"


def docs_table() -> dict[str, dict[str, str]]:
    """docs/families.md's first table: family -> {column: cell}."""
    from pathlib import Path

    lines = (Path(__file__).resolve().parents[2] / "docs" / "families.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| family | block class |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = dict(zip(header, cells, strict=True))
    return rows


def test_docs_table_lists_every_family_with_its_rule_and_tome_status():
    rows = docs_table()
    assert set(rows) == set(FAMILIES)
    for name, fam in FAMILIES.items():
        row = rows[name]
        assert row["rule (s)"] == f"{fam.residual_scale:g}", name
        merging = name != "sam"  # tests/blocks/test_blocks.py MERGING
        assert row["ToMe r > 0"].startswith("yes" if merging else "refused"), name
        assert f"{fam.classes[0].__module__.split('.')[-1]}.{fam.classes[0].__name__}" in row["block class"], name
