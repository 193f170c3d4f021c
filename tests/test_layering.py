"""The package layering holds: no import cycles between modules, none between packages except through the
self-contained modeling file every DLR release ships, and no module imports another module's private names.

Imports are read with ``ast`` (function-level imports included), so nothing is imported to check them."""
import ast
from collections import defaultdict
from pathlib import Path

import weightlock

ROOT = Path(weightlock.__file__).resolve().parent
# imports nothing from weightlock (torch and transformers only): a leaf, whatever package it sits in
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
    return mod.split(".")[1] if "." in mod else mod


def test_no_import_cycles_between_modules():
    edges = {(a, b) for a, b, _ in _imports() if a != b}
    assert _cycles(edges) == []


def test_no_import_cycles_between_packages_except_through_the_modeling_file():
    edges = {(_package(a), _package(b)) for a, b, _ in _imports()
             if b != LEAF and b != "weightlock" and _package(a) != _package(b)}
    assert _cycles(edges) == []
    leaf = _modules()[LEAF]
    assert not [b for a, b, _ in _imports() if a == LEAF], f"{leaf.name} must stay self-contained"


def test_no_private_names_imported_across_modules():
    private = [(a, b, name) for a, b, name in _imports()
               if name.startswith("_") and not name.startswith("__") and a != b]
    assert private == []
