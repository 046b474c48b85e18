"""The package's layout: no import cycle, and the table path (optimize, show, check) never loads torch.

- Every module's imports under ``dmsteps_cli/`` (module level and inside functions, relative and
  absolute) form an acyclic graph.
- Importing the optimizer, the table modules, the diffusers integration and the CLI leaves
  ``torch`` out of ``sys.modules``.
- ``dmsteps optimize``, ``show`` and ``check`` (of an optimized and of a refined table) run in a
  process where ``import torch`` raises.
"""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from no_torch import CLI_WITHOUT_TORCH

from dmsteps_cli import StepConfig, dumps, get_schedule, make_table
from dmsteps_cli.mixtures import GaussianMixture, save_mixture
from dmsteps_cli.refine import RefineRequest, refine

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "dmsteps_cli"
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}

TORCH_FREE = ("dmsteps_cli.optimize", "dmsteps_cli.build", "dmsteps_cli.tables", "dmsteps_cli.check",
              "dmsteps_cli.integrations.diffusers", "dmsteps_cli.cli")

BLOCKED_CLI = CLI_WITHOUT_TORCH  # python -c BLOCKED_CLI args...: the CLI with torch refused


# --- the import graph ------------------------------------------------------------------------------

def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that ``path`` imports anywhere in its body."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)  # from . import submodule
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(f) for f in files}
    return {module_name(f): imported_modules(f, modules) for f in files}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as [a, b, ..., a], or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_graph_sees_relative_absolute_and_function_level_imports():
    graph = import_graph()
    assert "dmsteps_cli.errors" in graph["dmsteps_cli.integrations.diffusers"]  # from ..errors import
    assert "dmsteps_cli.check" in graph["dmsteps_cli.cli"]  # inside a command function
    assert "dmsteps_cli.config" in graph["dmsteps_cli.tables"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def documented_layers() -> list[str]:
    """The module column of docs/layout.md's table, top to bottom."""
    rows = [line for line in (ROOT / "docs" / "layout.md").read_text().splitlines() if line.startswith("| `")]
    return [row.split("`")[1] for row in rows]


def full_name(layer: str) -> str:
    return "dmsteps_cli" if layer == "dmsteps_cli" else f"dmsteps_cli.{layer}"


def test_docs_list_every_module_once():
    layers = documented_layers()
    assert len(layers) == len(set(layers))
    assert sorted(map(full_name, layers)) == sorted(import_graph())


def test_each_module_imports_only_modules_above_it():
    graph = import_graph()
    order = [full_name(m) for m in documented_layers()]
    for i, name in enumerate(order):
        below = graph[name] - set(order[:i])
        assert not below, f"{name} imports {sorted(below)}, which docs/layout.md places below it"


def test_layering_is_checked_against_a_real_violation():
    graph = import_graph()
    order = [full_name(m) for m in documented_layers()]
    assert order.index("dmsteps_cli.cli") > order.index("dmsteps_cli.check")
    assert "dmsteps_cli.check" in graph["dmsteps_cli.cli"]  # so cli placed above check would fail


def test_table_modules_import_no_model_code():
    graph = import_graph()
    model_code = {f"dmsteps_cli.{m}" for m in ("refine", "evaluate", "sample", "models")}
    for name in ("dmsteps_cli.tables", "dmsteps_cli.build", "dmsteps_cli.check", "dmsteps_cli.refine_records",
                 "dmsteps_cli.config", "dmsteps_cli.integrations.diffusers"):
        assert not graph[name] & model_code, name
    assert not graph["dmsteps_cli.tables"] & {f"dmsteps_cli.{m}" for m in ("optimize", "objective", "build", "check")}
    assert graph["dmsteps_cli.integrations.diffusers"] & {"dmsteps_cli.build", "dmsteps_cli.optimize"} == set()


# --- torch stays out -------------------------------------------------------------------------------

def torch_free_modules() -> list[str]:
    """Every module docs/layout.md places above ``runtime``, and the CLI (which imports the rest
    inside the commands that need it)."""
    layers = documented_layers()
    return [full_name(m) for m in layers[:layers.index("runtime")]] + ["dmsteps_cli.cli"]


def test_importing_the_table_path_does_not_import_torch():
    modules = torch_free_modules()
    assert set(TORCH_FREE) <= set(modules)
    code = f"import sys, {', '.join(modules)}; assert 'torch' not in sys.modules, 'torch was imported'"
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr


def blocked(cwd, *args):
    return subprocess.run([sys.executable, "-c", BLOCKED_CLI, *args], check=False, capture_output=True, text=True,
                          cwd=cwd, env=ENV, timeout=300)


@pytest.fixture(scope="module")
def refined_table(tmp_path_factory):
    """NFE 5 of a vp-linear table refined (briefly) on a single Gaussian, written as JSON."""
    root = tmp_path_factory.mktemp("layout")
    mu = torch.full((1, 16), 0.2, dtype=torch.float64)
    save_mixture(GaussianMixture(mu, 0.4, sample_shape=(1, 4, 4)), root / "gauss.yaml", schedule="vp-linear")
    table = root / "table.json"
    table.write_text(dumps(make_table(StepConfig(schedule="vp-linear", nfe=(5,)), get_schedule("vp-linear")), "json"))
    out = refine(RefineRequest(checkpoint=str(root / "gauss.yaml"), table=str(table), train=4, holdout=4, maxiter=2))
    path = root / "refined.json"
    path.write_text(dumps(out, "json"))
    return path


def test_optimize_show_check_run_with_torch_blocked(tmp_path):
    r = blocked(tmp_path, "optimize", "--nfe", "5", "-o", "x.json")
    assert r.returncode == 0, r.stderr
    r = blocked(tmp_path, "optimize", "--nfe", "5,6", "--objective", "reference", "-q", "-o", "opt.json")
    assert r.returncode == 0, r.stderr
    r = blocked(tmp_path, "show", "x.json", "--nfe", "5")
    assert r.returncode == 0, r.stderr
    assert [float(v) for v in r.stdout.strip().split(",")] == json.loads((tmp_path / "x.json").read_text())[
        "entries"][0]["t"]
    r = blocked(tmp_path, "check", "x.json", "opt.json")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["x.json: ok", "opt.json: ok"]


def test_check_of_a_refined_table_runs_with_torch_blocked(refined_table, tmp_path):
    r = blocked(tmp_path, "check", str(refined_table))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"{refined_table}: ok"
    # the refined records are really checked: a status refine never writes is drift (exit 1), still without torch
    table = json.loads(refined_table.read_text())
    table["entries"][0]["optimizer"]["status"] = "converged"
    bad = tmp_path / "bad.json"
    bad.write_text(dumps(table, "json"))
    r = blocked(tmp_path, "check", str(bad))
    assert r.returncode == 1, r.stderr
    assert f"{bad}: entries[0] (NFE 5).optimizer.status: 'converged' is not a refine status" in r.stdout
