"""The package's import graph: no cycles, and no import from a lower layer into a higher one.

Read statically (every ``import`` and ``from ... import`` anywhere in a module, function-local
ones included), so a cycle hidden inside a function is caught too. The layer order is
DESIGN.md §1; a module may import its own layer and the layers below.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "difftime"

LAYERS: dict[str, int] = {
    # 0: leaves
    "difftime.errors": 0, "difftime.io": 0, "difftime.rng": 0, "difftime.provenance": 0, "difftime.allocator": 0,
    "difftime.distributed": 0,
    # 1: maths and formats
    "difftime.sde": 1, "difftime.scaler": 1, "difftime.config": 1, "difftime.nets": 1, "difftime.data": 1,
    "difftime.run": 1, "difftime.gaussian": 1, "difftime.plots": 1,
    # 2: the method
    "difftime.training": 2, "difftime.priors": 2, "difftime.sampling": 2, "difftime.likelihood": 2,
    "difftime.metrics": 2, "difftime.stats": 2,
    # 3: measurements
    "difftime.evaluation": 3, "difftime.headroom": 3,
    # 4: the study
    "difftime.study": 4,
    # 5: the interface
    "difftime.cli": 5, "difftime.importers": 5, "difftime.__main__": 5,
}
ROOT = "difftime"  # the package root re-exports lazily (by name, no static import) and holds __version__


def module_name(path: Path, src: Path) -> str:
    parts = ["difftime", *path.relative_to(src).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(src: Path) -> dict[str, set[str]]:
    """Module -> the difftime modules it imports, anywhere in its body."""
    modules = {module_name(p, src): p for p in src.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # "from difftime.x import y" imports difftime.x, and difftime.x.y when that is a module
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            for target in targets:
                if target in modules and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def layer_of(module: str) -> int | None:
    best = max((k for k in LAYERS if module == k or module.startswith(k + ".")), key=len, default=None)
    return LAYERS[best] if best is not None else None


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return [f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})"
            for a, targets in graph.items() for b in targets
            if a != ROOT and b != ROOT and layer_of(a) is not None and layer_of(b) is not None
            and layer_of(b) > layer_of(a)]


GRAPH = import_graph(SRC)


def test_the_package_has_no_import_cycle():
    assert cycles(GRAPH) == []


def test_no_module_imports_a_higher_layer():
    assert upward_imports(GRAPH) == []


def test_every_module_has_a_layer():
    assert [m for m in GRAPH if m != ROOT and layer_of(m) is None] == []


def test_the_root_imports_nothing_of_its_own_at_import_time():
    """``import difftime`` stays cheap and cycle-free: the public API is resolved by name on first use."""
    assert GRAPH[ROOT] == set()


@pytest.mark.parametrize("lazy", [False, True], ids=["top-level", "function-local"])
def test_the_checker_catches_a_cycle_put_back(tmp_path, lazy):
    pkg = tmp_path / "difftime"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "io.py").write_text("from difftime.sub.data import Dataset\n")
    body = "def f():\n    from difftime.io import x\n" if lazy else "from difftime.io import x\n"
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "data.py").write_text(body)
    graph = import_graph(pkg)
    assert cycles(graph) == [["difftime.io", "difftime.sub.data"]]


def test_the_checker_catches_an_upward_import(tmp_path):
    pkg = tmp_path / "difftime"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "sde.py").write_text("import difftime.cli\n")
    (pkg / "cli.py").write_text("")
    assert upward_imports(import_graph(pkg)) == ["difftime.sde (layer 1) imports difftime.cli (layer 5)"]
