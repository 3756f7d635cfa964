"""The bench package's modules import each other without cycles (type-only imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

import resnet_fast.bench

BENCH_DIR = Path(resnet_fast.bench.__file__).parent
PACKAGE = "resnet_fast.bench"


def imported_bench_modules(path: Path) -> set[str]:
    """The ``resnet_fast.bench.*`` modules that ``path`` imports anywhere, ``TYPE_CHECKING`` blocks included."""
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(PACKAGE + "."):
            imported.add(node.module)
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names if alias.name.startswith(PACKAGE + "."))
    return imported


def import_graph() -> dict[str, set[str]]:
    return {f"{PACKAGE}.{path.stem}": imported_bench_modules(path)
            for path in BENCH_DIR.glob("*.py") if path.stem != "__init__"}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a list of modules (first repeated last), or None."""
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                return path[path.index(target):] + [target] if target in path else [module, target]
            if target not in state:
                cycle = visit(target, [*path, target])
                if cycle:
                    return cycle
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module, [module])
            if cycle:
                return cycle
    return None


def test_find_cycle_detects_a_two_module_cycle():
    assert find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_bench_modules_have_no_import_cycle():
    graph = import_graph()
    assert f"{PACKAGE}.trace" in graph and f"{PACKAGE}.profiler" in graph
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"
