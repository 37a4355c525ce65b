"""The package's import graph: no cycles, and no import from a lower layer into a higher one.

Read statically (every ``import`` and ``from ... import`` anywhere in a module, function-local
ones included), so a cycle hidden inside a function is caught too. The layer order is the table of
docs/design.md §1, read from there: a module may import its own layer and the layers below.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "difftime"
DESIGN = REPO / "docs" / "design.md"
ROOT = "difftime"  # the package root re-exports lazily (by name, no static import) and holds __version__


def read_layers(doc: Path) -> tuple[dict[str, int], list[int]]:
    """The layer table of ``doc``'s section 1: module -> layer, and the layer numbers in row order.

    A row is ``| N | `difftime.a`, `difftime.b` |``; every backticked name in its second column
    belongs to layer N. Rows of other tables and the header do not match.
    """
    section = re.search(r"^## 1\. .*?$(.*?)(?=^## )", doc.read_text(), re.S | re.M)
    if section is None:
        raise AssertionError(f"{doc} has no section '## 1. ...' followed by another section")
    layers: dict[str, int] = {}
    rows: list[int] = []
    for line in section.group(1).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.lstrip().startswith("|") or len(cells) != 2 or not cells[0].isdigit():
            continue
        rows.append(int(cells[0]))
        for name in re.findall(r"`([^`]+)`", cells[1]):
            if name in layers:
                raise AssertionError(f"{doc}: {name} is listed in layer {layers[name]} and layer {cells[0]}")
            layers[name] = int(cells[0])
    return layers, rows


LAYERS, LAYER_ROWS = read_layers(DESIGN)


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


def test_the_design_table_has_one_row_per_layer_of_difftime_modules():
    assert LAYER_ROWS == list(range(6)), LAYER_ROWS
    assert sorted(set(LAYERS.values())) == LAYER_ROWS  # no empty row
    assert [m for m in LAYERS if not m.startswith(ROOT + ".")] == []


def test_every_module_has_a_layer():
    assert [m for m in GRAPH if m != ROOT and layer_of(m) is None] == []


def covered(module: str) -> bool:
    """A module is covered when it or one of its parent packages is listed in the layer table."""
    parts = module.split(".")
    return any(".".join(parts[:k]) in LAYERS for k in range(2, len(parts) + 1))


def test_every_module_under_src_is_covered_by_the_design_table():
    modules = sorted({module_name(p, SRC) for p in SRC.rglob("*.py")} - {ROOT})
    assert modules, SRC
    assert [m for m in modules if not covered(m)] == []


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
