"""The package order of docs/architecture.md, checked over the import graph (every import of a
project module, at module top or inside a function).

Imports only point down ORDER. What does not yet (`KNOWN_UPWARD`, `KNOWN_CYCLES`) is listed
here as debt: the test fails on any new upward import or cycle, and also when a listed one is
gone, so the lists only shrink (remove the entry in the change that fixes it).
"""

from __future__ import annotations

import ast
import os
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# top to bottom; a module may import its own package and those below it
ORDER = [
    "longtrain_launch",
    "longtrain.train",
    "longtrain.eval",
    "longtrain.checkpoint",
    "longtrain.data",
    "longtrain.model",
    "longtrain.attention",
    "longtrain.memory",
    "longtrain.parallel",
    "longtrain.observability",
    "longtrain.config",
    "longtrain_kernels",
]
SOURCES = {"longtrain": "longtrain", "longtrain_launch": "launch/longtrain_launch",
           "longtrain_kernels": "kernels/longtrain_kernels"}

# (importing package, imported package): upward imports that exist today (2026-12-07)
KNOWN_UPWARD: set[tuple[str, str]] = {
    ("longtrain.checkpoint", "longtrain.train"),
    # config/validate.py and preflight.py plan a whole run: they belong to a planning
    # package above train/ (issue #21, item 3)
    ("longtrain.config", "longtrain.attention"),
    ("longtrain.config", "longtrain.checkpoint"),
    ("longtrain.config", "longtrain.data"),
    ("longtrain.config", "longtrain.memory"),
    ("longtrain.config", "longtrain.model"),
    ("longtrain.config", "longtrain.parallel"),
    ("longtrain.config", "longtrain.train"),
    ("longtrain.eval", "longtrain.train"),
    # the memory planner and the cost model read the model and the attention plan: planning
    ("longtrain.memory", "longtrain.attention"),
    ("longtrain.memory", "longtrain.train"),
    ("longtrain.parallel", "longtrain.attention"),
    ("longtrain.parallel", "longtrain.memory"),
    ("longtrain.parallel", "longtrain.model"),
}
# each cycle as the sorted tuple of the packages in one strongly connected component
KNOWN_CYCLES: set[tuple[str, ...]] = {
    ("longtrain.attention", "longtrain.checkpoint", "longtrain.config", "longtrain.data",
     "longtrain.memory", "longtrain.model", "longtrain.observability", "longtrain.parallel",
     "longtrain.train"),
}


def _modules() -> dict[str, str]:
    out = {}
    for top, rel in SOURCES.items():
        base = os.path.join(ROOT, rel)
        for dirpath, _, files in os.walk(base):
            for name in files:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(dirpath, name)
                parts = os.path.relpath(path, base)[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                out[".".join([top, *parts])] = path
    return out


def package_of(module: str) -> str | None:
    for pkg in ORDER:
        if module == pkg or module.startswith(pkg + "."):
            return pkg
    return None


def imports_of(path: str, module: str) -> set[str]:
    tree = ast.parse(open(path, encoding="utf-8").read(), filename=path)
    is_pkg = path.endswith("__init__.py")
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base[:len(base) - node.level + (1 if is_pkg else 0)]
                name = ".".join([*base, *([node.module] if node.module else [])])
            else:
                name = node.module or ""
            found.add(name)
            found.update(f"{name}.{alias.name}" for alias in node.names)
    return {m for m in found if package_of(m) is not None}


def package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = defaultdict(set)
    for module, path in _modules().items():
        src = package_of(module)
        if src is None:
            continue
        for target in imports_of(path, module):
            dst = package_of(target)
            if dst is not None and dst != src:
                graph[src].add(dst)
    return graph


def upward_imports(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    rank = {pkg: i for i, pkg in enumerate(ORDER)}
    return {(src, dst) for src, dsts in graph.items() for dst in dsts if rank[dst] < rank[src]}


def cycles(graph: dict[str, set[str]]) -> set[tuple[str, ...]]:
    """Strongly connected components of more than one package (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: set[tuple[str, ...]] = set()
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
                out.add(tuple(sorted(component)))

    for v in ORDER:
        if v not in index:
            visit(v)
    return out


def test_every_module_belongs_to_a_package_of_the_order():
    loose = [m for m in _modules() if package_of(m) is None and m != "longtrain"]
    assert loose == [], f"modules outside the package order (add their package to ORDER): {loose}"


def test_no_new_upward_import_and_the_debt_only_shrinks():
    found = upward_imports(package_graph())
    new = sorted(found - KNOWN_UPWARD)
    assert new == [], f"imports that point up the package order (see docs/architecture.md): {new}"
    fixed = sorted(KNOWN_UPWARD - found)
    assert fixed == [], f"no longer imported upward; remove from KNOWN_UPWARD: {fixed}"


def test_no_new_package_cycle_and_the_debt_only_shrinks():
    found = cycles(package_graph())
    new = sorted(found - KNOWN_CYCLES)
    assert new == [], f"new import cycles between packages: {new}"
    fixed = sorted(KNOWN_CYCLES - found)
    assert fixed == [], f"cycles that are gone; remove from KNOWN_CYCLES: {fixed}"


def test_the_checker_sees_an_upward_import_and_a_cycle():
    graph = {"longtrain.config": {"longtrain.train"}, "longtrain.train": {"longtrain.config"}}
    assert upward_imports(graph) == {("longtrain.config", "longtrain.train")}
    assert cycles(graph) == {("longtrain.config", "longtrain.train")}
