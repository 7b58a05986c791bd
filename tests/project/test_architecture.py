"""The house rules of docs/architecture.md, checked on the source: imports flow one way, the model
files import only torch and timm, only the CLI layer parses flags or prints, and installing or
importing shrink puts no top-level ``models`` package anywhere."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# The layers, bottom to top (docs/architecture.md): a module imports only from its own layer and the ones below.
# A package is named once; its submodules belong to its layer.
LAYERS = [
    ("base", {"shrink.errors", "shrink.io", "shrink.precision", "shrink.unwrap", "shrink.introspect",
              "shrink.values", "shrink.registry", "shrink._old_paths"}),
    ("model files", {"shrink.models", "shrink._source_tree"}),
    ("block contract", {"shrink.blocks"}),
    ("the method", {"shrink.selection", "shrink.merging"}),
    ("models in and out", {"shrink.modelio"}),
    ("data", {"shrink.data"}),
    ("run, measure, deploy", {"shrink.training", "shrink.bench", "shrink.deploy"}),
    ("plan", {"shrink.plan"}),
    ("command line", {"shrink.cli"}),
    ("entry points", {"shrink.select", "shrink.convert", "main_lambda", "benchmark"}),
]
MODEL_LAYER = "shrink.models"
CHECKPOINT_ALLOWED = {"shrink.errors", "shrink.unwrap"}  # plus shrink.models.*
# the block contract: the only modules that read a block's sublayers (norm1, attn, ls1, ...)
CONTRACT = {"shrink.blocks.contract", "shrink.blocks.families", "shrink.blocks.positions", "shrink.blocks.probes"}
# where argument parsing and printing live: the command-line package and the entry points (`python -m` included)
ENTRY_POINTS = {"shrink.select", "shrink.convert", "main_lambda", "benchmark"}


def _is_entry_point(module: str) -> bool:
    return module in ENTRY_POINTS or module.endswith(".__main__")


def _layer(module: str) -> int:
    if _is_entry_point(module):
        return len(LAYERS) - 1
    if module == "shrink":  # the package's __init__: the public API, above everything but the entry points
        return len(LAYERS) - 2
    for i, (_, group) in enumerate(LAYERS):
        if any(module == g or module.startswith(g + ".") for g in group):
            return i
    raise AssertionError(f"{module} is in no layer of tests/project/test_architecture.py: add it (and to docs/architecture.md)")


def _modules() -> dict[str, tuple[Path, bool]]:
    mods = {}
    files = [*(ROOT / "shrink").rglob("*.py"), *(ROOT / "models").glob("*.py"), ROOT / "main_lambda.py",
             ROOT / "benchmark.py"]
    for p in files:
        parts = list(p.relative_to(ROOT).with_suffix("").parts)
        if parts[0] == "models":  # installed as shrink.models (pyproject's package-dir)
            parts = ["shrink", *parts]
        is_pkg = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if is_pkg else parts)] = (p, is_pkg)
    return mods


MODULES = _modules()


def _imports(name: str) -> tuple[set[str], set[str]]:
    """(project modules, other top-level packages) that ``name`` imports anywhere in its source."""
    path, is_pkg = MODULES[name]
    package = name if is_pkg else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join([*base, *([node.module] if node.module else [])])
            else:
                mod = node.module or ""
            subs = {f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in MODULES}
            found |= subs
            if len(subs) < len(node.names):  # names taken from the module itself
                found.add(mod)
    ours = {m for m in found if m.split(".")[0] in ("shrink", "models", "main_lambda", "benchmark")}
    return {m for m in ours if m != name}, {m.split(".")[0] for m in found - ours}


GRAPH = {m: _imports(m)[0] for m in MODULES}


def test_the_graph_covers_the_tree():
    assert {"shrink", "shrink.modelio.checkpoint", "shrink.modelio.create", "shrink.models.ms_mlp",
            "main_lambda"} <= set(GRAPH)
    reader = GRAPH["shrink.modelio.checkpoint"]
    assert "shrink.errors" in reader and "shrink.models.bottleneck_mlp" in reader


@pytest.mark.parametrize("name", sorted(m for m in MODULES if m.startswith(MODEL_LAYER)))
def test_model_files_import_only_torch_timm_and_each_other(name):
    ours, others = _imports(name)
    assert all(m.startswith(MODEL_LAYER) for m in ours), f"{name} imports {sorted(ours)}"
    third_party = others - set(sys.stdlib_module_names) - {"__future__"}
    assert third_party <= {"torch", "timm"}, f"{name} imports {sorted(third_party)}"


def test_the_checkpoint_reader_needs_only_the_model_files_and_the_base():
    extra = {m for m in GRAPH["shrink.modelio.checkpoint"] if not m.startswith(MODEL_LAYER)} - CHECKPOINT_ALLOWED
    assert not extra, f"shrink.modelio.checkpoint imports {sorted(extra)}"


def test_the_block_contract_imports_only_the_base():
    for name in (m for m in MODULES if m.startswith("shrink.blocks")):
        ours = {m for m in GRAPH[name] if m.startswith("shrink") and not m.startswith("shrink.blocks")}
        assert all(_layer(m) == 0 for m in ours), f"{name} imports {sorted(ours)}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_is_in_a_layer(name):
    _layer(name)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_flow_down_the_layers(name):
    up = {m for m in GRAPH[name] if _layer(m) > _layer(name)}
    assert not up, f"{name} ({LAYERS[_layer(name)][0]}) imports {sorted(up)} from a layer above it"


def test_packages_import_each_other_one_way():
    """No two stage packages import each other (0 arrows running back), whatever their layer."""
    def package(m: str) -> str:
        return ".".join(m.split(".")[:2]) if m.startswith("shrink.") else m

    edges = {(package(m), package(d)) for m, deps in GRAPH.items() for d in deps
             if package(m) != package(d) and m != "shrink" and not _is_entry_point(m)}
    back = sorted((a, b) for a, b in edges if (b, a) in edges)
    assert not back, f"packages import each other: {back}"


def test_the_layer_check_can_fail(monkeypatch):
    planted = {**GRAPH, "shrink.blocks.dilution": {*GRAPH["shrink.blocks.dilution"], "shrink.training.trainer"}}
    monkeypatch.setitem(globals(), "GRAPH", planted)
    with pytest.raises(AssertionError, match="from a layer above it"):
        test_imports_flow_down_the_layers("shrink.blocks.dilution")


# Attributes of timm transformer blocks (their sublayers): only the block contract reads them.
BLOCK_ATTRIBUTES = {"norm1", "norm2", "attn", "attns", "ls1", "ls2", "gamma_1", "gamma_2", "drop_path1",
                    "drop_path2", "mlp", "ffns", "in_norm", "in_proj", "attn_out_proj", "mlp_out_proj", "mlp_bias"}


def _block_attribute_reads(tree: ast.AST) -> list[tuple[int, str]]:
    """Attribute accesses (``x.norm1``) and getattr / hasattr / setattr with a literal block name;
    names that merely start like one (``attn_mask``, ``attn_pool``) are not block attributes."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in BLOCK_ATTRIBUTES:
            found.append((node.lineno, node.attr))
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "hasattr", "setattr", "delattr") and len(node.args) > 1
              and isinstance(node.args[1], ast.Constant) and node.args[1].value in BLOCK_ATTRIBUTES):
            found.append((node.lineno, node.args[1].value))
    return found


