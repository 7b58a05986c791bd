"""Every model name of timm's isotropic transformer modules, built on the meta device (no memory, no
weights) and classified by the block contract: each block is accepted with its family's adapter
(and dilutes), or the model is refused with a one-line ShrinkError. No traceback, nothing unknown.
The numerical checks of each block class are in test_blocks.py (one tiny real model per class)."""
from __future__ import annotations

import collections

import pytest
import timm
import torch

import shrink
from shrink.blocks import FAMILIES, block_family, classify_block

MODULES = ("vision_transformer", "deit", "eva", "beit", "cait", "vision_transformer_relpos",
           "vision_transformer_hybrid", "vision_transformer_sam", "naflexvit")


def _names() -> list[str]:
    return sorted({n for m in MODULES for n in timm.list_models(module=m)})


@pytest.mark.slow
def test_every_isotropic_transformer_name_is_accepted_or_refused_in_one_line(one_thread):
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

    lines = (Path(__file__).resolve().parents[1] / "docs" / "families.md").read_text().splitlines()
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
        merging = name in ("vit", "respost", "parallel-things", "parallel-scaling",
                           "diff-parallel-scaling")  # tests/test_blocks.py MERGING
        assert row["ToMe r > 0"].startswith("yes" if merging else "refused"), name
        assert f"{fam.classes[0].__module__.split('.')[-1]}.{fam.classes[0].__name__}" in row["block class"], name
