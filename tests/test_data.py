"""The data layer: every source loads to the same normalized form; splits, protocols and batches are stable."""

import numpy as np
import pytest
import torch

from conftest import PREPROCESSING
from dgzoo.data import (
    DomainImages,
    StepBatchSampler,
    collate_domains,
    eval_loader,
    load_dg_dataset,
    make_splits,
    resolve_protocol,
    split_rows,
    train_loader,
)
from dgzoo.data.builtin import rotated_digits_rows
from dgzoo.data.transforms import eval_transform, train_transform
from dgzoo.errors import DGZooError


def make_images(n, size=12, seed=0):
    from PIL import Image

    rng = np.random.RandomState(seed)
    return [Image.fromarray(rng.randint(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n)]


def test_rotated_digits_is_deterministic_and_complete(digits):
    assert digits.domains == ["0", "15", "30", "45", "60", "75"]
    assert digits.class_names == [str(i) for i in range(10)]
    assert sum(len(r) for r in digits.rows_by_domain.values()) == 1797  # every real digit, each used once
    assert {len(r) for r in digits.rows_by_domain.values()} == {299, 300}
    again = rotated_digits_rows()
    assert again["image"][:5] == rotated_digits_rows()["image"][:5]  # byte-identical PNGs
    assert digits.info()["source"] == "builtin"


def test_rotation_domains_hold_the_same_digit_distribution(digits):
    for rows in digits.rows_by_domain.values():
        counts = np.bincount(digits.labels[rows], minlength=10)
        assert counts.min() >= 15  # shuffled before dealing: no domain is missing a class


def test_split_is_seeded_stable_and_independent_of_other_domains():
    rows = np.arange(100, 200)
    a_in, a_out = split_rows(rows, 0.2, 0, "photo")
    b_in, b_out = split_rows(rows, 0.2, 0, "photo")
    assert np.array_equal(a_out, b_out) and len(a_out) == 20 and len(a_in) == 80
    assert set(a_in).isdisjoint(a_out) and set(a_in) | set(a_out) == set(rows)
    assert not np.array_equal(split_rows(rows, 0.2, 1, "photo")[1], a_out)  # new split seed, new split
    assert not np.array_equal(split_rows(rows, 0.2, 0, "sketch")[1], a_out)  # domains split independently


def test_protocols_and_domain_errors(digits):
    p = resolve_protocol(digits, ["75"], None)
    assert p.name == "leave-domains-out" and p.sources == ("0", "15", "30", "45", "60") and p.targets == ("75",)
    p = resolve_protocol(digits, None, ["0"])
    assert p.name == "single-source" and p.targets == ("15", "30", "45", "60", "75")
    with pytest.raises(
        DGZooError, match=r"unknown domain '075'.*did you mean: 75.*valid domains: 0, 15, 30, 45, 60, 75"
    ):
        resolve_protocol(digits, ["075"], None)
    with pytest.raises(DGZooError, match="leaves no source"):
        resolve_protocol(digits, digits.domains, None)
    with pytest.raises(DGZooError, match="leaving none to test"):
        resolve_protocol(digits, None, digits.domains)


def test_registry_aliases_resolve_domainbed_letters():
    from dgzoo.data.registry import get_spec

    pacs = get_spec("PACS")
    assert pacs.canonical_domain("S") == "sketch" and pacs.canonical_domain("Photo") == "photo"
    assert get_spec("flwrlabs/office-home").canonical_domain("R") == "Real World"


def test_image_folders_load_with_sorted_classes(tmp_path):
    images = make_images(6)
    for i, (domain, cls) in enumerate(
        [
            ("cartoon", "dog"),
            ("cartoon", "cat"),
            ("photo", "dog"),
            ("photo", "cat"),
            ("photo", "cat"),
            ("sketch", "dog"),
        ]
    ):
        (tmp_path / domain / cls).mkdir(parents=True, exist_ok=True)
        images[i].save(tmp_path / domain / cls / f"{i}.png")
    (tmp_path / "photo" / "cat" / "notes.txt").write_text("not an image")
    data = load_dg_dataset(str(tmp_path))
    assert data.source == "imagefolder"
    assert data.domains == ["cartoon", "photo", "sketch"] and data.class_names == ["cat", "dog"]
    assert {d: len(r) for d, r in data.rows_by_domain.items()} == {"cartoon": 2, "photo": 3, "sketch": 1}
    row = data.rows_by_domain["sketch"][0]
    assert data.labels[row] == 1 and data.table[int(row)]["image"].size == (12, 12)


def test_local_parquet_with_string_labels_and_custom_columns(tmp_path):
    import datasets

    table = datasets.Dataset.from_dict(
        {"img": make_images(4), "y": ["b", "a", "b", "a"], "env": ["x", "x", "y", "y"]},
        features=datasets.Features(
            {"img": datasets.Image(), "y": datasets.Value("string"), "env": datasets.Value("string")}
        ),
    )
    table.to_parquet(str(tmp_path / "data.parquet"))
    with pytest.raises(DGZooError, match=r"has no image column 'image' \(columns: img, y, env\); pass --image-column"):
        load_dg_dataset(str(tmp_path / "data.parquet"))
    with pytest.raises(
        DGZooError, match=r"has no domain column 'domain' .*; pass --domain-column NAME; for image folde"
    ):
        load_dg_dataset(str(tmp_path / "data.parquet"), image_column="img", label_column="y")
    data = load_dg_dataset(str(tmp_path), image_column="img", label_column="y", domain_column="env")
    assert data.class_names == ["a", "b"] and list(data.labels) == [1, 0, 1, 0]
    assert data.domains == ["x", "y"]


def test_save_to_disk_dataset_with_integer_domains_uses_classlabel_names(tmp_path):
    import datasets

    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=["u", "v"]),
            "domain": datasets.ClassLabel(names=["real", "clipart"]),
        }
    )
    datasets.Dataset.from_dict(
        {"image": make_images(4), "label": [0, 1, 0, 1], "domain": [1, 1, 0, 0]}, features=features
    ).save_to_disk(str(tmp_path / "saved"))
    data = load_dg_dataset(str(tmp_path / "saved"))
    assert data.source == "disk" and sorted(data.domains) == ["clipart", "real"]
    assert {d: len(r) for d, r in data.rows_by_domain.items()} == {"clipart": 2, "real": 2}


