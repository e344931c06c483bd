"""What a DG dataset holds, before anything trains on it: counts, image sizes, label balance, and a contact sheet.

A DG user's first questions are about the data: which domains, how many images per domain and class, what the
images look like in each domain. :func:`summarize` answers the first ones from the label and domain columns
(no image is decoded) plus the headers of a sample of images (size and mode are read from the file header, the
pixels are not decoded); :func:`contact_sheet` answers the last one with one labelled row of samples per domain,
the columns showing the same classes in every row, so the domain shift is something to look at side by side.
``dgzoo datasets inspect`` prints the first and writes the second; every run writes the sheet into its run
directory for the model card (``samples_per_domain.png``).
"""

from __future__ import annotations

import io
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .loading import DGDataset
from .registry import DatasetSpec
from .transforms import to_rgb
from .verify import ImageDecodeError

# Contact-sheet geometry, in pixels: every tile is TILE x TILE, captioned below, rows labelled on the left.
TILE = 64
CAPTION = 14
PAD = 6
LABEL_WIDTH = 120


def columns_used(
    spec: DatasetSpec | None, image: str | None = None, label: str | None = None, domain: str | None = None
) -> dict[str, str]:
    """The image / label / domain column names a load reads: the given ones, else the registry's, else the
    standard names (the rule of :func:`dgzoo.data.load_dg_dataset`)."""
    return {
        "image": image or (spec.image_column if spec else "image"),
        "label": label or (spec.label_column if spec else "label"),
        "domain": domain or (spec.domain_column if spec else "domain"),
    }


def spread(rows: np.ndarray, count: int) -> np.ndarray:
    """``count`` rows evenly spaced over ``rows`` (all of them when there are fewer): a deterministic sample
    that covers the whole domain, not only its first files."""
    if len(rows) <= count:
        return np.asarray(rows)
    return np.asarray(rows)[np.linspace(0, len(rows) - 1, count).round().astype(int)]


def image_headers(data: DGDataset, rows: np.ndarray) -> list[tuple[int, int, str]]:
    """``(width, height, mode)`` of the images at ``rows``, read from their file headers (pixels not decoded)."""
    from PIL import Image

    if len(rows) == 0:
        return []
    column = data.image_column
    # The arrow view of the rows holds the encoded image ({bytes, path}) as stored: nothing is decoded.
    raw = data.table.select_columns([column]).with_format("arrow")[[int(r) for r in rows]][column].to_pylist()
    out = []
    for row, item in zip(rows, raw):
        try:
            source = io.BytesIO(item["bytes"]) if item.get("bytes") else item["path"]
            with Image.open(source) as image:
                out.append((image.width, image.height, image.mode))
        except Exception as e:  # PIL's many error types (and a missing file): one line naming the image
            domain = data.domains[data.domain_of_row[int(row)]]
            where = f"file {item.get('path')}" if item.get("path") else "embedded bytes"
            raise ImageDecodeError(
                f"image of domain '{domain}', row {int(row)} ({where}) cannot be read "
                f"({type(e).__name__}: {' '.join(str(e).split())[:120]}); replace or remove it "
                f"and run again"
            ) from None
    return out


@dataclass
class DatasetSummary:
    """Counts per domain and class, sampled image sizes and modes, and where the data came from."""

    name: str
    title: str
    source: str
    repo_id: str | None
    revision: str | None
    path: str | None
    columns: dict[str, str]
    domains: list[str]
    class_names: list[str]
    counts: dict[str, list[int]]  # images per class, per domain (every row, nothing decoded)
    sizes: dict[str, dict[str, int]] = field(default_factory=dict)  # "WxH" -> sampled images, per domain
    modes: dict[str, dict[str, int]] = field(default_factory=dict)  # PIL mode -> sampled images, per domain

    @property
    def total(self) -> int:
        return sum(sum(c) for c in self.counts.values())

    def majority(self, domain: str) -> float:
        """The most frequent class's share of ``domain``: the accuracy of always predicting it (the baseline a
        model must beat there, 1/C when balanced)."""
        counts = self.counts[domain]
        return max(counts) / max(1, sum(counts))

    def balance(self, domain: str) -> float:
        """Smallest over largest class count in ``domain`` (1.0: balanced; 0.0: a class is missing)."""
        counts = self.counts[domain]
        return min(counts) / max(1, max(counts))

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "source": self.source,
            "repo_id": self.repo_id,
            "revision": self.revision,
            "path": self.path,
            "columns": self.columns,
            "domains": self.domains,
            "class_names": self.class_names,
            "images": self.total,
            "counts": {d: dict(zip(self.class_names, c)) for d, c in self.counts.items()},
            "majority": {d: self.majority(d) for d in self.domains},
            "balance": {d: self.balance(d) for d in self.domains},
            "sizes": self.sizes,
            "modes": self.modes,
        }


