"""Image folders laid out ``root/<domain>/<class>/<image>`` (DomainBed's layout): recognise and index them.

Shared by the loader (``--dataset PATH``), the converter (``dgzoo datasets convert``) and the tarball datasets
(:mod:`dgzoo.data.tarball`), so all three read a folder the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import DGZooError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def is_image_folder(root: Path) -> bool:
    """Whether ``root`` holds at least one ``<domain>/<class>/<image>``."""
    for domain in (p for p in root.iterdir() if p.is_dir()):
        for cls in (p for p in domain.iterdir() if p.is_dir()):
            if any(f.suffix.lower() in IMAGE_EXTENSIONS for f in cls.iterdir()):
                return True
    return False


def image_folder_table(root: str | Path) -> Any:
    """Index image folders ``root/<domain>/<class>/*`` as a table (paths, decoded lazily), classes sorted by name."""
    import datasets

    root = Path(root)
    entries: list[tuple[str, str, str]] = []
    for domain in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for cls in sorted(p for p in domain.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for f in sorted(cls.iterdir()):
                if f.suffix.lower() in IMAGE_EXTENSIONS:
                    entries.append((str(f), cls.name, domain.name))
    if not entries:
        raise DGZooError(f"no images found under {root}; expected root/<domain>/<class>/<image>.jpg")
    classes = sorted({c for _, c, _ in entries})
    index = {c: i for i, c in enumerate(classes)}  # a list lookup per image is quadratic on DomainNet-size folders
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=classes), "domain": datasets.Value("string")}
    )
    return datasets.Dataset.from_dict(
        {"image": [e[0] for e in entries], "label": [index[e[1]] for e in entries], "domain": [e[2] for e in entries]},
        features=features,
    )
