"""shrink.recipe: the pieces of a run built from a RunConfig."""
from __future__ import annotations

from shrink.config import RunConfig

from .conftest import ROOT


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