def test_unknown_dataset_and_missing_path_errors():
    with pytest.raises(DGZooError, match=r"dataset 'rotated-digit' .*did you mean: rotated-digits"):
        load_dg_dataset("rotated-digit")


def test_tarball_dataset_offline_without_a_cached_conversion_says_so(monkeypatch, tmp_path):
    import huggingface_hub

    monkeypatch.setenv("DGZOO_CACHE", str(tmp_path))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DGZooError, match="VLCS at 673d299 is not in dgzoo's cache yet and HF_HUB_OFFLINE is set"):
        load_dg_dataset("vlcs")


def test_step_batches_are_equal_per_domain_and_a_pure_function_of_the_step():
    sampler = StepBatchSampler([50, 70, 90], batch_size=8, seed=3, steps=10)
    keys = sampler.keys_at(4)
    assert [sum(1 for k in keys if k[0] == d) for d in range(3)] == [8, 8, 8]
    assert keys == StepBatchSampler([50, 70, 90], 8, 3, steps=10, start_step=4).keys_at(4)
    resumed = list(StepBatchSampler([50, 70, 90], 8, 3, steps=10, start_step=6))
    assert resumed == list(sampler)[6:]  # a resumed run sees the uninterrupted run's batches
    assert keys != sampler.keys_at(5)


def test_processes_split_the_same_global_batch():
    whole = StepBatchSampler([40, 60], batch_size=8, seed=0, steps=3).keys_at(2)
    shards = [StepBatchSampler([40, 60], 8, 0, 3, process_index=r, num_processes=2).keys_at(2) for r in range(2)]
    for d in range(2):
        assert [k for k in whole if k[0] == d] == [k for s in shards for k in s if k[0] == d]


def test_seeded_augmentation_is_reproducible_and_leaves_global_rng_alone(digits):
    splits = make_splits(digits, 0.2, 0)
    images = DomainImages(digits, splits.in_rows["0"], train_transform(PREPROCESSING, "domainbed"))
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, _ = images[(0, 42)]
    assert torch.equal(torch.rand(1), before)  # the caller's torch RNG stream is untouched
    b, _ = images[(0, 42)]
    c, _ = images[(0, 43)]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (3, 16, 16)


def test_train_loader_yields_per_domain_batches(digits):
    splits = make_splits(digits, 0.2, 0)
    sets = [DomainImages(digits, splits.in_rows[d], eval_transform(PREPROCESSING)) for d in ("0", "15")]
    batches = list(train_loader(sets, batch_size=4, seed=0, steps=2))
    assert len(batches) == 2 and len(batches[0]) == 2
    x, y = batches[0][1]
    assert x.shape == (4, 3, 16, 16) and y.dtype == torch.long


def test_collate_stacks_views():
    samples = [([torch.zeros(3, 2, 2)] * 3, 1, 0), ([torch.ones(3, 2, 2)] * 3, 0, 0)]
    ((x, y),) = collate_domains(samples)
    assert x.shape == (2, 3, 3, 2, 2) and y.tolist() == [1, 0]


