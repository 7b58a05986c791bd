"""timm's model contract: timm's own ``tests/test_models.py`` run on the models this project registers.

The test file of the *installed* timm is fetched once, inside the test session (the ``timm_tests``
fixture of conftest.py: the sdist through ``pip download``, extracted into
``.cache/timm-tests/<version>/tests``, skipped with the reason when the index cannot be reached) and run here, unchanged, in a subprocess with
``tests/timm_contract_plugin.py`` (which restricts its model lists to the project's names). Every
(timm test, project model) pair is accounted for:

- it ran and passed, or
- it is in :data:`NOT_COLLECTED`: timm's own filters leave it out, as they do for timm's comparable
  families (with the reason), or
- it is in :data:`TIME_LIMITED`: deselected to keep this test under 4 minutes on 2 CPU cores (with
  the measured cost; the same code runs on the family's smaller sizes), or
- it is in :data:`EXCLUDED`: it runs and does not pass (with the reason).

A pair listed in one of the tables that passes, or that runs although listed as not run, fails this
test too, so the tables stay true. ``docs/mlp_families.md`` ("timm's model contract") has the results
per family.

    pytest tests/models/test_timm_contract.py
"""
import fnmatch
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from ..timm_contract_plugin import CLAIMS_ENV, claim, model_of, project_model_names

REPO = Path(__file__).resolve().parents[2]
# the contract runs in this many processes side by side (one thread each), each test in whichever reaches it
# first: CI's 2 cores, both busy while the pytest process that runs this file waits
SHARDS = 2

# timm's tests that are parametrised over timm.list_models / list_pretrained (one result per model).
# Every other test in test_models.py is hard-wired to timm's own model names and is deselected.
PER_MODEL_TESTS = (
    "test_model_inference",
    "test_model_forward",
    "test_model_backward",
    "test_model_default_cfgs",
    "test_model_default_cfgs_non_std",
    "test_model_load_pretrained",
    "test_model_features_pretrained",
    "test_model_forward_torchscript",
    "test_model_forward_features",
    "test_model_features_space2depth_reduction",
    "test_model_forward_intermediates_features",
    "test_model_forward_intermediates",
    "test_prune_intermediate_layers_contract",
    "test_model_forward_fx",
    "test_model_backward_fx",
    "test_model_forward_fx_torchscript",
)

_TOKEN_MODELS = ("ffvit_*", "fnet_*", "mixer_*", "resmlp_*", "gmlp_*", "vit_digits")  # (B, N, C) features
_NON_STD = (*_TOKEN_MODELS, "bottleneck_mlp_*")  # timm's NON_STD_FILTERS + the plugin's NON_STD_PATTERNS
_NO_FEATURE_MAP = ("BottleneckMLP has no token or spatial feature map (the image is flattened into one vector): "
                   "forward_intermediates / features_only do not apply, and timm lists only the modules that "
                   "implement them in FEAT_INTER_FILTERS")

# (timm test, model patterns, reason): pairs that timm's own filters leave out.
NOT_COLLECTED: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("test_model_inference", ("*",),
     "timm's own pretrained test_* models only: it compares with reference outputs stored on the Hugging Face Hub"),
    ("test_model_features_space2depth_reduction", ("*",), "timm's efficientnet_h / efficientnet_x models only"),
    ("test_model_load_pretrained", ("bottleneck_mlp_*", "ffvit_*", "fnet_*", "msmlp_*", "mixer_*", "resmlp_*",
                                    "gmlp_*"),
     "no pretrained weights: none of these families publishes weights in timm's format, and pretrained=True "
     "raises timm's own error (their own test files check that); only vit_digits ships weights"),
    ("test_model_features_pretrained", ("*",),
     "pretrained features_only: vit_digits, the one model with weights, is non-standard ('vit_*'), which timm "
     "keeps out of this test as for all its ViTs; the others have no weights"),
    ("test_model_default_cfgs", _NON_STD,
     "non-standard forward_features output (tokens, or one vector): checked by test_model_default_cfgs_non_std "
     "instead, as timm does for its ViT / MLP-Mixer / ResMLP / gMLP (NON_STD_FILTERS)"),
    ("test_model_default_cfgs_non_std", ("msmlp_*",),
     "a standard model (NCHW map, pool_size, global_pool=''), like timm's Swin: checked by test_model_default_cfgs"),
    ("test_model_forward_features", _TOKEN_MODELS,
     "timm keeps its non-standard models (ViT, MLP-Mixer: NON_STD_FILTERS) out of this test; their features_only "
     "path (FeatureGetterNet over forward_intermediates) runs in test_model_forward_intermediates_features"),
    ("test_model_forward_features", ("bottleneck_mlp_*",), _NO_FEATURE_MAP),
    ("test_model_forward_intermediates_features", ("bottleneck_mlp_*",), _NO_FEATURE_MAP),
    ("test_model_forward_intermediates", ("bottleneck_mlp_*",), _NO_FEATURE_MAP),
    ("test_prune_intermediate_layers_contract", ("bottleneck_mlp_*",), _NO_FEATURE_MAP),
)