def summarize(data: DGDataset, columns: dict[str, str], sample_per_domain: int = 200) -> DatasetSummary:
    """Count every domain's images per class and read the headers of up to ``sample_per_domain`` images per
    domain (evenly spaced) for their sizes and modes."""
    counts = {
        d: np.bincount(data.labels[rows], minlength=data.num_classes).tolist()
        for d, rows in data.rows_by_domain.items()
    }
    sizes, modes = {}, {}
    for domain, rows in data.rows_by_domain.items():
        headers = image_headers(data, spread(rows, sample_per_domain))
        sizes[domain] = dict(Counter(f"{w}x{h}" for w, h, _ in headers).most_common())
        modes[domain] = dict(Counter(m for _, _, m in headers).most_common())
    info = data.info()
    return DatasetSummary(
        name=info["name"],
        title=info["title"],
        source=data.source,
        repo_id=data.repo_id,
        revision=data.revision,
        path=data.path,
        columns=columns,
        domains=list(data.domains),
        class_names=list(data.class_names),
        counts=counts,
        sizes=sizes,
        modes=modes,
    )


def _describe(counter: dict[str, int], limit: int = 3) -> str:
    items = list(counter.items())
    text = ", ".join(k if len(items) == 1 else f"{k} ({n})" for k, n in items[:limit])
    return text + (f", +{len(items) - limit} more" if len(items) > limit else "")


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
        for row in rows
    ]