def test_data_loading_workers_do_not_change_the_data(digits):
    splits = make_splits(digits, 0.2, 0)
    sets = [DomainImages(digits, splits.in_rows[d], train_transform(PREPROCESSING, "domainbed")) for d in ("0", "30")]
    inline = list(train_loader(sets, batch_size=4, seed=5, steps=3, num_workers=0))
    workers = list(train_loader(sets, batch_size=4, seed=5, steps=3, num_workers=2))
    for a, b in zip(inline, workers):
        for (xa, ya), (xb, yb) in zip(a, b):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_an_unreachable_hub_is_a_one_line_error_naming_the_offline_fix(monkeypatch):
    import socket

    import huggingface_hub

    with socket.socket() as closed:  # a port nothing listens on: connections are refused at once
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(
        DGZooError,
        match=r"cannot reach the Hub at http://127.0.0.1:\d+ to load flwrlabs/pacs "
        r"\(\w+\); check the connection, or set HF_HUB_OFFLINE=1",
    ):
        load_dg_dataset("pacs")


def test_label_and_domain_columns_are_read_in_one_arrow_call_not_row_by_row(tmp_path, monkeypatch):
    """Start-up must not grow with the dataset once caches are warm: the label and domain codes come from whole
    Arrow columns, so the table is indexed a fixed number of times whatever its length."""
    import datasets

    n = 300
    table = datasets.Dataset.from_dict(
        {
            "image": make_images(1) * n,
            "label": [f"c{i % 7}" for i in range(n)],
            "domain": [["x", "y", "z"][i % 3] for i in range(n)],
        },
        features=datasets.Features(
            {"image": datasets.Image(), "label": datasets.Value("string"), "domain": datasets.Value("string")}
        ),
    )
    table.to_parquet(str(tmp_path / "data.parquet"))
    calls, rows = [], []
    getitem, iterate = datasets.Dataset._getitem, datasets.Dataset.__iter__

    def counted_iter(self):
        for row in iterate(self):
            rows.append(1)
            yield row

    monkeypatch.setattr(
        datasets.Dataset, "_getitem", lambda self, key, **kw: calls.append(key) or getitem(self, key, **kw)
    )
    monkeypatch.setattr(datasets.Dataset, "__iter__", counted_iter)
    data = load_dg_dataset(str(tmp_path))
    assert len(calls) <= 4 and not rows  # one read per column; no row converted to Python on its own
    assert data.class_names == [f"c{i}" for i in range(7)] and list(data.labels[:8]) == [0, 1, 2, 3, 4, 5, 6, 0]
    assert data.domains == ["x", "y", "z"] and [len(r) for r in data.rows_by_domain.values()] == [100, 100, 100]


def test_a_selected_table_keeps_its_row_order_for_codes_and_images(tmp_path):
    """A table with an indices mapping (a selection) gives the codes and the images of its own rows."""
    import datasets

    from dgzoo.data.loading import _normalize

    images = make_images(6)
    table = datasets.Dataset.from_dict(
        {"image": images, "label": [0, 1, 2, 3, 4, 5], "domain": ["a", "a", "a", "b", "b", "b"]},
        features=datasets.Features(
            {"image": datasets.Image(), "label": datasets.Value("int64"), "domain": datasets.Value("string")}
        ),
    ).select([5, 0, 3])
    data = _normalize(table, "t", "parquet", {"image": "image", "label": "label", "domain": "domain"})
    assert data.class_names == ["0", "3", "5"] and list(data.labels) == [2, 0, 1]
    assert list(data.domain_of_row) == [1, 0, 1]
    for row, original in enumerate([5, 0, 3]):
        assert np.array_equal(np.asarray(data.decode_image(row)), np.asarray(images[original]))
        assert np.array_equal(np.asarray(data.decode_image(row)), np.asarray(table[row]["image"]))


def test_default_workers_come_from_the_cpus_this_process_may_use():
    from dgzoo.data.loaders import default_workers

    # Feeding a GPU: the process's share of CPUs but its own, at most 8.
    assert default_workers(True, cpus=16, local_processes=1) == 8
    assert default_workers(True, cpus=16, local_processes=4) == 3
    assert default_workers(True, cpus=2, local_processes=4) == 1
    # On CPU the workers get the cores the compute threads leave idle.
    assert default_workers(False, cpus=2, local_processes=1, compute_threads=2) == 0
    assert default_workers(False, cpus=2, local_processes=1, compute_threads=1) == 1
    assert default_workers(False, cpus=8, local_processes=2, compute_threads=1) == 3


def test_evaluation_loaders_keep_their_workers_between_evaluations(digits):
    """A run iterates each evaluation loader many times; its workers start once, not at every evaluation."""
    splits = make_splits(digits, 0.2, 0)
    images = DomainImages(digits, splits.out_rows["0"][:8], eval_transform(PREPROCESSING))
    loader = eval_loader(images, batch_size=4, num_workers=1)
    first = [y for _, y in loader]
    workers = loader._iterator._workers
    second = [y for _, y in loader]
    assert loader._iterator._workers is workers and all(w.is_alive() for w in workers)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    del loader