# (timm test, model) -> reason: deselected (pytest --deselect) for time. Seconds measured on this project's
# shared 2-core CPU, one thread (2026-11-21). timm itself keeps this marker-less test out of its CI ("slow,
# prunes every model at every feature index").
_PRUNE_COST = ("prunes and runs the model once per feature index (forward, backward, deep copies): "
               "{s} s of the contract's 4-minute budget; the same code runs on {same}")
TIME_LIMITED: dict[tuple[str, str], str] = {
    ("test_prune_intermediate_layers_contract", "ffvit_base_patch16_224"):
        _PRUNE_COST.format(s=48, same="ffvit_tiny_patch16_224 and ffvit_nano"),
    ("test_prune_intermediate_layers_contract", "fnet_base_patch16_224"):
        _PRUNE_COST.format(s=38, same="fnet_keras_cifar100 and fnet_nano"),
    ("test_prune_intermediate_layers_contract", "gmlp_s4_cifar"):
        _PRUNE_COST.format(s=16, same="gmlp_nano_cifar (timm's own MlpMixer class)"),
    ("test_prune_intermediate_layers_contract", "msmlp_base_patch4_shift5_224"):
        _PRUNE_COST.format(s=11, same="msmlp_small / msmlp_tiny / msmlp_nano"),
}

# (timm test, model) -> reason: pairs that run and do not pass. None at present; an entry that passes fails.
EXCLUDED: dict[tuple[str, str], str] = {}


def not_collected_reason(test: str, model: str) -> str | None:
    for name, patterns, reason in NOT_COLLECTED:
        if name == test and any(fnmatch.fnmatch(model, p) for p in patterns):
            return reason
    return None


def _timm_env(claims: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("GITHUB_ACTIONS", "TIMEOUT", "TORCH_DEVICE", "TORCH_BACKEND", "PYTEST_ADDOPTS", CLAIMS_ENV)}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), *filter(None, [env.get("PYTHONPATH")])])
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")  # a shared 2-core machine: one thread per process
    if claims is not None:
        env[CLAIMS_ENV] = str(claims)
    return env


def _timm_cmd(junit: Path | None, extra: tuple[str, ...]) -> list[str]:
    deselect = [a for (test, model) in TIME_LIMITED for a in ("--deselect", f"tests/test_models.py::{test}[{model}]")]
    return [sys.executable, "-m", "pytest", "tests/test_models.py", "-c", os.devnull, "--rootdir", ".",
            "-p", "timm_contract_plugin", "-p", "no:cacheprovider", "-q", "--tb=line", "-W", "ignore::FutureWarning",
            *([f"--junitxml={junit}"] if junit else []), *deselect, *extra]


