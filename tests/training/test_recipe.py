"""shrink.training.parts: the pieces of a run built from a RunConfig."""
from __future__ import annotations

import torch

from shrink.training.config import RunConfig

from ..conftest import ROOT


def test_deit_base_configs_use_a_constant_drop_path():
    from timm.layers import DropPath

    from shrink.cli.run_flags import load_yaml
    from shrink.training.parts import build_model

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


def test_loader_workers_draw_the_same_after_the_rng_is_restored(tmp_path):
    """What a resume does to the data loader: the process RNG saved after epoch 0, restored into a
    fresh loader, gives epoch 1 the augmentations the running loader gives it (2 workers, real photos,
    the default RandAugment, random erasing). Persistent workers kept their own streams instead."""
    from shrink.training.parts import build_datasets, make_loader

    from ..conftest import real_image_folder

    root = real_image_folder(tmp_path / "imgs", per_class=4, val_per_class=1, truncated=False)
    cfg = RunConfig(data_set="folder", data_path=str(root), input_size=32, num_workers=2, batch_size=4, reprob=0.5)
    train, _, _ = build_datasets(cfg)
    torch.manual_seed(0)
    loader = make_loader(train, cfg, train=True)
    first = [x for x, _ in loader]
    saved = torch.get_rng_state()
    second = [x for x, _ in loader]
    torch.set_rng_state(saved)
    resumed = [x for x, _ in make_loader(train, cfg, train=True)]
    assert len(second) == 2 and all(torch.equal(a, b) for a, b in zip(second, resumed, strict=True))
    assert not torch.equal(first[0], second[0])  # and the epochs do differ
