"""The package order of docs/architecture.md, checked over the import graph (every import of a
project module, at module top or inside a function, TYPE_CHECKING ones included).

Imports only point down ORDER; no two packages, and no two modules, import each other
(directly or round a longer loop); the planning package is imported by the entry points only.
"""

from __future__ import annotations

import ast
import os
import re
from collections import defaultdict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# top to bottom; a module may import its own package and those below it
ORDER = [
    "longtrain_launch",
    "longtrain.planning",
    "longtrain.eval",
    "longtrain.train",
    "longtrain.checkpoint",
    "longtrain.data",
    "longtrain.model",
    "longtrain.memory",
    "longtrain.attention",
    "longtrain.parallel",
    "longtrain.observability",
    "longtrain.config",
    "longtrain_kernels",
]
SOURCES = {"longtrain": "longtrain", "longtrain_launch": "launch/longtrain_launch",
           "longtrain_kernels": "kernels/longtrain_kernels"}

# where a project import may sit inside a function: the modules that launch Triton kernels,
# which import `triton` with them (a CPU-only machine imports longtrain without it)
LAZY_IMPORTS_ALLOWED = re.compile(r"^kernels/longtrain_kernels/\w+/launch\.py$")
# packages only the entry points (longtrain_launch) may import: the planning layer
TOP_ONLY = {"longtrain.planning"}


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


def cycles(graph: dict[str, set[str]], *, order: list[str] = ORDER) -> set[tuple[str, ...]]:
    """Strongly connected components of more than one node (Tarjan)."""
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

    for v in order:
        if v not in index:
            visit(v)
    return out


def test_every_module_belongs_to_a_package_of_the_order():
    loose = [m for m in _modules() if package_of(m) is None and m != "longtrain"]
    assert loose == [], f"modules outside the package order (add their package to ORDER): {loose}"


def module_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (`from pkg import name` counts as importing
    pkg.name when that is a module, else pkg)."""
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for module, path in mods.items():
        found = set()
        for target in imports_of(path, module):
            while target and target not in mods:
                target = target.rpartition(".")[0]
            if target and target != module:
                found.add(target)
        graph[module] = found
    return graph


def module_cycles() -> set[tuple[str, ...]]:
    """Import cycles between modules, a package's __init__ re-exporting its own modules aside
    (an __init__ importing its submodules is how a package presents them, not a cycle)."""
    graph = module_graph()
    pruned = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in graph.items()}
    return cycles(pruned, order=sorted(pruned))


def test_no_import_points_up_the_package_order():
    found = sorted(upward_imports(package_graph()))
    assert found == [], f"imports that point up the package order (see docs/architecture.md): {found}"


def test_no_package_cycle_and_no_module_cycle():
    assert cycles(package_graph()) == set()
    assert module_cycles() == set()


def test_only_the_entry_points_import_the_planning_layer():
    graph = package_graph()
    for pkg in TOP_ONLY:
        importers = sorted(src for src, dsts in graph.items() if pkg in dsts)
        assert set(importers) <= {"longtrain_launch"}, (pkg, importers)


def imports_in_functions(path: str) -> list[tuple[int, str]]:
    """(line, module) of every project import inside a function of the file at `path`."""
    tree = ast.parse(open(path, encoding="utf-8").read(), filename=path)
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if in_function and isinstance(child, (ast.Import, ast.ImportFrom)):
                names = ([child.module or ""] if isinstance(child, ast.ImportFrom)
                         else [a.name for a in child.names])
                if getattr(child, "level", 0) or any(package_of(n) for n in names):
                    found.append((child.lineno, names[0]))
            visit(child, inside)

    visit(tree, False)
    return found


def test_project_imports_sit_at_module_top():
    """So the import graph is visible where it is read; heavy third-party imports (ray,
    deepspeed, megatron, transformers, wandb) stay inside the functions that need them."""
    hidden = []
    for module, path in _modules().items():
        rel = os.path.relpath(path, ROOT)
        if LAZY_IMPORTS_ALLOWED.match(rel):
            continue
        hidden += [f"{rel}:{line} imports {name}" for line, name in imports_in_functions(path)]
    assert hidden == [], "project imports inside functions (move them to the top):\n" + \
        "\n".join(hidden)


def test_the_checker_sees_an_upward_import_and_a_cycle():
    graph = {"longtrain.config": {"longtrain.train"}, "longtrain.train": {"longtrain.config"}}
    assert upward_imports(graph) == {("longtrain.config", "longtrain.train")}
    assert cycles(graph) == {("longtrain.config", "longtrain.train")}
    modules = {"a.x": {"a.y"}, "a.y": {"a.z"}, "a.z": {"a.x"}, "a.w": {"a.x"}}
    assert cycles(modules, order=sorted(modules)) == {("a.x", "a.y", "a.z")}


LONG_FILE_LINES = 450


def test_a_long_module_says_why_at_its_top():
    """A module of longtrain/ over LONG_FILE_LINES lines states the reason in its docstring
    ("Over 450 lines on purpose: ..."); otherwise it does several jobs and should be split."""
    unexplained = []
    for module, path in _modules().items():
        text = open(path, encoding="utf-8").read()
        if not module.startswith("longtrain.") or text.count("\n") <= LONG_FILE_LINES:
            continue
        doc = ast.get_docstring(ast.parse(text)) or ""
        if "Over 450 lines on purpose:" not in doc:
            unexplained.append(f"{os.path.relpath(path, ROOT)} ({text.count(chr(10))} lines)")
    assert unexplained == [], f"long modules with no stated reason: {unexplained}"
