"""Catch undecodable images before training, and name the image when one slips through anyway.

A corrupt or truncated image otherwise surfaces as a PIL traceback from a DataLoader worker, mid-run (a source
domain) or at the first evaluation (a held-out domain, after the steps before it were spent). :func:`check_images`
decodes every image a run will read once, before anything is written, and remembers a dataset it has checked (by
its table's fingerprint) in dgzoo's cache, so later runs on the same data skip the pass. :class:`ImageDecodeError`
is the one-line error for both the pass and a decode failure during training.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from ..errors import DGZooError
from . import plan_cache
from .builtin import cache_root

logger = logging.getLogger(__name__)


class ImageDecodeError(DGZooError):
    """An image of the dataset cannot be decoded; the message names its domain, row and file."""

    def __init__(self, message: str):
        # A DataLoader worker re-raises our error in the main process as ``type(e)(worker traceback text)``:
        # keep only our own line from it.
        marker = f"{type(self).__name__}: "
        if "Traceback" in message and marker in message:
            message = message.rsplit(marker, 1)[1]
        super().__init__(message)


def _undecoded(table: Any, image_column: str) -> Any:
    """``table`` with its image column as stored (bytes and/or path), so reading a row decodes nothing."""
    import datasets

    return table.cast_column(image_column, datasets.Image(decode=False))


def _describe_source(raw: Any) -> str:
    path = raw.get("path") if isinstance(raw, dict) else None
    return f"file {path}" if path else "embedded bytes"


def image_source(table: Any, image_column: str, row: int) -> str:
    """Where row ``row``'s image comes from: its file path, or the row itself for embedded bytes."""
    return _describe_source(_undecoded(table, image_column)[int(row)][image_column])


def decode_error(table: Any, image_column: str, row: int) -> str | None:
    """Why the image of row ``row`` does not decode fully, or None when it does."""
    return _decode_problem(_undecoded(table, image_column)[int(row)][image_column])


def _decode_problem(raw: Any) -> str | None:
    from PIL import Image

    try:
        if raw is None:
            return "the image is missing (None)"
        data = raw.get("bytes") if isinstance(raw, dict) else None
        source = io.BytesIO(data) if data else (raw.get("path") if isinstance(raw, dict) else raw)
        if source is None:
            return "the image has neither bytes nor a path"
        with Image.open(source) as image:
            image.load()  # a full decode: truncated files fail here, not at open
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError...); all mean "unreadable"
        return f"{type(e).__name__}: {' '.join(str(e).split())[:120]}"
    return None


def undecodable_rows(
    table: Any, image_column: str, rows: Iterable[int], limit: int = 5, threads: int | None = None
) -> list[tuple[int, str]]:
    """Up to ``limit`` rows among ``rows`` whose image does not decode, with the reason, in row order.

    Chunks are decoded on a thread pool: PIL releases the GIL while decoding, so threads use every core without
    copying the table into worker processes.
    """
    raw_table = _undecoded(table, image_column)
    rows = np.asarray(list(rows), dtype=np.int64)
    chunks = [rows[i : i + 512] for i in range(0, len(rows), 512)]

    def scan(chunk: np.ndarray) -> list[tuple[int, str]]:
        found = []
        for row, raw in zip(chunk, raw_table.select(chunk)[image_column]):
            problem = _decode_problem(raw)
            if problem is not None:
                found.append((int(row), problem))
        return found

    workers = threads or min(16, os.cpu_count() or 1)
    if workers == 1 or len(chunks) <= 1:
        found = [bad for chunk in chunks for bad in scan(chunk)]
    else:
        with ThreadPoolExecutor(workers) as pool:
            found = [bad for part in pool.map(scan, chunks) for bad in part]
    return found[:limit]


def _fingerprint(table: Any, image_column: str, rows: np.ndarray) -> str:
    digest = hashlib.sha256(f"{getattr(table, '_fingerprint', id(table))}:{image_column}".encode())
    digest.update(np.sort(rows).tobytes())
    digest.update(_file_state(table, image_column, rows))
    return digest.hexdigest()[:32]


