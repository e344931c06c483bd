"""colored-digits is DomainBed's ColoredMNIST on the embedded digits: the rates its construction promises hold."""

import numpy as np
import pytest

from dgzoo.data import load_dg_dataset
from dgzoo.data.builtin import COLORED_ENVIRONMENTS, COLORED_LABEL_NOISE, colored_digits_rows
from dgzoo.data.registry import get_spec

SIGMAS = 4.0  # binomial tolerance: a correct construction fails this with probability ~6e-5 per check


def within(rate: float, p: float, n: int) -> bool:
    return abs(rate - p) <= SIGMAS * np.sqrt(p * (1 - p) / n)


@pytest.fixture(scope="module")
def colored():
    data = load_dg_dataset("colored-digits")
    columns = data.table.select_columns(["image", "digit"])[:]  # one batched decode, not 1,797 row reads
    images = np.stack([np.asarray(image) for image in columns["image"]])
    digits = np.asarray(columns["digit"])
    return data, images, digits


def test_domains_classes_and_spec(colored):
    data, _, digits = colored
    assert data.domains == ["+90%", "+80%", "-90%"] and data.class_names == ["5-9", "0-4"]
    assert {len(r) for r in data.rows_by_domain.values()} == {599}  # 1,797 digits dealt three ways
    assert np.array_equal(np.bincount(digits, minlength=10), np.bincount(_sklearn_targets(), minlength=10))
    spec = get_spec("colored-digits")
    assert spec.small_images and spec.augment == "none" and spec.kind == "builtin"
    assert spec.num_classes == 2 and spec.default_targets == ("-90%",)
    assert data.canonical_domain("-90") == "-90%" and data.canonical_domain("+90") == "+90%"


def test_images_have_two_colour_channels_one_zeroed(colored):
    _, images, _ = colored
    assert images.shape == (1797, 28, 28, 3) and images.dtype == np.uint8
    assert not images[..., 2].any()  # blue is never used: DomainBed's two channels are red and green
    red, green = images[..., 0].reshape(len(images), -1).any(1), images[..., 1].reshape(len(images), -1).any(1)
    assert np.all(red ^ green)  # exactly one of the two channels carries the digit, the other is all zero
    assert images.max(axis=(1, 2, 3)).min() > 100  # every image holds a visible digit


def test_label_noise_is_25_percent_against_the_digit(colored):
    data, _, digits = colored
    clean = (digits < 5).astype(np.int64)  # DomainBed: y = digit < 5 (class "0-4" is 1)
    flipped = data.labels != clean
    assert within(flipped.mean(), COLORED_LABEL_NOISE, len(flipped)), flipped.mean()
    for domain, rows in data.rows_by_domain.items():
        assert within(flipped[rows].mean(), COLORED_LABEL_NOISE, len(rows)), (domain, flipped[rows].mean())


@pytest.mark.parametrize("domain,e", COLORED_ENVIRONMENTS)
def test_colour_agrees_with_label_at_one_minus_e(colored, domain, e):
    data, images, digits = colored
    rows = data.rows_by_domain[domain]
    colour = images[rows][..., 1].reshape(len(rows), -1).any(1).astype(np.int64)  # 0 red, 1 green
    agree_noisy = float((colour == data.labels[rows]).mean())
    assert within(agree_noisy, 1 - e, len(rows)), (domain, agree_noisy)
    # against the clean digit label, the 25% noise mixes in: 0.75 (1 - e) + 0.25 e
    agree_clean = float((colour == (digits[rows] < 5)).mean())
    expected = (1 - COLORED_LABEL_NOISE) * (1 - e) + COLORED_LABEL_NOISE * e
    assert within(agree_clean, expected, len(rows)), (domain, agree_clean)


def test_build_is_deterministic():
    a, b = colored_digits_rows(), colored_digits_rows()
    assert a["label"] == b["label"] and a["domain"] == b["domain"] and a["digit"] == b["digit"]
    assert a["image"] == b["image"]  # byte-identical PNGs


def test_datasets_list_shows_it(capsys):
    from dgzoo.cli import main

    assert main(["datasets", "list"]) == 0
    line = next(row for row in capsys.readouterr().out.splitlines() if row.startswith("colored-digits"))
    assert "builtin" in line and "embedded" in line and line.endswith("+90%, +80%, -90%")


def _sklearn_targets() -> np.ndarray:
    from sklearn.datasets import load_digits

    return load_digits().target
