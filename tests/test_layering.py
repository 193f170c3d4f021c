"""The package layering holds: no import cycles between modules, none between packages (``weightlock.<package>``
and each top-level module a node; generic code reaches a lock's model classes through the registries, e.g.
``weightlock.models.formats``, never by importing the lock), and no module imports another module's private
names.

Imports are read with ``ast`` — module-level and function-level ones alike, relative ones resolved — so
nothing is imported to check them."""
import ast
from collections import defaultdict
from pathlib import Path

import weightlock

ROOT = Path(weightlock.__file__).resolve().parent
# imports nothing from weightlock (torch and transformers only): it ships inside every DLR release
LEAF = "weightlock.dlr.modeling_weightlock_dlr"


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports() -> list[tuple[str, str, str]]:
    """(importing module, imported module, imported name or '') for every weightlock import."""
    mods = _modules()
    out = []
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                out += [(mod, a.name, "") for a in node.names if a.name.split(".")[0] == "weightlock"]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] != "weightlock":
                    continue
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    out.append((mod, sub, "") if sub in mods else (mod, target, a.name))
    return out


def _cycles(edges: set[tuple[str, str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    graph = defaultdict(set)
    for a, b in edges:
        graph[a].add(b)
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return found


def _package(mod: str) -> str:
    """The node of ``mod`` in the package graph: ``weightlock.<package>``, a top-level module, or ``weightlock``."""
    return ".".join(mod.split(".")[:2])


def _a_cycle(edges: set[tuple[str, str]], component: list[str]) -> list[str]:
    """One cycle through the strongly connected ``component``: ``[a, b, ..., a]``."""
    inside = set(component)
    graph = defaultdict(list)
    for a, b in sorted(edges):
        if a in inside and b in inside:
            graph[a].append(b)
    start = component[0]
    paths, seen = {start: [start]}, {start}
    todo = [start]
    while todo:  # breadth first from start, until an edge leads back to it
        v = todo.pop(0)
        for w in graph[v]:
            if w == start:
                return paths[v] + [start]
            if w not in seen:
                seen.add(w)
                paths[w] = paths[v] + [w]
                todo.append(w)
    raise AssertionError(f"no cycle through {component}")


def _describe_cycles(edges: dict[tuple[str, str], list[str]]) -> str:
    lines = []
    for comp in _cycles(set(edges)):
        cycle = _a_cycle(set(edges), comp)
        lines.append(" -> ".join(cycle))
        lines += [f"    {a} -> {b}: {', '.join(sorted(set(edges[a, b])))}" for a, b in zip(cycle, cycle[1:])]
    return "\n".join(lines)


def test_no_import_cycles_between_modules():
    edges = defaultdict(list)
    for a, b, _ in _imports():
        if a != b:
            edges[a, b].append(f"{a} imports {b}")
    assert not _cycles(set(edges)), "import cycles between modules:\n" + _describe_cycles(edges)


def test_no_import_cycles_between_packages():
    edges = defaultdict(list)
    for a, b, _ in _imports():
        if _package(a) != _package(b):
            edges[_package(a), _package(b)].append(f"{a} imports {b}")
    assert not _cycles(set(edges)), "import cycles between packages:\n" + _describe_cycles(edges)


def test_the_modeling_file_stays_self_contained():
    assert not [b for a, b, _ in _imports() if a == LEAF], f"{LEAF} must import nothing from weightlock"


def test_the_cycle_finder_finds_and_names_a_cycle():
    edges = {("weightlock.models", "weightlock.dlr"): ["weightlock.models.hub imports weightlock.dlr.x"],
             ("weightlock.dlr", "weightlock.models"): ["weightlock.dlr.lock imports weightlock.models.hub"],
             ("weightlock.dlr", "weightlock.io"): ["weightlock.dlr.lock imports weightlock.io"]}
    assert _cycles(set(edges)) == [["weightlock.dlr", "weightlock.models"]]
    text = _describe_cycles(edges)
    assert "weightlock.dlr -> weightlock.models -> weightlock.dlr" in text
    assert "weightlock.models.hub imports weightlock.dlr.x" in text
    assert _package("weightlock.dlr.lock") == "weightlock.dlr" and _package("weightlock.io") == "weightlock.io"


def test_no_private_names_imported_across_modules():
    private = [(a, b, name) for a, b, name in _imports()
               if name.startswith("_") and not name.startswith("__") and a != b]
    assert private == []
