"""Shape of the ``esper`` package: no import circles, no source file over 400 lines.

The import graph is read from the source with :mod:`ast`, so it sees every ``import`` statement,
at module level and inside functions alike (a lazy import that dodges a circle is still a
circle). An edge goes to the module an import names: ``from esper.a import b`` points at
``esper.a.b`` when that is a module and at ``esper.a`` (its ``__init__``) otherwise. The implicit
import of a parent package's ``__init__`` is not an edge; it is how Python loads any submodule.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "esper"
MAX_LINES = 400


def module_files() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its ``__init__.py``)."""
    modules: dict[str, Path] = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _absolute(module: str, is_package: bool, level: int, name: str | None) -> str:
    """The absolute dotted name of a (possibly relative) ``from`` import's base."""
    if level == 0:
        return name or ""
    base = module.split(".")
    if not is_package:
        base = base[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join([*base, name] if name else base)


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The ``esper`` modules that ``module`` imports anywhere in its source."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def resolve(name: str) -> None:
        # the longest prefix of the name that is a module of ours
        parts = name.split(".")
        for end in range(len(parts), 0, -1):
            candidate = ".".join(parts[:end])
            if candidate in modules:
                found.add(candidate)
                return

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                resolve(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, is_package, node.level, node.module)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                if full in modules:
                    found.add(full)
                else:
                    resolve(base)
    found.discard(module)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = module_files()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0

    def visit(start: str) -> None:
        nonlocal counter
        # iterative depth-first search: (node, iterator over its successors)
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, successors = work[-1]
            advanced = False
            for nxt in successors:
                if nxt not in index:
                    index[nxt] = low[nxt] = counter
                    counter += 1
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    advanced = True
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            if advanced:
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))

    for name in sorted(graph):
        if name not in index:
            visit(name)
    return components


def test_graph_reader_sees_function_level_and_relative_imports(tmp_path):
    source = "import os\nfrom . import b\n\ndef f():\n    from esper.pkg.c import thing\n"
    path = tmp_path / "a.py"
    path.write_text(source)
    modules = {"esper.pkg": tmp_path, "esper.pkg.a": path, "esper.pkg.b": path, "esper.pkg.c": path}
    assert imports_of("esper.pkg.a", path, modules) == {"esper.pkg.b", "esper.pkg.c"}


def test_cycle_finder_finds_a_circle_and_only_that():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert find_cycles(graph) == [["a", "b", "c"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_graph_covers_the_package():
    graph = import_graph()
    assert "esper.train" in graph and "esper.simic.ppo_round" in graph
    # a known downward edge: the trainer's round reads the env it collects from
    assert "esper.simic.env" in graph["esper.simic.ppo_round"]
    # leyline imports nothing else of esper
    for name, targets in graph.items():
        if name.startswith("esper.leyline"):
            assert all(t.startswith("esper.leyline") for t in targets), (name, targets)


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert cycles == [], "import circles in esper:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_no_source_file_over_400_lines():
    long = {
        str(path.relative_to(ROOT.parent)): n
        for path in ROOT.rglob("*.py")
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert long == {}, f"files over {MAX_LINES} lines: {long}"
