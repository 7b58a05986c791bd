"""``shrink.models`` in an installed package and in a clone that is not installed.

pyproject.toml installs the repository's top-level ``models/`` folder as ``shrink.models``; in a
source tree used without installing it (``PYTHONPATH=.`` in a clone, as on a bare GPU machine) that
mapping does not exist. There, the folder beside the package (a source tree: ``pyproject.toml`` and
``models/__init__.py`` next to ``shrink/``) is loaded under the name ``shrink.models``, so a clone
always runs its own model files. An installed wheel has no pyproject.toml beside the package and
imports the mapped package as usual. Nothing here imports a top-level ``models``.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

_PACKAGE = __name__.rpartition(".")[0]


def _import_models() -> ModuleType:
    root = Path(__file__).resolve().parent.parent
    init = root / "models" / "__init__.py"
    name = _PACKAGE + ".models"
    if name in sys.modules:
        return sys.modules[name]
    if not ((root / "pyproject.toml").is_file() and init.is_file()):
        from shrink import models as installed

        return installed
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


models = _import_models()
