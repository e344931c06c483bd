"""Embedded datasets that need no network.

``rotated-digits`` is DomainBed's RotatedMNIST built from the 1,797 real handwritten digits that ship with
scikit-learn: the digits are shuffled with a fixed seed and dealt disjointly into six domains, and every image
of domain ``a`` is rotated by ``a`` degrees. It is written once as a parquet file with the same
``image / label / domain`` columns as the Hub datasets, and read back through the same loader, so the embedded
default exercises exactly the code path a Hub dataset takes.

``colored-digits`` is DomainBed's ColoredMNIST built from the same digits: they are shuffled with the same seed
and dealt disjointly into three domains; the label is binary (digit < 5 is class 1, as in DomainBed), flipped
with probability 0.25; the colour copies the noisy label and is flipped with probability ``e`` = 0.1, 0.2, 0.9
(domains ``+90%``, ``+80%``, ``-90%``, DomainBed's environment names: how often colour agrees with the label).
DomainBed's two colour channels are the red (colour 0) and green (colour 1) channels of an RGB PNG, the other of
the two zeroed and blue always zero, since every dgzoo backbone reads RGB. A ``digit`` column keeps the original
digit so the label noise can be checked.
"""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

ROTATED_DIGITS_VERSION = "v1"
ANGLES = (0, 15, 30, 45, 60, 75)
CANVAS = 32
DIGIT = 24  # the 8x8 digit is upsampled to 24x24 and centred, so rotations never cut off strokes


COLORED_DIGITS_VERSION = "v1"
COLORED_ENVIRONMENTS = (("+90%", 0.1), ("+80%", 0.2), ("-90%", 0.9))  # (domain, colour-flip probability e)
COLORED_LABEL_NOISE = 0.25
COLORED_CANVAS = 28  # MNIST's size: the 8x8 digit is upsampled to 20x20 and centred, as MNIST centres its digits
COLORED_DIGIT = 20


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
        for i in order[d :: len(ANGLES)]:
            pixels = np.clip(digits.images[i] / 16.0 * 255.0, 0, 255).astype(np.uint8)
            digit = Image.fromarray(pixels, mode="L").resize((DIGIT, DIGIT), Image.Resampling.BILINEAR)
            canvas = Image.new("L", (CANVAS, CANVAS), 0)
            canvas.paste(digit, ((CANVAS - DIGIT) // 2, (CANVAS - DIGIT) // 2))
            rotated = canvas.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=0)
            buffer = io.BytesIO()
            rotated.save(buffer, format="PNG")
            rows["image"].append({"bytes": buffer.getvalue(), "path": None})
            rows["label"].append(int(digits.target[i]))
            rows["domain"].append(str(angle))
    return rows


def rotated_digits_path() -> Path:
    """Return the parquet file of rotated-digits, writing it on first use (atomically, so parallel processes agree)."""
    import datasets

    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=[str(i) for i in range(10)]),
            "domain": datasets.Value("string"),
        }
    )
    return _write_builtin(f"rotated-digits-{ROTATED_DIGITS_VERSION}", rotated_digits_rows, features)


def colored_digits_rows() -> dict[str, list]:
    """Build the colored-digits rows deterministically: RGB PNG bytes, binary labels, domains, original digits."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.RandomState(0).permutation(len(digits.images))
    rng = np.random.RandomState(1)  # label and colour flips, drawn domain after domain
    rows: dict[str, list] = {"image": [], "label": [], "domain": [], "digit": []}
    offset = (COLORED_CANVAS - COLORED_DIGIT) // 2
    for d, (domain, e) in enumerate(COLORED_ENVIRONMENTS):
        picked = order[d :: len(COLORED_ENVIRONMENTS)]
        labels = (digits.target[picked] < 5).astype(np.int64)
        labels ^= (rng.random_sample(len(picked)) < COLORED_LABEL_NOISE).astype(np.int64)
        colors = labels ^ (rng.random_sample(len(picked)) < e).astype(np.int64)
        for i, label, color in zip(picked, labels, colors):
            pixels = np.clip(digits.images[i] / 16.0 * 255.0, 0, 255).astype(np.uint8)
            digit = np.asarray(
                Image.fromarray(pixels, mode="L").resize((COLORED_DIGIT, COLORED_DIGIT), Image.Resampling.BILINEAR)
            )
            rgb = np.zeros((COLORED_CANVAS, COLORED_CANVAS, 3), dtype=np.uint8)
            rgb[offset : offset + COLORED_DIGIT, offset : offset + COLORED_DIGIT, int(color)] = digit
            buffer = io.BytesIO()
            Image.fromarray(rgb, mode="RGB").save(buffer, format="PNG")
            rows["image"].append({"bytes": buffer.getvalue(), "path": None})
            rows["label"].append(int(label))
            rows["domain"].append(domain)
            rows["digit"].append(int(digits.target[i]))
    return rows


def colored_digits_path() -> Path:
    """Return the parquet file of colored-digits, writing it on first use (atomically)."""
    import datasets

    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=["5-9", "0-4"]),  # DomainBed's y = (digit < 5), before the noise
            "domain": datasets.Value("string"),
            "digit": datasets.Value("int64"),
        }
    )
    return _write_builtin(f"colored-digits-{COLORED_DIGITS_VERSION}", colored_digits_rows, features)


def _write_builtin(folder: str, rows: Any, features: Any) -> Path:
    """Write ``rows()`` once as ``<cache>/<folder>/data/train-00000-of-00001.parquet`` (atomically)."""
    path = cache_root() / folder / "data" / "train-00000-of-00001.parquet"
    if path.exists():
        return path
    import datasets

    table = datasets.Dataset.from_dict(rows(), features=features)
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


BUILDERS = {"rotated-digits": rotated_digits_path, "colored-digits": colored_digits_path}