@pytest.mark.parametrize("name", sorted(m for m in MODULES if m.startswith("shrink") and not m.startswith(MODEL_LAYER)
                                        and m not in CONTRACT))
def test_only_the_block_contract_reads_block_attributes(name):
    path, _ = MODULES[name]
    found = _block_attribute_reads(ast.parse(path.read_text(encoding="utf-8")))
    assert not found, f"{name} reads block attributes {found}: ask the block contract (shrink.blocks) instead"


def test_block_attribute_check_can_fail():
    src = "def f(b, attn_mask, m):\n    m.attn_pool\n    y = b.norm1(attn_mask)\n    return getattr(b, 'gamma_1')\n"
    assert sorted(_block_attribute_reads(ast.parse(src))) == [(3, "norm1"), (4, "gamma_1")]


@pytest.mark.parametrize("name", sorted(m for m in MODULES if not _is_entry_point(m)))
def test_no_library_module_imports_an_entry_point(name):
    bad = {m for m in GRAPH[name] if _is_entry_point(m)}
    assert not bad, f"{name} imports the entry point(s) {sorted(bad)}"


def test_no_module_imports_the_package_it_is_part_of():
    """``from shrink import x`` inside shrink runs shrink/__init__ halfway: submodules are imported directly."""
    bad = {m for m, deps in GRAPH.items() if m.startswith("shrink.") and "shrink" in deps}
    assert not bad, f"{sorted(bad)} import the shrink package itself"