def run_timm_tests(tests_dir: Path, junit: Path | None, timeout: float = 480.0,
                   extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """timm's test_models.py with the plugin, in a subprocess, from the folder that holds ``tests/``."""
    return subprocess.run(_timm_cmd(junit, extra), cwd=tests_dir.parent, env=_timm_env(), capture_output=True,
                          text=True, timeout=timeout)


def run_timm_tests_in_shards(tests_dir: Path, out: Path, shards: int = SHARDS,
                             timeout: float = 480.0) -> list[tuple[subprocess.CompletedProcess, Path]]:
    """:func:`run_timm_tests` in ``shards`` processes side by side (one thread each) that share the tests
    (the plugin's ``TIMM_CONTRACT_CLAIMS``: each test runs in the first process to reach it): (process,
    its junit file) per shard. Together they run the same tests as one process; the pytest process that
    waits for them uses no core."""
    claims = out / "claims"
    claims.mkdir()
    procs = []
    for i in range(shards):
        junit, log = out / f"timm_contract.{i}.xml", out / f"timm_contract.{i}.log"
        with open(log, "w") as f:
            procs.append((subprocess.Popen(_timm_cmd(junit, ()), cwd=tests_dir.parent, env=_timm_env(claims),
                                           stdout=f, stderr=subprocess.STDOUT, start_new_session=True), junit, log))
    deadline = time.monotonic() + timeout
    done = []
    try:
        for proc, junit, log in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            done.append((subprocess.CompletedProcess(proc.args, proc.returncode, log.read_text(), ""), junit))
    except subprocess.TimeoutExpired:
        pytest.fail(f"timm's test_models.py did not finish in {timeout} s")
    finally:
        for proc, _, _ in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    return done


def parse_junit(junit: Path) -> dict[tuple[str, str], tuple[str, str]]:
    """(test, model) -> (outcome, first line of its message): outcome is passed / failed / error / skipped."""
    rank = {"passed": 0, "skipped": 1, "failed": 2, "error": 3}
    results: dict[tuple[str, str], tuple[str, str]] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        key = result_key(case.get("name", ""))
        if key is None:
            raise AssertionError(f"junit result without a project model: {case.get('name')}")
        outcome, message = "passed", ""
        for tag, name in (("skipped", "skipped"), ("failure", "failed"), ("error", "error")):
            node = case.find(tag)
            if node is not None and rank[name] > rank[outcome]:
                outcome, message = name, (node.get("message") or node.text or "").strip().splitlines()[:1]
                message = message[0] if message else ""
        old = results.get(key)
        if old is None or rank[outcome] > rank[old[0]]:
            results[key] = (outcome, message)
    return results


def contract_problems(results: dict[tuple[str, str], tuple[str, str]], models: list[str]) -> list[str]:
    """Every way in which the results and the tables disagree (empty: the contract holds)."""
    problems = []
    for test, model in sorted(results):
        if test not in PER_MODEL_TESTS:
            problems.append(f"{test}[{model}]: ran, but is not one of timm's per-model tests listed here")
    for test in PER_MODEL_TESTS:
        for model in models:
            key = (test, model)
            why_not = not_collected_reason(test, model)
            if key in TIME_LIMITED and why_not:
                problems.append(f"{test}[{model}]: in TIME_LIMITED and NOT_COLLECTED")
            if key not in results:
                if not why_not and key not in TIME_LIMITED:
                    problems.append(f"{test}[{model}]: did not run, and no table says why")
                if key in EXCLUDED:
                    problems.append(f"{test}[{model}]: EXCLUDED, but it did not run (remove the entry)")
                continue
            outcome, message = results[key]
            if why_not:
                problems.append(f"{test}[{model}]: ran ({outcome}), but NOT_COLLECTED says: {why_not}")
            elif key in TIME_LIMITED:
                problems.append(f"{test}[{model}]: ran ({outcome}), but TIME_LIMITED deselects it")
            elif key in EXCLUDED and outcome == "passed":
                problems.append(f"{test}[{model}]: passes, but EXCLUDED says: {EXCLUDED[key]} (remove the entry)")
            elif key not in EXCLUDED and outcome != "passed":
                problems.append(f"{test}[{model}]: {outcome}: {message}")
    return problems


def result_key(node_id: str) -> tuple[str, str] | None:
    """``tests/test_models.py::test_model_forward[1-fnet_nano]`` -> (``test_model_forward``, ``fnet_nano``)."""
    project = set(project_model_names())
    test, _, params = node_id.rpartition("::")[2].partition("[")
    model = next((model_of(p) for p in params.rstrip("]").split("-") if model_of(p) in project), None)
    return (test, model) if model else None


def test_contract_problems_keep_the_tables_true(monkeypatch):
    models = ["fnet_nano", "bottleneck_mlp_nano"]
    full = {(t, m): ("passed", "") for t in PER_MODEL_TESTS for m in models
            if not_collected_reason(t, m) is None and (t, m) not in TIME_LIMITED}
    assert contract_problems(full, models) == []
    failing = dict(full)
    failing[("test_model_forward", "fnet_nano")] = ("failed", "AssertionError: NaN")
    assert contract_problems(failing, models) == ["test_model_forward[fnet_nano]: failed: AssertionError: NaN"]
    missing = {k: v for k, v in full.items() if k != ("test_model_backward", "fnet_nano")}
    assert contract_problems(missing, models) == ["test_model_backward[fnet_nano]: did not run, and no table says why"]
    extra = {**full, ("test_model_forward_features", "bottleneck_mlp_nano"): ("passed", "")}
    assert "NOT_COLLECTED says" in contract_problems(extra, models)[0]
    monkeypatch.setitem(EXCLUDED, ("test_model_forward", "fnet_nano"), "a reason")
    assert contract_problems(failing, models) == []  # excluded, and it does not pass
    assert "remove the entry" in contract_problems(full, models)[0]  # excluded, but it passes


def test_collection_matches_the_tables(timm_tests):
    """timm's test_models.py collected with the plugin: exactly the pairs the tables expect (seconds, not minutes)."""
    proc = run_timm_tests(timm_tests, None, timeout=300, extra=("--collect-only",))
    assert proc.returncode == 0, "\n".join((proc.stdout + proc.stderr).splitlines()[-20:])
    collected = [line for line in proc.stdout.splitlines() if line.startswith("tests/test_models.py::")]
    keys = [result_key(n) for n in collected]
    assert None not in keys, [n for n, k in zip(collected, keys, strict=True) if k is None]
    models = project_model_names()
    assert contract_problems({k: ("passed", "") for k in keys}, models) == []


def test_tables_name_registered_models_and_timm_tests():
    models = project_model_names()
    assert len(models) >= 20, models  # the plugin finds the project's registrations
    for (test, model) in [*TIME_LIMITED, *EXCLUDED]:
        assert test in PER_MODEL_TESTS and model in models, (test, model)
    for test, patterns, _ in NOT_COLLECTED:
        assert test in PER_MODEL_TESTS, test
        assert all(any(fnmatch.fnmatch(m, p) for m in models) for p in patterns), patterns


def test_each_test_runs_in_the_first_process_that_claims_it(tmp_path, monkeypatch):
    """The plugin's TIMM_CONTRACT_CLAIMS: a test id is claimed once (the first process runs it, the
    others neither set it up nor report it); without the variable every test runs."""
    from types import SimpleNamespace

    from .. import timm_contract_plugin as plugin

    assert claim(tmp_path, "tests/test_models.py::test_model_forward[1-fnet_nano]")
    assert not claim(tmp_path, "tests/test_models.py::test_model_forward[1-fnet_nano]")
    assert claim(tmp_path, "tests/test_models.py::test_model_forward[1-ffvit_nano]")
    item = SimpleNamespace(nodeid="tests/test_models.py::test_model_backward[2-fnet_nano]")
    monkeypatch.delenv(CLAIMS_ENV, raising=False)
    assert plugin.pytest_runtest_protocol(item, None) is None  # pytest runs it
    monkeypatch.setenv(CLAIMS_ENV, str(tmp_path))
    assert plugin.pytest_runtest_protocol(item, None) is None  # first here: pytest runs it
    assert plugin.pytest_runtest_protocol(item, None) is True  # claimed: nothing runs
    assert CLAIMS_ENV not in _timm_env() and _timm_env(tmp_path)[CLAIMS_ENV] == str(tmp_path)


@pytest.mark.slow
def test_timm_model_contract(tmp_path, timm_tests):
    results: dict[tuple[str, str], tuple[str, str]] = {}
    for proc, junit in run_timm_tests_in_shards(timm_tests, tmp_path):
        if proc.returncode not in (0, 1) or not junit.is_file():  # 1: some test failed; anything else: no run
            tail = "\n".join(proc.stdout.splitlines()[-40:])
            pytest.fail(f"timm's test_models.py ({junit.stem}) did not run (exit code {proc.returncode}):\n{tail}")
        part = parse_junit(junit)
        assert not set(part) & set(results), f"shards overlap: {sorted(set(part) & set(results))[:5]}"
        results.update(part)
    models = project_model_names()
    assert {model for _, model in results} == set(models), "every registered model takes part"
    problems = contract_problems(results, models)
    assert not problems, f"{len(problems)} disagreement(s) with timm's model contract:\n" + "\n".join(problems)
