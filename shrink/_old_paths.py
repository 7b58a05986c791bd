"""The module paths of shrink 0.1's flat layout, kept as aliases for one release (docs/architecture.md).

``import shrink.train`` still works: a finder on ``sys.meta_path`` answers the old name with the
module that now holds the code (the same module object, so ``monkeypatch`` and ``isinstance`` see
one thing) and warns once with a ``DeprecationWarning`` naming the new path.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings

OLD_PATHS = {
    "shrink.checkpoint": "shrink.modelio.checkpoint",
    "shrink.factory": "shrink.modelio.create",
    "shrink.dilution": "shrink.blocks.dilution",
    "shrink.criteria": "shrink.selection.criteria",
    "shrink.tome": "shrink.merging.patch",
    "shrink.tome_merge": "shrink.merging.merge",
    "shrink.tome_kernels": "shrink.merging.kernels",
    "shrink.tome_rope": "shrink.merging.rope",
    "shrink.tome_relpos": "shrink.merging.relpos",
    "shrink.tome_cait": "shrink.merging.cait",
    "shrink.tome_vis": "shrink.merging.vis",
    "shrink.train": "shrink.training.trainer",
    "shrink.engine": "shrink.training.loop",
    "shrink.recipe": "shrink.training.parts",
    "shrink.rundir": "shrink.training.run_folder",
    "shrink.report": "shrink.training.metrics",
    "shrink.sharding": "shrink.training.sharding",
    "shrink.config": "shrink.training.config",
    "shrink.wrappers": "shrink.unwrap",
}
# shrink.export is the function (shrink.export(model)); its module is shrink.blocks.attention_free.
# shrink.blocks, shrink.selection, shrink.data and shrink.cli kept their names: they are packages now and
# export the same public names.


class _AliasLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return None  # a plain module, replaced in exec_module

    def exec_module(self, module) -> None:
        new = OLD_PATHS[module.__name__]
        warnings.warn(f"{module.__name__} moved to {new}; the old path goes in the next release",
                      DeprecationWarning, stacklevel=2)
        sys.modules[module.__name__] = importlib.import_module(new)  # the import system returns this one


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname in OLD_PATHS:
            return importlib.machinery.ModuleSpec(fullname, _AliasLoader())
        return None


def install() -> None:
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.append(_AliasFinder())
