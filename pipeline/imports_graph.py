"""The package's import graph, read from the source with `ast` (nothing is imported): which pipeline modules each
module imports. Imports inside functions count: a lazy import is still code the module runs. A stage's code hash
covers its script's closure (pipeline/fingerprints.py); tests/test_structure.py checks the graph's shape (no cycles,
no stage importing another). It imports nothing of the package, so fingerprints can use it."""

from __future__ import annotations

import ast
from collections.abc import Callable, Iterable
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
INIT = "__init__"  # runs before any module of the package: in every closure


def names(package: Path = PACKAGE) -> set[str]:
    """The package's module names (its files' stems), __init__ included: nothing is read."""
    return {p.stem for p in package.glob("*.py")}


def parse(path: Path) -> ast.Module:
    """A module's source as Python reads it: bytes, so UTF-8 (or the file's own coding line), whatever the locale."""
    return ast.parse(path.read_bytes(), filename=str(path))


def modules(package: Path = PACKAGE) -> dict[str, ast.Module]:
    """Every module of the package by name (its file's stem), __init__ included."""
    return {p.stem: parse(p) for p in sorted(package.glob("*.py"))}


def imports(tree: ast.Module, names: set[str]) -> list[tuple[str, str | None, int]]:
    """(module imported, name imported from it or None, line) for every import of a pipeline module."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level <= 1:
            # `from pipeline[.x] import ...` and its relative form `from .[x] import ...`
            module = node.module if node.level == 0 else ".".join(filter(None, ["pipeline", node.module]))
            if module == "pipeline":  # from pipeline import a, b: each is a module
                out += [(a.name, None, node.lineno) for a in node.names if a.name in names]
            elif module and module.startswith("pipeline."):
                target = module.split(".")[1]
                out += [(target, a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.Import):
            out += [(a.name.split(".")[1], None, node.lineno) for a in node.names
                    if a.name.startswith("pipeline.") and a.name.split(".")[1] in names]
    return out


def module_aliases(tree: ast.Module, names: set[str]) -> dict[str, str]:
    """Local name -> pipeline module, for `from pipeline import x [as y]` (or `from . import x [as y]`)."""
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module, node.level) in (("pipeline", 0), (None, 1)):
            out.update({a.asname or a.name: a.name for a in node.names if a.name in names})
    return out


def imported(name: str, tree: ast.Module, names: set[str]) -> set[str]:
    """The pipeline modules that module `name` (parsed: `tree`) imports, itself left out; `names`: the package's."""
    return {target for target, _, _ in imports(tree, names) if target != name}


def graph(trees: dict[str, ast.Module]) -> dict[str, set[str]]:
    """Module -> the pipeline modules it imports (itself left out)."""
    return {name: imported(name, tree, set(trees)) for name, tree in trees.items()}


def closure(edges: Callable[[str], Iterable[str]], *roots: str) -> set[str]:
    """The modules that importing `roots` can run: them, __init__, and every module they import, directly or not.
    `edges(name)`: the modules `name` imports, asked once per module reached (so only those are read)."""
    seen: set[str] = set()
    todo = [*roots, INIT]
    while todo:
        if (name := todo.pop()) not in seen:
            seen.add(name)
            todo += edges(name)
    return seen
