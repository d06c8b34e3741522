"""The import graph, read with ast from the source files (nothing is imported): the kernels are a
leaf, and no module imports itself back through others. Function-local imports count too: a
cycle hidden in a function still ties the two modules together (and fails when the function runs
during the other's import)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = sorted(p.parent.name for p in ROOT.glob("*/__init__.py"))
KERNELS = "pallas_kernels"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def imported(name: str, path: Path) -> set[str]:
    """Project modules that `name` (at `path`) imports anywhere in its body, except under
    `if TYPE_CHECKING:`. `import a.b` and `from a import b` both import a and a.b."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()

    def add(dotted: str):
        parts = dotted.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a, a.b and a.b.c
            prefix = ".".join(parts[:i])
            # a module's own packages ran before it did: naming them again adds no dependency (so a
            # package's __init__ may call into its submodules)
            if prefix in MODULES and not name.startswith(prefix + "."):
                found.add(prefix)

    def visit(node):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, up level - 1 packages
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            add(base)
            for alias in node.names:
                add(f"{base}.{alias.name}")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    found.discard(name)
    return found


GRAPH = {name: imported(name, path) for name, path in MODULES.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def connect(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return out


def test_the_graph_sees_the_project():
    assert {"cats_jax", "pallas_kernels", "bench", "eval", "train", "convert"} <= set(PACKAGES)
    assert "pallas_kernels.sparse_gemv" in GRAPH["cats_jax.decode"]  # a module-level import
    assert "cats_jax.teal" in GRAPH["bench.decode"]  # a function-local one


def test_kernels_import_only_themselves():
    others = {m: sorted(d for d in GRAPH[m] if not d.startswith(KERNELS)) for m in GRAPH if m.startswith(KERNELS)}
    assert others and not any(others.values()), f"pallas_kernels must import no other project package: {others}"


def test_no_import_cycles():
    found = cycles(GRAPH)
    assert not found, "import cycles (each a set of modules that import one another): " + "; ".join(
        " <-> ".join(c) for c in found)


def test_tests_import_no_other_test_module():
    """Shared test helpers live in conftest.py (pytest loads it), not in another test module."""
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0].startswith("test_") for n in names), f"{path.name} imports {names}"


@pytest.mark.parametrize("graph,expected", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}, [["a", "b", "c"]]),
    ({"a": {"b"}, "b": set(), "c": {"a", "b"}}, []),
    ({"a": {"b"}, "b": {"a"}, "c": {"d"}, "d": {"c"}}, [["a", "b"], ["c", "d"]]),
])
def test_cycles_finds_every_circle(graph, expected):
    assert sorted(cycles(graph)) == expected
