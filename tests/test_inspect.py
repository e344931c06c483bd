"""`dgzoo datasets inspect`: counts per domain and class, image sizes, and a contact sheet with one row per domain."""

import json

import numpy as np
import pytest
from PIL import Image

from dgzoo.cli import main
from dgzoo.data import load_dg_dataset
from dgzoo.data.inspect import (
    CAPTION,
    LABEL_WIDTH,
    PAD,
    TILE,
    columns_used,
    contact_sheet,
    native_size,
    sample_rows,
    sheet_size,
    summarize,
)
from dgzoo.errors import DGZooError

DOMAINS, CLASSES = ("a", "b", "c"), ("x", "y")


def make_folders(root, side=16, per_class=(3, 1)):
    """root/<domain>/<class>/*.png: ``per_class[k]`` RGB images of class k in every domain, ``side`` pixels square."""
    rng = np.random.default_rng(0)
    for d, domain in enumerate(DOMAINS):
        for c, cls in enumerate(CLASSES):
            (root / domain / cls).mkdir(parents=True)
            for i in range(per_class[c]):
                pixels = rng.integers(0, 60, (side, side, 3)) + 80 * c + 40 * d
                Image.fromarray(pixels.astype(np.uint8)).save(root / domain / cls / f"{i}.png")
    return root


def test_geometry_is_one_row_per_domain():
    # Hand-computed from the layout: a label column, then per_domain tiles of TILE + PAD, rows of TILE + caption.
    assert sheet_size(6, 8) == (LABEL_WIDTH + 8 * (TILE + PAD) + PAD, PAD + 6 * (TILE + CAPTION + PAD))
    assert sheet_size(6, 8) == (686, 510) and sheet_size(3, 4) == (406, 258)


def test_rotated_digits_summary_counts_every_image():
    data = load_dg_dataset("rotated-digits")
    summary = summarize(data, columns_used(data.spec), sample_per_domain=20)
    # 1,797 digits dealt round-robin into six domains: 300, 300, 300, 299, 299, 299.
    assert [sum(summary.counts[d]) for d in summary.domains] == [300, 300, 300, 299, 299, 299]
    assert summary.total == 1797 and len(summary.class_names) == 10
    assert summary.sizes["0"] == {"32x32": 20} and summary.modes["75"] == {"L": 20}
    counts = summary.counts["0"]
    assert summary.majority("0") == max(counts) / 300 and summary.balance("0") == min(counts) / max(counts)
    assert native_size(data) == (32, "32x32, 8 sampled per domain")


def test_contact_sheet_rows_show_the_same_classes_in_the_same_columns(tmp_path):
    data = load_dg_dataset("rotated-digits")
    picked = sample_rows(data, 8)
    labels = {d: [int(data.labels[r]) for r in rows] for d, rows in picked.items()}
    assert all(v == labels["0"] for v in labels.values())  # column j is one class in every domain
    assert labels["0"] == [0, 1, 3, 4, 5, 6, 8, 9]  # 8 of 10 classes evenly spaced: round(linspace(0, 9, 8))
    path = contact_sheet(data, tmp_path / "sheet.png")
    with Image.open(path) as sheet:
        assert sheet.format == "PNG" and sheet.size == (686, 510)
        pixels = np.asarray(sheet.convert("L"))
    for r in range(6):  # every row's first tile holds a digit: a black canvas with bright strokes
        top = PAD + r * (TILE + CAPTION + PAD)
        tile = pixels[top : top + TILE, LABEL_WIDTH : LABEL_WIDTH + TILE]
        assert tile.min() == 0 and tile.max() > 200


def test_cli_inspects_an_image_folder_dataset(tmp_path, capsys, monkeypatch):
    root = make_folders(tmp_path / "my_set", side=20)
    monkeypatch.chdir(tmp_path)
    assert main(["datasets", "inspect", str(root), "--per-domain", "4"]) == 0
    out = capsys.readouterr().out
    assert "3 domains, 2 classes" in out and "12 images" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1] in (["a"], ["b"], ["c"])}
    assert rows["b"][:4] == ["b", "4", "3", "1"]  # images, then per class x and y
    assert rows["b"][4:8] == ["0.75", "0.33", "20x20", "RGB"]  # majority 3/4, balance 1/3
    with Image.open(tmp_path / "my_set_samples.png") as sheet:  # the default: ./<name>_samples.png
        assert sheet.size == sheet_size(3, 4) == (406, 258)


def test_cli_json_and_chosen_samples_path(tmp_path, capsys):
    path = tmp_path / "out" / "colored.png"
    assert main(["datasets", "inspect", "colored-digits", "--samples", str(path), "--json", "--sample-sizes", "5"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["domains"] == ["+90%", "+80%", "-90%"] and summary["images"] == 1797
    assert {d: sum(c.values()) for d, c in summary["counts"].items()} == {"+90%": 599, "+80%": 599, "-90%": 599}
    assert summary["modes"]["+90%"] == {"RGB": 5} and summary["columns"]["label"] == "label"
    with Image.open(path) as sheet:
        assert sheet.size == sheet_size(3, 8)


def test_bad_samples_path_fails_before_loading(tmp_path):
    with pytest.raises(DGZooError, match="must end in .png"):
        from dgzoo.cli.app import build_parser

        args = build_parser("datasets").parse_args(
            ["datasets", "inspect", "rotated-digits", "--samples", str(tmp_path / "x.jpg")]
        )
        args.handler(args)
    assert not (tmp_path / "x.jpg").exists()
