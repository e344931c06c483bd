"""Remember a dataset's plan (class and domain tables, splits, image-check verdict) so a warm start reads it back.

Every run on a dataset derives the same things from its label and domain columns: each row's class and domain
index, the rows of every domain, which classes every domain shows, the seeded in/out split of every domain, and
whether every image decodes. Computed, each costs a pass over the rows; on DomainNet-sized tables, before every run
of every sweep. Each is stored here once, as arrays in an uncompressed ``.npz`` under ``<dgzoo cache>/plans/``,
named by a hash of everything it depends on:

- the table: its ``datasets`` fingerprint (which changes with the data files, the Hub commit and every
  transformation applied to the table), the content fingerprint of a local source (:mod:`dgzoo.data.fingerprint`,
  which also covers image files a table only names by path), its row count, the column names, and the registry
  facts that order its domains;
- what the entry adds: the split seed and holdout fraction for splits, the checked domains for a verdict;
- :data:`PLAN_FORMAT`, bumped whenever what an entry holds or how it is computed changes.

The key is also stored inside the entry and compared on reading, so an entry is used only for exactly the key it
was written for. A missing, unreadable, truncated or mismatched entry is ignored (the plan is computed again and
the entry rewritten); an entry is written to a temporary file and renamed into place, so a reader never sees half
of one, and a cache that cannot be written costs the next run the computation, nothing else.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
from pathlib import Path
from typing import Any

import numpy as np

from .builtin import cache_root

logger = logging.getLogger(__name__)

PLAN_FORMAT = 1  # bump when an entry's arrays or the computation behind them change
_KEY = "__key__"


def plan_dir() -> Path:
    """Where plan entries live: ``<dgzoo cache>/plans``."""
    return cache_root() / "plans"


def _key_text(kind: str, key: dict[str, Any]) -> str:
    return json.dumps({"kind": kind, "format": PLAN_FORMAT, **key}, sort_keys=True, default=str)


def key_hash(kind: str, key: dict[str, Any]) -> str:
    """A short stable name for ``key`` (hex): what entries and derived keys are called by."""
    return hashlib.sha256(_key_text(kind, key).encode()).hexdigest()[:32]


def _path(kind: str, key: dict[str, Any]) -> Path:
    return plan_dir() / f"{kind}-{key_hash(kind, key)}.npz"


def load(kind: str, key: dict[str, Any]) -> dict[str, np.ndarray] | None:
    """The arrays stored for ``(kind, key)``, or None when there is no usable entry (missing, damaged, or written
    for another key)."""
    path = _path(kind, key)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as stored:
            arrays = {name: stored[name] for name in stored.files}
        if str(arrays.pop(_KEY)) != _key_text(kind, key):
            raise ValueError("written for another key")
    except Exception as e:  # whatever an unreadable entry raises, the plan is computed again
        logger.debug("ignoring plan cache entry %s (%s); computing the plan again", path, e)
        return None
    return arrays


def save(kind: str, key: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """Store ``arrays`` for ``(kind, key)`` atomically; a cache that cannot be written is skipped silently (the
    next run computes the plan again)."""
    path = _path(kind, key)
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.parent / f".{path.stem}-{os.getpid()}-{secrets.token_hex(4)}.tmp"
        # os.open rather than tempfile: the entry gets the umask's permissions, like every other file of the cache
        with os.fdopen(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
            stored: dict[str, Any] = {_KEY: np.array(_key_text(kind, key)), **arrays}
            np.savez(f, **stored)
        os.replace(temporary, path)
        temporary = None
    except OSError as e:
        logger.debug("could not write plan cache entry %s (%s)", path, e)
    finally:
        if temporary is not None:
            temporary.unlink(missing_ok=True)


def tables_key(
    table: Any, source: str, columns: dict[str, str], spec: Any, content: str | None
) -> dict[str, Any] | None:
    """What a table's class and domain tables depend on, or None when the table has no fingerprint to name it."""
    fingerprint = getattr(table, "_fingerprint", None)
    if not fingerprint:
        return None
    return {
        "table": fingerprint,
        "content": content,
        "rows": int(table.num_rows),
        "source": source,
        "columns": columns,
        "registry": [spec.name, list(spec.domains)] if spec is not None else None,  # orders integer domain ids
    }


def load_tables(key: dict[str, Any], rows: int) -> dict[str, np.ndarray] | None:
    """The stored tables for ``key``, or None when missing or not of the expected shape (then recomputed)."""
    cached = load("tables", key)
    names = ("domains", "class_names", "labels", "domain_of_row", "by_domain", "domain_sizes", "class_presence")
    if cached is None or any(n not in cached for n in (*names, "images_in_key")):
        return None
    shape_ok = (
        len(cached["labels"]) == len(cached["domain_of_row"]) == len(cached["by_domain"]) == rows
        and cached["class_presence"].shape == (len(cached["domains"]), len(cached["class_names"]))
        and len(cached["domain_sizes"]) == len(cached["domains"])
        and int(cached["domain_sizes"].sum()) == rows
    )
    return cached if shape_ok else None


def all_embedded(table: Any, image_column: str) -> bool:
    """Whether every row of ``table`` stores its image's bytes (none only names a file): read per Arrow chunk from
    the null counts, without touching the bytes."""
    import pyarrow as pa

    column = table.data.column(image_column)
    for chunk in column.chunks:
        if not pa.types.is_struct(chunk.type) or chunk.type.get_field_index("bytes") < 0:
            return False
        if chunk.field("bytes").null_count:
            return False
    return True


__all__ = ["PLAN_FORMAT", "all_embedded", "key_hash", "load", "load_tables", "plan_dir", "save", "tables_key"]
