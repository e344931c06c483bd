"""The plan cache (dgzoo.data.plan_cache): a warm start reads a dataset's class and domain tables, splits and image
check back instead of computing them; they equal the computed ones; a damaged entry or a changed dataset is never
used."""

import io

import numpy as np
import pytest
from PIL import Image

from dgzoo.data import check_images, load_dg_dataset, loading, make_splits, plan_cache, splits, verify
from dgzoo.errors import DGZooError


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """dgzoo's cache in a fresh folder (cache_root reads $DGZOO_CACHE at every call)."""
    monkeypatch.setenv("DGZOO_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "plans"


def png(seed):
    pixels = np.random.default_rng(seed).integers(0, 255, (8, 8, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_parquet(folder, labels, domains, seed=0):
    """``folder/train.parquet``: one embedded 8 px PNG per row."""
    import datasets

    folder.mkdir(parents=True, exist_ok=True)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.Value("string"), "domain": datasets.Value("string")}
    )
    images = [{"bytes": png(seed * 1000 + i), "path": None} for i in range(len(labels))]
    table = datasets.Dataset.from_dict({"image": images, "label": labels, "domain": domains}, features=features)
    table.to_parquet(str(folder / "train.parquet"))
    return folder


def rows(n=60, seed=0):
    rng = np.random.default_rng(seed)
    return [f"c{v}" for v in rng.integers(0, 4, n)], [f"d{v}" for v in rng.integers(0, 3, n)]


def forbid_computing(monkeypatch):
    """Make every computation the cache replaces fail, so a test sees whether a load or split used it."""

    def computed(*args, **kwargs):
        raise AssertionError("computed, not read from the plan cache")

    monkeypatch.setattr(loading, "_codes", computed)
    monkeypatch.setattr(splits, "split_rows", computed)
    monkeypatch.setattr(verify, "undecodable_rows", computed)
    monkeypatch.setattr(verify, "_fingerprint", computed)


def same_plan(a, b, sa, sb):
    assert a.domains == b.domains and a.class_names == b.class_names
    assert np.array_equal(a.labels, b.labels) and np.array_equal(a.domain_of_row, b.domain_of_row)
    assert a.labels.dtype == b.labels.dtype == np.int64
    for d in a.domains:
        assert np.array_equal(a.rows_by_domain[d], b.rows_by_domain[d])
        assert np.array_equal(sa.in_rows[d], sb.in_rows[d]) and np.array_equal(sa.out_rows[d], sb.out_rows[d])
    assert np.array_equal(a.class_presence, b.class_presence)


def test_a_warm_load_reads_the_plan_back_equal_to_the_computed_one(tmp_path, cache, monkeypatch):
    folder = write_parquet(tmp_path / "data", *rows())
    uncached = load_dg_dataset(str(folder), remember=False)  # computed, and nothing stored
    uncached_splits = make_splits(uncached, 0.2, 3, remember=False)
    check_images(uncached, uncached.domains, remember=False)
    assert not cache.exists()

    cold = load_dg_dataset(str(folder))  # computed and stored
    cold_splits = make_splits(cold, 0.2, 3)
    check_images(cold, cold.domains)
    assert sorted(p.name.split("-")[0] for p in cache.iterdir()) == ["splits", "tables", "verified"]

    with monkeypatch.context() as m:
        forbid_computing(m)
        warm = load_dg_dataset(str(folder))
        warm_splits = make_splits(warm, 0.2, 3)
        check_images(warm, warm.domains)
    same_plan(uncached, warm, uncached_splits, warm_splits)
    same_plan(cold, warm, cold_splits, warm_splits)
    # the splits are a pure function of (seed, domain, its rows), as without a cache
    for d in warm.domains:
        expected = splits.split_rows(warm.rows_by_domain[d], 0.2, 3, d)
        assert np.array_equal(warm_splits.in_rows[d], expected[0])

    # another seed or fraction is another entry, never the stored one
    other = make_splits(warm, 0.2, 4)
    assert any(not np.array_equal(other.in_rows[d], warm_splits.in_rows[d]) for d in warm.domains)
    assert sum(len(v) for v in make_splits(warm, 0.5, 3).out_rows.values()) > sum(
        len(v) for v in warm_splits.out_rows.values()
    )


def test_damaged_or_mismatched_entries_are_ignored_and_rewritten(tmp_path, cache, monkeypatch):
    folder = write_parquet(tmp_path / "data", *rows())
    reference = load_dg_dataset(str(folder))
    reference_splits = make_splits(reference, 0.2, 0)
    check_images(reference, reference.domains)
    entries = sorted(cache.iterdir())
    good = [p.read_bytes() for p in entries]
    damages = {
        "empty": lambda i: b"",
        "not a zip file": lambda i: b"not a zip file",
        "truncated": lambda i: good[i][: len(good[i]) // 2],
        "another entry's arrays": lambda i: good[(i + 1) % len(good)],
    }
    for name, damage in damages.items():
        for i, p in enumerate(entries):
            p.write_bytes(damage(i))
        again = load_dg_dataset(str(folder))
        again_splits = make_splits(again, 0.2, 0)
        check_images(again, again.domains)
        same_plan(reference, again, reference_splits, again_splits)
        assert [p.read_bytes() for p in entries] == good, name  # rewritten as they were
        with monkeypatch.context() as m:  # so the next start reads them again
            forbid_computing(m)
            warm = load_dg_dataset(str(folder))
            same_plan(reference, warm, reference_splits, make_splits(warm, 0.2, 0))
            check_images(warm, warm.domains)

    # an entry holding another key's arrays (a hash collision, a copied file) is not used for this key
    key = {"tables": "x", "domains": ["d0"], "holdout": "0.2", "seed": 0}
    plan_cache.save("splits", key, {"in_0": np.arange(3)})
    plan_cache._path("splits", {**key, "seed": 1}).write_bytes(plan_cache._path("splits", key).read_bytes())
    assert plan_cache.load("splits", {**key, "seed": 1}) is None
    assert np.array_equal(plan_cache.load("splits", key)["in_0"], np.arange(3))


def test_a_changed_dataset_never_reuses_a_stale_plan(tmp_path, cache):
    folder = tmp_path / "data"
    labels, domains = rows(seed=0)
    write_parquet(folder, labels, domains)
    first = load_dg_dataset(str(folder))
    make_splits(first, 0.2, 0)
    # same row count and file name, other labels and domains
    new_labels, new_domains = rows(seed=1)
    write_parquet(folder, new_labels, new_domains, seed=1)
    second = load_dg_dataset(str(folder))
    assert second.plan_key != first.plan_key
    expected = load_dg_dataset(str(folder), remember=False)
    assert [second.class_names[v] for v in second.labels] == new_labels
    assert [second.domains[v] for v in second.domain_of_row] == new_domains
    assert np.array_equal(second.labels, expected.labels)
    second_splits = make_splits(second, 0.2, 0)
    for d in second.domains:
        assert np.array_equal(second_splits.in_rows[d], splits.split_rows(second.rows_by_domain[d], 0.2, 0, d)[0])


def test_an_image_replaced_in_an_image_folder_is_checked_again(tmp_path, cache):
    root = tmp_path / "folders"
    for domain in ("a", "b"):
        for cls in ("x", "y"):
            (root / domain / cls).mkdir(parents=True)
            for i in range(3):
                (root / domain / cls / f"{i}.png").write_bytes(png(i))
    data = load_dg_dataset(str(root))
    assert data.images_in_key  # the content fingerprint covers the files: the verdict is kept by the plan key
    check_images(data, data.domains)
    (root / "b" / "y" / "1.png").write_bytes(b"\x89PNG broken")
    again = load_dg_dataset(str(root))
    with pytest.raises(DGZooError, match=r"domain 'b'.*1\.png.*does not decode"):
        check_images(again, again.domains)


def test_images_named_by_path_outside_the_dataset_are_not_vouched_for_by_the_plan_key(tmp_path, cache):
    import datasets

    (tmp_path / "elsewhere").mkdir()
    paths = []
    for i in range(8):
        paths.append(str(tmp_path / "elsewhere" / f"{i}.png"))
        (tmp_path / "elsewhere" / f"{i}.png").write_bytes(png(i))
    folder = tmp_path / "data"
    folder.mkdir()
    table = datasets.Dataset.from_dict(
        {"image": paths, "label": [0, 1] * 4, "domain": ["a"] * 4 + ["b"] * 4},
        features=datasets.Features(
            {"image": datasets.Image(), "label": datasets.Value("int64"), "domain": datasets.Value("string")}
        ),
    )
    table.to_parquet(str(folder / "train.parquet"))
    data = load_dg_dataset(str(folder))
    assert data.plan_key is not None and not data.images_in_key
    check_images(data, data.domains)
    (tmp_path / "elsewhere" / "5.png").write_bytes(b"broken")  # the parquet file, hence its fingerprint, unchanged
    again = load_dg_dataset(str(folder))
    with pytest.raises(DGZooError, match="row 5"):
        check_images(again, again.domains)