def test_imports_have_no_cycle():
    graph = {m: {d for d in deps if d in GRAPH and d != "shrink"} for m, deps in GRAPH.items() if m != "shrink"}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            if d.startswith(m + "."):  # a package importing its own submodules is not a cycle
                continue
            if state.get(d) == 1:
                cycle = path[path.index(d):] + [d] if d in path else [m, d]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if state.get(d) is None:
                visit(d, [*path, d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_test_can_fail_on_a_cycle(monkeypatch):
    """The cycle check is not vacuous: a planted back-edge is found."""
    planted = dict(GRAPH)
    planted["shrink.errors"] = {"shrink.modelio.checkpoint"}
    monkeypatch.setitem(globals(), "GRAPH", planted)
    with pytest.raises(pytest.fail.Exception, match="import cycle"):
        test_imports_have_no_cycle()


def _calls(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            f = node.func
            names.add(f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else "")
    return names


@pytest.mark.parametrize("name", sorted(m for m in MODULES if m.startswith("shrink") and not _is_entry_point(m)
                                        and not m.startswith("shrink.cli")))
def test_only_the_cli_layer_parses_flags_or_prints(name):
    calls = _calls(MODULES[name][0])
    assert "print" not in calls, f"{name} prints; return values or log instead"
    parsing = calls & {"ArgumentParser", "OneLineArgumentParser", "add_argument", "add_argument_group"}
    assert not parsing, f"{name} parses command-line flags ({sorted(parsing)})"


def test_importing_shrink_registers_the_families_and_no_top_level_models():
    code = ("import sys, timm, shrink; "
            "print(sorted(m for m in sys.modules if m == 'models' or m.startswith('models.'))); "
            "print(timm.is_model('msmlp_nano'), timm.is_model('bottleneck_mlp_nano'), shrink.models.__name__)")
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=120,
                         check=True).stdout.split("\n")
    assert out[0] == "[]" and out[1] == "True True shrink.models"


def test_every_package_is_installed():
    """pyproject's explicit package list names every package of the source tree (a wheel has only those)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    tree = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "shrink").rglob("__init__.py")}
    assert tree | {"shrink.models"} == listed, f"pyproject packages differ from the tree: {sorted(tree ^ listed)}"


def test_the_package_installs_no_top_level_models():
    from importlib.metadata import distribution

    dist = distribution("shrink")
    top = (dist.read_text("top_level.txt") or "").split()
    assert "models" not in top and "shrink" in top
    assert (ROOT / "pyproject.toml").read_text().count('package-dir = { "shrink.models" = "models" }') == 1


# ------------------------------------------------------------------------------------------------
# The stage packages: what they export, the old flat paths, module size
# ------------------------------------------------------------------------------------------------

PACKAGES = sorted(m for m, (_, is_pkg) in MODULES.items() if is_pkg and m.startswith("shrink.")
                  and not m.startswith(MODEL_LAYER))


@pytest.mark.parametrize("name", PACKAGES)
def test_each_package_exports_its_public_names(name):
    """A short ``__init__`` that says what the stage offers: every name in ``__all__`` resolves."""
    import importlib

    module = importlib.import_module(name)
    assert module.__doc__ and module.__doc__.strip(), f"{name} has no docstring"
    assert getattr(module, "__all__", None), f"{name} has no __all__"
    missing = [n for n in module.__all__ if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ names {missing}, which it does not have"
    lines = len(MODULES[name][0].read_text().splitlines())
    assert lines <= 120, f"{name}/__init__.py is {lines} lines: an __init__ exports, the code lives in modules"


def test_the_old_flat_paths_still_import_and_warn():
    """shrink 0.1's module paths (docs/architecture.md lists them) are the new modules, for one release."""
    code = ("import importlib, warnings, shrink\n"
            "from shrink._old_paths import OLD_PATHS\n"
            "for old, new in OLD_PATHS.items():\n"
            "    with warnings.catch_warnings(record=True) as w:\n"
            "        warnings.simplefilter('always')\n"
            "        got = importlib.import_module(old)\n"
            "    assert got is importlib.import_module(new), old\n"
            "    assert any(issubclass(x.category, DeprecationWarning) and new in str(x.message) for x in w), old\n"
            "import shrink.train, shrink.tome\n"
            "from shrink.factory import create_model\n"
            "assert create_model is shrink.create_model and callable(shrink.export)\n"
            "print(len(OLD_PATHS))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout) >= 19
    doc = (ROOT / "docs" / "architecture.md").read_text()
    from shrink._old_paths import OLD_PATHS

    assert all(f"`{old}`" in doc and f"`{new}`" in doc for old, new in OLD_PATHS.items())


LONG = 400  # lines; a longer module says why in its docstring ("Long because ...")


@pytest.mark.parametrize("name", sorted(m for m in MODULES if m.startswith("shrink") and not m.startswith(MODEL_LAYER)))
def test_a_long_module_says_why(name):
    path, _ = MODULES[name]
    lines = len(path.read_text().splitlines())
    if lines > LONG:
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        assert "Long because" in doc, f"{name} is {lines} lines: split it, or say why in its docstring ('Long because ...')"