def _file_state(table: Any, image_column: str, rows: np.ndarray) -> bytes:
    """Size and modification time of every image the table references by path (image folders): the table's
    fingerprint covers embedded bytes but not files, so an image replaced or corrupted in place must change the
    key, or the cached "decodes" would let it through to the middle of a run."""
    stored = _undecoded(table, image_column).select_columns([image_column]).with_format("arrow")[:]
    # Per chunk and zero-copy: combining the chunks would copy every embedded image's bytes at every start.
    fields = [dict(zip(chunk.type.names, chunk.flatten())) for chunk in stored.column(image_column).chunks]
    if all(f["bytes"].null_count == 0 for f in fields):
        return b""  # every image embedded: the fingerprint already covers it
    paths = [p for f in fields for p in f["path"].to_pylist()]
    embedded = [v for f in fields for v in f["bytes"].is_valid().to_pylist()]
    state = []
    for row in np.sort(rows).tolist():
        if embedded[row] or paths[row] is None:
            continue
        try:
            st = os.stat(paths[row])
            state.append(f"{row}:{st.st_size}:{st.st_mtime_ns}")
        except OSError:
            state.append(f"{row}:missing")
    return "\n".join(state).encode()


def check_images(data: Any, domains: Sequence[str], remember: bool = True) -> None:
    """Decode every image of ``domains`` once; raise :class:`ImageDecodeError` naming the first bad one.

    Checked datasets are remembered in ``<dgzoo cache>/verified/`` (unless ``remember`` is False: a dry run writes
    nothing anywhere), so the pass costs once per dataset, not per run. Where the dataset's plan key names every
    image's content (:attr:`DGDataset.images_in_key`), the verdict is also kept in the plan cache under that key,
    so a later run finds it without a pass over the rows to name them.
    """
    verdict = _verdict_key(data, domains)
    if verdict is not None and plan_cache.load("verified", verdict) is not None:
        return
    rows = np.concatenate([data.rows_by_domain[d] for d in domains]) if domains else np.zeros(0, np.int64)
    marker = cache_root() / "verified" / f"{_fingerprint(data.table, data.image_column, rows)}.json"
    if marker.exists():
        if remember and verdict is not None:
            plan_cache.save("verified", verdict, {"images": np.array(len(rows))})
        return
    logger.info("checking that the %d images of %s decode (once per dataset)", len(rows), ", ".join(domains))
    bad = undecodable_rows(data.table, data.image_column, rows, limit=1)
    if bad:
        row, problem = bad[0]
        domain = data.domains[data.domain_of_row[row]]
        where = image_source(data.table, data.image_column, row)
        raise ImageDecodeError(
            f"image of domain '{domain}', row {row} ({where}) does not decode ({problem}); "
            f"replace or remove it and run again"
        )
    if not remember:
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"images": int(len(rows)), "domains": list(domains)}) + "\n")
    if verdict is not None:
        plan_cache.save("verified", verdict, {"images": np.array(len(rows))})


def _verdict_key(data: Any, domains: Sequence[str]) -> dict[str, Any] | None:
    """The plan-cache key of "every image of ``domains`` decodes", or None when the dataset's plan key does not
    cover its images' content (images named by path outside an image folder: their files' state must be read)."""
    if getattr(data, "plan_key", None) is None or not getattr(data, "images_in_key", False):
        return None
    return {"tables": data.plan_key, "domains": sorted(domains)}


def row_decode_error(data: Any, row: int, domain: str | None, cause: BaseException) -> ImageDecodeError:
    """The one-line error for a row whose image failed to decode while training or evaluating."""
    raw = _undecoded(data.table, data.image_column)[int(row)][data.image_column]
    problem = _decode_problem(raw) or f"{type(cause).__name__}: {cause}"
    where = f"domain '{domain}', " if domain else ""
    return ImageDecodeError(
        f"image of {where}row {row} ({_describe_source(raw)}) does not decode ({problem}); "
        f"replace or remove it, then run the command again "
        f"(a training run continues from its last checkpoint with --resume)"
    )
