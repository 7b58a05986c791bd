"""The house rules of docs/architecture.md, checked on the source: imports flow one way, the model
files import only torch and timm, only the CLI layer parses flags or prints, and installing or
importing shrink puts no top-level ``models`` package anywhere."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The layers, bottom to top (docs/architecture.md): each may import only from the layers below it.
MODEL_LAYER = "shrink.models"
CHECKPOINT_ALLOWED = {"shrink.errors", "shrink.unwrap"}  # plus shrink.models.*
CORE = {"shrink.blocks.contract", "shrink.blocks.dilution", "shrink.blocks.attention_free", "shrink.merging.patch", "shrink.merging.merge", "shrink.merging.kernels",
        "shrink.merging.rope", "shrink.merging.relpos", "shrink.merging.cait", "shrink.selection.criteria", "shrink.selection.layers"}
ABOVE_CORE = {"shrink.modelio.create", "shrink.training.trainer", "shrink.training.loop", "shrink.training.parts", "shrink.training.run_folder", "shrink.training.metrics",
              "shrink.training.sharding", "shrink.deploy", "shrink.deploy.__main__", "shrink.bench", "shrink.training.config",
              "shrink.cli.runner", "shrink.select", "shrink.convert", "shrink.plan"}
ENTRY_POINTS = {"shrink.select", "shrink.convert", "shrink.deploy.__main__", "shrink.plan.__main__", "main_lambda",
                "benchmark"}
# where argument parsing and printing live: the runner, the run's flags, and the `python -m` entry points
CLI_LAYER = {"shrink.cli.runner", "shrink.training.config", "shrink.select", "shrink.convert", "shrink.deploy.__main__",
             "shrink.plan.__main__"}


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


def _in(module: str, group: set[str]) -> bool:
    return any(module == g or module.startswith(g + ".") for g in group)


def test_the_graph_covers_the_tree():
    assert {"shrink", "shrink.modelio.checkpoint", "shrink.modelio.create", "shrink.models.ms_mlp", "main_lambda"} <= set(GRAPH)
    assert "shrink.errors" in GRAPH["shrink.modelio.checkpoint"] and "shrink.models.bottleneck_mlp" in GRAPH["shrink.modelio.checkpoint"]


@pytest.mark.parametrize("name", sorted(m for m in MODULES if m.startswith(MODEL_LAYER)))
def test_model_files_import_only_torch_timm_and_each_other(name):
    ours, others = _imports(name)
    assert all(m.startswith(MODEL_LAYER) for m in ours), f"{name} imports {sorted(ours)}"
    third_party = others - set(sys.stdlib_module_names) - {"__future__"}
    assert third_party <= {"torch", "timm"}, f"{name} imports {sorted(third_party)}"


def test_checkpoint_io_sits_right_above_the_model_files():
    extra = {m for m in GRAPH["shrink.modelio.checkpoint"] if not m.startswith(MODEL_LAYER)} - CHECKPOINT_ALLOWED
    assert not extra, f"shrink.modelio.checkpoint imports {sorted(extra)}"


def test_the_block_contract_imports_only_errors():
    ours = {m for m in GRAPH["shrink.blocks.contract"] if m.startswith("shrink")}
    assert ours <= {"shrink.errors"}, f"shrink.blocks.contract imports {sorted(ours)}"


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
                                        and m != "shrink.blocks.contract"))
def test_only_the_block_contract_reads_block_attributes(name):
    path, _ = MODULES[name]
    found = _block_attribute_reads(ast.parse(path.read_text(encoding="utf-8")))
    assert not found, f"{name} reads block attributes {found}: ask shrink.blocks.contract instead"


def test_block_attribute_check_can_fail():
    src = "def f(b, attn_mask, m):\n    m.attn_pool\n    y = b.norm1(attn_mask)\n    return getattr(b, 'gamma_1')\n"
    assert sorted(_block_attribute_reads(ast.parse(src))) == [(3, "norm1"), (4, "gamma_1")]


@pytest.mark.parametrize("name", sorted(CORE))
def test_the_method_does_not_import_what_is_built_on_it(name):
    up = {m for m in GRAPH[name] if _in(m, ABOVE_CORE) or m == "shrink"}
    assert not up, f"{name} imports {sorted(up)}"


@pytest.mark.parametrize("name", sorted(m for m in MODULES if not _in(m, ENTRY_POINTS)))
def test_no_library_module_imports_an_entry_point(name):
    bad = {m for m in GRAPH[name] if _in(m, ENTRY_POINTS)}
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


@pytest.mark.parametrize("name", sorted(m for m in MODULES if m.startswith("shrink") and not _in(m, CLI_LAYER)))
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


def test_the_package_installs_no_top_level_models():
    from importlib.metadata import distribution

    dist = distribution("shrink")
    top = (dist.read_text("top_level.txt") or "").split()
    assert "models" not in top and "shrink" in top
    assert (ROOT / "pyproject.toml").read_text().count('package-dir = { "shrink.models" = "models" }') == 1
