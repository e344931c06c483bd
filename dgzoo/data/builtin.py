"""Embedded datasets that need no network.

``rotated-digits`` is DomainBed's RotatedMNIST built from the 1,797 real handwritten digits that ship with
scikit-learn: the digits are shuffled with a fixed seed and dealt disjointly into six domains, and every image
of domain ``a`` is rotated by ``a`` degrees. It is written once as a parquet file with the same
``image / label / domain`` columns as the Hub datasets, and read back through the same loader, so the embedded
default exercises exactly the code path a Hub dataset takes.
"""
from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

import numpy as np

ROTATED_DIGITS_VERSION = "v1"
ANGLES = (0, 15, 30, 45, 60, 75)
CANVAS = 32
DIGIT = 24  # the 8x8 digit is upsampled to 24x24 and centred, so rotations never cut off strokes


def cache_root() -> Path:
    """dgzoo's cache folder: ``$DGZOO_CACHE``, else ``$XDG_CACHE_HOME/dgzoo``, else ``~/.cache/dgzoo``."""
    if os.environ.get("DGZOO_CACHE"):
        return Path(os.environ["DGZOO_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "dgzoo"


def rotated_digits_rows() -> dict[str, list]:
    """Build the rotated-digits rows deterministically: PNG bytes, integer labels, domain names."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.RandomState(0).permutation(len(digits.images))
    rows: dict[str, list] = {"image": [], "label": [], "domain": []}
    for d, angle in enumerate(ANGLES):
        for i in order[d::len(ANGLES)]:
            pixels = np.clip(digits.images[i] / 16.0 * 255.0, 0, 255).astype(np.uint8)
            digit = Image.fromarray(pixels, mode="L").resize((DIGIT, DIGIT), Image.BILINEAR)
            canvas = Image.new("L", (CANVAS, CANVAS), 0)
            canvas.paste(digit, ((CANVAS - DIGIT) // 2, (CANVAS - DIGIT) // 2))
            rotated = canvas.rotate(angle, resample=Image.BILINEAR, fillcolor=0)
            buffer = io.BytesIO()
            rotated.save(buffer, format="PNG")
            rows["image"].append({"bytes": buffer.getvalue(), "path": None})
            rows["label"].append(int(digits.target[i]))
            rows["domain"].append(str(angle))
    return rows


def rotated_digits_path() -> Path:
    """Return the parquet file of rotated-digits, writing it on first use (atomically, so parallel processes agree)."""
    path = cache_root() / f"rotated-digits-{ROTATED_DIGITS_VERSION}" / "data" / "train-00000-of-00001.parquet"
    if path.exists():
        return path
    import datasets

    features = datasets.Features({
        "image": datasets.Image(),
        "label": datasets.ClassLabel(names=[str(i) for i in range(10)]),
        "domain": datasets.Value("string"),
    })
    table = datasets.Dataset.from_dict(rotated_digits_rows(), features=features)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".parquet.tmp")
    os.close(fd)
    try:
        table.to_parquet(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


BUILDERS = {"rotated-digits": rotated_digits_path}
