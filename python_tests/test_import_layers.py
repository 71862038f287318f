"""The package's layers stay one-way: no import cycle among the modules of :mod:`mmer_ext`.

Every module is found by walking the package with :mod:`pkgutil` and imported (so a module that cannot even load
fails here, not later). The import graph is built from each module's source with :mod:`ast` and counts every
``import`` statement wherever it sits -- module level *and* inside functions -- because a lazy import only hides a
cycle from load order, not from a reader. Absolute and relative imports are both resolved; ``from pkg import name``
counts as an edge to ``pkg.name`` when that is a module, else to ``pkg``. A package's ``__init__`` re-exporting its
own submodules is not a cycle of design (it is how the public names are offered), so edges from a package to its own
descendants are left out of the graph.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import mmer_ext

# Cycles tolerated for now: none. Keep it that way; a lazy import that hides a cycle still counts.
KNOWN_CYCLES: list[tuple[str, ...]] = []


def package_modules() -> dict[str, Path]:
    """Every module of ``mmer_ext`` with the file its source lives in (compiled ``_C`` has none and is skipped)."""
    found = {"mmer_ext": Path(mmer_ext.__file__)}
    for info in pkgutil.walk_packages(mmer_ext.__path__, prefix="mmer_ext."):
        spec = importlib.util.find_spec(info.name)
        origin = spec.origin if spec is not None else None
        if origin is None or not origin.endswith(".py"):
            continue
        found[info.name] = Path(origin)
    return found


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    if level == 0:
        return target or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """``module -> modules of the package it imports`` (function-level imports included)."""
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node.level, node.module)
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else base)
            for target in targets:
                # ``import a.b.c`` imports a.b.c; keep the longest prefix that is one of ours.
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if not target or target == name or target.startswith(name + "."):
                    continue
                graph[name].add(target)
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[tuple[str, ...]]:
    """The strongly connected components with more than one module (Tarjan), each as a sorted tuple."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[tuple[str, ...]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                components.append(tuple(sorted(component)))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(components)


def describe(cycle: tuple[str, ...], graph: dict[str, set[str]]) -> str:
    """One path round the cycle, for the failure message."""
    members = set(cycle)
    path = [cycle[0]]
    while True:
        nxt = min(s for s in graph[path[-1]] if s in members)
        if nxt in path:
            return " -> ".join(path[path.index(nxt):] + [nxt])
        path.append(nxt)


def test_every_module_imports():
    for name in package_modules():
        importlib.import_module(name)


def test_no_import_cycles():
    graph = import_graph(package_modules())
    cycles = find_cycles(graph)
    new = [c for c in cycles if c not in KNOWN_CYCLES]
    assert not new, "import cycles:\n" + "\n".join(describe(c, graph) for c in new)
    stale = [c for c in KNOWN_CYCLES if c not in cycles]
    assert not stale, f"KNOWN_CYCLES lists cycles that are gone, remove them: {stale}"


def test_detector_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert find_cycles(graph) == [("a", "b", "c"), ("e",)]
    assert describe(("a", "b", "c"), graph) == "a -> b -> c -> a"
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_graph_reads_relative_and_function_level_imports(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from .a import x\n")
    (pkg / "a.py").write_text("def f():\n    from . import b\n    return b\nx = 1\n")
    (pkg / "b.py").write_text("from pkg.a import x\n")
    modules = {"pkg": pkg / "__init__.py", "pkg.a": pkg / "a.py", "pkg.b": pkg / "b.py"}
    graph = import_graph(modules)
    assert graph == {"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}}
    assert find_cycles(graph) == [("pkg.a", "pkg.b")]


if __name__ == "__main__":  # pragma: no cover - a quick listing for whoever untangles a cycle
    g = import_graph(package_modules())
    for c in find_cycles(g):
        print(describe(c, g))
