"""Fingerprints: short content hashes of settings, files and folders. What a stage was asked to do is hashed into
its manifest (pipeline/runs.py); datasets and checkpoints are fingerprinted with the same functions (pipeline/data.py).
It imports nothing of the package, so every module can use it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def hash_obj(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


_CODE: list[str] = []


def code_hash() -> str:
    """This package's own code: the hash of every module's source, so a cache of outputs that the code computes
    (eval's records) is not read back after the code changed (an upgrade, a local edit)."""
    if not _CODE:
        here = Path(__file__).resolve().parent
        _CODE.append(hash_obj([(p.name, hash_file(p)) for p in sorted(here.glob("*.py"))]))
    return _CODE[0]


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
