"""Fingerprints: short content hashes of settings, files and folders. What a stage was asked to do is hashed into
its manifest (pipeline/runs.py); datasets and checkpoints are fingerprinted with the same functions (pipeline/data.py).
It imports only imports_graph, which imports nothing of the package, so every module can use it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pipeline import imports_graph


def hash_obj(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


# per process and package: its module names, and each module's imports and file hash, read once, when a closure first
# reaches it (an edit or a pull while a stage trains is not the code that trained it; a file no stage imports, a
# scratch one that does not parse, is never read)
_CODE: dict[Path, tuple[set[str], dict[str, tuple[set[str], str]]]] = {}


def code_hash(module: str, *more: str, package: Path = imports_graph.PACKAGE) -> str:
    """The code that importing `module` ("pipeline.sft") and `more` can run: the source of every module of the
    package in their import closure, imports inside functions included (pipeline/imports_graph.py). A stage's manifest
    and eval's records keep it, so an edit to a module the stage never runs does not read as other code."""
    if package not in _CODE:
        _CODE[package] = imports_graph.names(package), {}
    names, read = _CODE[package]

    def edges(name: str) -> set[str]:
        if name not in names:  # `from pipeline.x import` of no module x: nothing to read
            return set()
        if name not in read:
            path = package / f"{name}.py"
            read[name] = imports_graph.imported(name, imports_graph.parse(path), names), hash_file(path)
        return read[name][0]

    reached = imports_graph.closure(edges, *(m.rsplit(".", 1)[-1] for m in (module, *more)))
    return hash_obj([(f"{name}.py", read[name][1]) for name in sorted(reached) if name in names])


def hash_folder(path: Path, files: list[Path] | None = None) -> str:
    """Contents for small files, name/size/mtime for big ones (hashing 100 GB of weights is not worth it): every
    file under `path`, or only `files` (the ones a reader reads)."""
    entries = []
    for p in sorted(path.rglob("*") if files is None else files):
        if p.is_file() and ".partial" not in p.parts:
            st = p.stat()
            rel = str(p.relative_to(path))
            entries.append((rel, hash_file(p)) if st.st_size < (64 << 20) else (rel, st.st_size, st.st_mtime_ns))
    return hash_obj(entries)