def format_summary(summary: DatasetSummary) -> str:
    """The summary as ``dgzoo datasets inspect`` prints it: provenance, then one table row per domain (classes
    as columns; for more than 12 classes the per-class counts become a second table, one row per class)."""
    where = {
        "builtin": "embedded (built from scikit-learn's digits; no revision)",
        "hub": f"Hub dataset {summary.repo_id} at revision {summary.revision or 'main (unresolved: offline)'}",
    }
    origin = where.get(summary.source, f"{summary.source} at {summary.path}")
    columns = ", ".join(f"{role}={name}" for role, name in summary.columns.items())
    lines = [
        f"{summary.title} ({summary.name}): {summary.total} images, {len(summary.domains)} domains, "
        f"{len(summary.class_names)} classes",
        f"source: {origin}",
        f"columns: {columns}",
        "",
    ]
    wide = len(summary.class_names) > 12
    head = ["domain", "images"] + ([] if wide else summary.class_names) + ["majority", "balance", "sizes", "modes"]
    rows = [head]
    for d in summary.domains:
        counts = summary.counts[d]
        rows.append(
            [d, str(sum(counts))]
            + ([] if wide else [str(c) for c in counts])
            + [
                f"{summary.majority(d):.2f}",
                f"{summary.balance(d):.2f}",
                _describe(summary.sizes[d]),
                _describe(summary.modes[d]),
            ]
        )
    totals = [sum(summary.counts[d][i] for d in summary.domains) for i in range(len(summary.class_names))]
    rows.append(["total", str(summary.total)] + ([] if wide else [str(t) for t in totals]) + ["", "", "", ""])
    lines += _table(rows)
    if wide:
        lines += ["", "images per class and domain:"]
        lines += _table(
            [["class", *summary.domains]]
            + [[c, *[str(summary.counts[d][i]) for d in summary.domains]] for i, c in enumerate(summary.class_names)]
        )
    sampled = {sum(v.values()) for v in summary.sizes.values()}
    lines += [
        "",
        f"majority: the largest class's share (chance accuracy of always predicting it); balance: smallest "
        f"/ largest class; sizes and modes from the headers of up to {max(sampled, default=0)} images "
        f"per domain",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------- contact sheet


def sheet_size(domains: int, per_domain: int) -> tuple[int, int]:
    """Pixel ``(width, height)`` of a contact sheet with ``domains`` rows of ``per_domain`` samples."""
    return (LABEL_WIDTH + per_domain * (TILE + PAD) + PAD, PAD + domains * (TILE + CAPTION + PAD))


def sample_rows(
    data: DGDataset, per_domain: int, seed: int = 0, domains: list[str] | None = None
) -> dict[str, list[int]]:
    """For every domain (or those in ``domains``), ``per_domain`` rows whose classes line up by column across domains.

    Column ``j`` shows the same class in every row (classes evenly spaced over the class list, repeating when
    there are fewer classes than columns); a domain without that class shows another of its images there.
    """
    classes = spread(np.arange(data.num_classes), per_domain)
    columns = [int(classes[j % len(classes)]) for j in range(per_domain)]
    picked: dict[str, list[int]] = {}
    for d, (domain, rows) in enumerate(data.rows_by_domain.items()):
        if domains is not None and domain not in domains:
            continue
        rng = np.random.default_rng([seed, d])
        used: set[int] = set()
        chosen = []
        for c in columns:
            pool = [int(r) for r in rows[data.labels[rows] == c] if int(r) not in used]
            pool = pool or [int(r) for r in rows if int(r) not in used] or [int(r) for r in rows]
            row = pool[int(rng.integers(len(pool)))]
            used.add(row)
            chosen.append(row)
        picked[domain] = chosen
    return picked


def _fit_text(draw: Any, text: str, font: Any, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def contact_sheet(
    data: DGDataset,
    path: str | Path,
    per_domain: int = 8,
    seed: int = 0,
    roles: dict[str, str] | None = None,
    domains: list[str] | None = None,
) -> Path:
    """Write a PNG with one labelled row of ``per_domain`` samples per domain (every domain, or those in
    ``domains``, in the dataset's order) to ``path``; return the path.

    Tiles are ``TILE`` pixels square (the image fitted inside, aspect kept; small images are enlarged with
    nearest-neighbour so their pixels stay visible), captioned with the class name. ``roles`` (domain -> e.g.
    ``held-out``) are printed under the domain name. Written atomically (temporary file, then rename).
    """
    import os
    import tempfile

    from PIL import Image, ImageDraw, ImageFont

    rows = sample_rows(data, per_domain, seed, domains)
    sheet = Image.new("RGB", sheet_size(len(rows), per_domain), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=11)
    for r, (domain, picked) in enumerate(rows.items()):
        top = PAD + r * (TILE + CAPTION + PAD)
        label = [domain, f"{len(data.rows_by_domain[domain])} images"]
        if roles and roles.get(domain):
            label.append(roles[domain])
        for i, line in enumerate(label):
            draw.text(
                (PAD, top + 4 + 14 * i), _fit_text(draw, line, font, LABEL_WIDTH - 2 * PAD), fill="black", font=font
            )
        for j, row in enumerate(picked):
            try:
                image = to_rgb(data.table[row][data.image_column])
            except Exception:  # an unreadable sample: a blank tile (decoding is checked, and named, elsewhere)
                image = Image.new("RGB", (TILE, TILE), "#dddddd")
            scale = TILE / max(image.width, image.height)
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            image = image.resize(size, Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.BICUBIC)
            left = LABEL_WIDTH + j * (TILE + PAD)
            sheet.paste(image, (left + (TILE - size[0]) // 2, top + (TILE - size[1]) // 2))
            caption = _fit_text(draw, data.class_names[int(data.labels[row])], font, TILE)
            draw.text((left, top + TILE + 1), caption, fill="#444444", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        sheet.save(tmp, format="PNG")
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 -> what a plain open would give
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


# ---------------------------------------------------------------------- native size


OUTLIER_FACTOR = 4  # a sampled image whose largest side is this many times the typical one does not set the size


def native_size(data: DGDataset, per_domain: int = 8) -> tuple[int, str] | None:
    """The images' own resolution: the typical (median) largest side over up to ``per_domain`` images of every
    domain, with a description (``"32x32, 8 sampled per domain"``); None when the images cannot be read.

    The median, not the maximum: one odd image (a 10000x10 strip) must not rescale a whole run; see
    :func:`size_outliers`.
    """
    headers = _sampled_headers(data, per_domain)
    if not headers:
        return None
    sizes = Counter(f"{w}x{h}" for w, h, _ in headers)
    side = _typical_side(headers)
    largest = max(max(w, h) for w, h, _ in headers)
    shown = ", ".join(sizes) if len(sizes) <= 3 else f"{len(sizes)} sizes up to {largest} px"
    return side, f"{shown}, {per_domain} sampled per domain"


def size_outliers(data: DGDataset, per_domain: int = 8) -> list[tuple[int, int]]:
    """Sizes ``(width, height)`` of sampled images whose largest side is :data:`OUTLIER_FACTOR` times the typical
    one or more (or that much smaller): they are resized like every other image, but say something is off."""
    headers = _sampled_headers(data, per_domain)
    if not headers:
        return []
    side = _typical_side(headers)
    return [(w, h) for w, h, _ in headers if max(w, h) >= OUTLIER_FACTOR * side or OUTLIER_FACTOR * max(w, h) <= side]


def _typical_side(headers: list[tuple[int, int, Any]]) -> int:
    sides = sorted(max(w, h) for w, h, _ in headers)
    return int(sides[(len(sides) - 1) // 2])  # the lower median: an actual image's side


def _sampled_headers(data: DGDataset, per_domain: int) -> list[tuple[int, int, Any]]:
    headers: list[tuple[int, int, Any]] = []
    try:
        for rows in data.rows_by_domain.values():
            headers += image_headers(data, spread(rows, per_domain))
    except (OSError, ValueError, KeyError, TypeError, ImageDecodeError):  # the caller falls back to the backbone
        return []
    return headers
