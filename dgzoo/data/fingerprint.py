"""The content fingerprint of a local dataset: what names its data wherever it lives.

A local dataset is given by a path, which means nothing on another machine and may hold a user's home folder.
Results, cards and published files name it instead by its folder's (or file's) base name and this fingerprint:
a sha256 over every file's path relative to the root and its bytes, so two copies of one dataset agree
wherever they are, and a changed image, label or file changes it.

Hashing reads every byte once. The answer is remembered in ``<dgzoo cache>/fingerprints/``, keyed by the
listing (relative path, size and modification time of every file), so later runs on unchanged data only list
the files, as ``git status`` does.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .builtin import cache_root

FINGERPRINT_LENGTH = 16  # hex digits shown and compared: 64 bits, far beyond any collision among a user's datasets


def _files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    # Hidden files and folders (``.cache``, ``.git``) are tools' bookkeeping, not the dataset.
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def local_fingerprint(path: str | Path) -> str:
    """The content fingerprint (hex, :data:`FINGERPRINT_LENGTH` digits) of the file or folder ``path``."""
    root = Path(path).expanduser().resolve()
    files = _files(root)
    base = root.parent if root.is_file() else root
    listing = [(str(p.relative_to(base).as_posix()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    key = hashlib.sha256(json.dumps([str(root), listing]).encode()).hexdigest()[:32]
    memo = cache_root() / "fingerprints" / f"{key}.json"
    if memo.is_file():
        try:
            return str(json.loads(memo.read_text())["fingerprint"])
        except (OSError, ValueError, KeyError):
            pass  # a damaged memo is recomputed
    digest = hashlib.sha256()
    for file, (relative, size, _) in zip(files, listing):
        digest.update(f"{relative}\0{size}\0".encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    fingerprint = digest.hexdigest()[:FINGERPRINT_LENGTH]
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        memo.write_text(json.dumps({"fingerprint": fingerprint}) + "\n")
    except OSError:  # a read-only cache costs the next run one more pass, nothing else
        pass
    return fingerprint


def local_name(path: str | Path) -> str:
    """How results and cards name a local dataset: the base name of its folder or file (no directories)."""
    return Path(path).expanduser().resolve().name


__all__ = ["FINGERPRINT_LENGTH", "local_fingerprint", "local_name"]
