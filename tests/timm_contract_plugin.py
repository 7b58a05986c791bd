"""pytest plugin: run timm's own ``tests/test_models.py`` on this project's registered models only.

Used by ``tests/models/test_timm_contract.py``, which runs, in a subprocess, from the folder that holds the
extracted ``tests/`` (fetched by the ``timm_tests`` fixture of conftest.py)::

    cd .cache/timm-tests/<version>
    PYTHONPATH=<repo>/tests python -m pytest tests/test_models.py -c /dev/null --rootdir . -p timm_contract_plugin

(``-c /dev/null --rootdir .``: timm's tests run without this project's pytest configuration.)

What it changes, and nothing else (timm's test file is run as it is):

1. ``import shrink`` before ``test_models.py`` is imported, so the project's models are registered.
2. ``timm.list_models`` / ``timm.list_pretrained`` (which ``test_models.py`` imports by name and calls
   at import time to parametrise its tests) are wrapped so that they return only the project's names,
   after timm's own filtering. Two of timm's filter lists get the project's entries added, exactly as
   timm adds one of its own families to them:

   - ``FEAT_INTER_FILTERS`` (the modules whose models implement ``forward_intermediates`` and
     ``features_only`` through ``FeatureGetterNet``): :data:`FEAT_INTER_MODULES` is added to any list
     passed as ``module=`` (``test_models.py`` passes no other list there);
   - ``NON_STD_FILTERS`` (token / vector models whose ``forward_features`` is not an NCHW map):
     :data:`NON_STD_PATTERNS` is added to any pattern list that contains timm's ``'vit_*'``, the
     first entry of that list (alone or in ``EXCLUDE_FILTERS + NON_STD_FILTERS``).

3. Every collected test that is not parametrised with one of the project's models is deselected:
   the tests hard-wired to timm's own model names (``test_swin_family_*``, ``regnetx_002`` ...) and
   those whose model list is empty here (``test_model_inference`` takes ``test_*`` models only).
4. timm's markers (``base``, ``cfg`` ... and pytest-timeout's ``timeout``) are registered, so the
   run has no unknown-marker warnings; the timeouts themselves need pytest-timeout and are not applied.
5. With ``TIMM_CONTRACT_CLAIMS=<folder>`` in the environment, a test runs only if this process is the
   first to claim it (it creates ``<folder>/<hash of the test id>``); ``tests/models/test_timm_contract.py``
   runs two such processes side by side on the same list (one thread each, one per core) and joins
   their results: each test runs once, in whichever process reaches it first, so neither waits for
   the other however long the tests are.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from pathlib import Path

import pytest

# Registry module names (timm keeps the last component of the defining module) of the families with
# forward_intermediates / prune_intermediate_layers / feature_info: FF-ViT, FNet, MS-MLP, the presets
# of timm's MlpMixer and the digits ViT (timm's VisionTransformer).
FEAT_INTER_MODULES = ("ff_vit", "fnet", "ms_mlp", "mlp_presets", "vit_digits")

# The project's non-standard models, as timm lists 'vit_*', 'deit*', '*mixer_*' ...: FF-ViT and FNet
# return tokens (B, N, C) from forward_features, BottleneckMLP a vector (B, C). The presets match timm's
# own '*mixer_*', 'resmlp_*', 'gmlp_*' and vit_digits matches 'vit_*'. MS-MLP is standard (NCHW, like Swin).
NON_STD_PATTERNS = ("ffvit_*", "fnet_*", "bottleneck_mlp_*")

_TIMM_MARKERS = ("base", "forward", "backward", "cfg", "cfg_nonstd", "torchscript", "features", "fxforward",
                 "fxbackward", "timeout")

CLAIMS_ENV = "TIMM_CONTRACT_CLAIMS"  # a folder shared by the processes that split the tests

_timm_list_models = None  # timm's own list_models, kept when the wrapper is installed


def project_model_names() -> list[str]:
    """The models this project registers with timm (entrypoints defined in ``shrink.models.*``)."""
    import timm
    from timm.models import model_entrypoint

    import shrink  # noqa: F401  (registers the project's models)

    list_models = _timm_list_models or timm.list_models
    return sorted(n for n in list_models() if model_entrypoint(n).__module__.startswith("shrink.models."))


def model_of(name: str) -> str:
    """``'vit_digits.dense'`` -> ``'vit_digits'`` (timm lists some names with their pretrained tag)."""
    return name.split(".", 1)[0]


def _patterns(value: str | Iterable[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _with_non_std(value: str | Iterable[str]) -> str | list[str]:
    if isinstance(value, str) or "vit_*" not in value:
        return value
    return [*value, *NON_STD_PATTERNS]


def install() -> None:
    """Wrap ``timm.list_models`` / ``timm.list_pretrained`` (idempotent)."""
    global _timm_list_models
    import timm

    if _timm_list_models is not None:
        return
    _timm_list_models = timm.list_models
    project = set(project_model_names())

    def list_models(filter="", module="", pretrained=False, exclude_filters="", name_matches_cfg=False,
                    include_tags=None):
        if not isinstance(module, str):  # test_models.py's FEAT_INTER_FILTERS
            module = [*_patterns(module), *FEAT_INTER_MODULES]
        names = _timm_list_models(filter=_with_non_std(filter), module=module, pretrained=pretrained,
                                  exclude_filters=_with_non_std(exclude_filters),
                                  name_matches_cfg=name_matches_cfg, include_tags=include_tags)
        return [n for n in names if model_of(n) in project]

    def list_pretrained(filter="", exclude_filters=""):
        return list_models(filter=filter, pretrained=True, exclude_filters=exclude_filters, include_tags=True)

    timm.list_models = list_models
    timm.list_pretrained = list_pretrained


def pytest_configure(config: pytest.Config) -> None:
    for marker in _TIMM_MARKERS:
        config.addinivalue_line("markers", f"{marker}: timm's test_models.py marker")
    install()


def claim(folder: str | os.PathLike, nodeid: str) -> bool:
    """True for the first process that claims ``nodeid`` in ``folder`` (an exclusive create), False after."""
    path = Path(folder) / hashlib.sha1(nodeid.encode()).hexdigest()
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> bool | None:
    folder = os.environ.get(CLAIMS_ENV)
    if folder and not claim(folder, item.nodeid):
        return True  # another process runs it: no set-up, no call, no report here
    return None  # pytest's own protocol runs the test


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    project = set(project_model_names())
    keep, drop = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        name = callspec.params.get("model_name") if callspec is not None else None
        ours = isinstance(name, str) and model_of(name) in project
        (keep if ours else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
