"""Registry datasets pinned to commits, with their column mapping per commit; VLCS/TerraIncognita from
DomainBed-layout tarballs on the Hub (downloaded once at the pinned commit, converted once to parquet, reused).

The Hub side runs against a private local Hub server, in subprocesses (the Hub clients read HF_ENDPOINT at import).
"""

import io
import json
import re
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT
from hub_server import HubServer

VLCS_DOMAINS = ("Caltech101", "LabelMe", "SUN09", "VOC2007")
VLCS_CLASSES = ("bird", "car", "chair", "dog", "person")


def make_vlcs_tarball(path, per_class=2):
    """VLCS/<domain>/<class>/<i>.jpg, DomainBed's layout inside a wrapping folder, as in all/VLCS.tar.gz."""
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w:gz") as archive:
        for d, domain in enumerate(VLCS_DOMAINS):
            for cls in VLCS_CLASSES:
                for i in range(per_class + d):  # domains of different sizes: counts are checked per domain
                    buffer = io.BytesIO()
                    Image.fromarray(rng.integers(0, 255, (6, 6, 3)).astype(np.uint8)).save(buffer, format="JPEG")
                    info = tarfile.TarInfo(f"VLCS/{domain}/{cls}/{i}.jpg")
                    info.size = len(buffer.getvalue())
                    archive.addfile(info, io.BytesIO(buffer.getvalue()))
    return {domain: len(VLCS_CLASSES) * (per_class + d) for d, domain in enumerate(VLCS_DOMAINS)}


SETUP = r"""
import json, sys
from huggingface_hub import HfApi
api = HfApi()
repo = "PTeterwak/DomainBed_EasyHard"
api.create_repo(repo, repo_type="dataset")
info = api.upload_file(path_or_fileobj=sys.argv[1], path_in_repo="all/VLCS.tar.gz", repo_id=repo, repo_type="dataset")
api.upload_file(path_or_fileobj=b"later", path_in_repo="NOTES.md", repo_id=repo, repo_type="dataset")
print(json.dumps({"sha": info.oid}))
"""

LOAD = r"""
import dataclasses, json, logging, sys
from dgzoo.data import REGISTRY, load_dg_dataset, register_dataset
from dgzoo.errors import DGZooError
pin = sys.argv[1]
register_dataset(dataclasses.replace(REGISTRY["vlcs"], revision=pin), replace=True)
out = {}
data = load_dg_dataset("vlcs")
out["first"] = {"domains": data.domains, "classes": data.class_names, "revision": data.revision,
                "sizes": {d: len(r) for d, r in data.rows_by_domain.items()}, "size": list(data.table[0]["image"].size),
                "repo": data.repo_id}
if sys.argv[2] == "errors":
    for name, revision in (("gone", "0" * 40), ("short_gone", "abcdef0")):
        register_dataset(dataclasses.replace(REGISTRY["vlcs"], revision=revision), replace=True)
        try:
            load_dg_dataset("vlcs")
        except DGZooError as e:
            out[name] = str(e)
if sys.argv[2] == "push":  # publish the cached conversion, then train-load the parquet copy by repo id
    import contextlib, io
    from dgzoo.cli import main
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        out["push"] = main(["datasets", "push", "vlcs", "testuser/vlcs-parquet"])
    out["push_stdout"] = printed.getvalue()
    copy = load_dg_dataset("testuser/vlcs-parquet")
    out["copy"] = {"domains": copy.domains, "classes": copy.class_names,
                   "sizes": {d: len(r) for d, r in copy.rows_by_domain.items()}}
print(json.dumps(out))
"""


def run(server, hf_home, code, *args, **env):
    proc = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env=server.env(hf_home, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **env),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc


@pytest.mark.slow
def test_tarball_dataset_is_downloaded_at_its_pin_converted_once_and_reused(tmp_path):
    counts = make_vlcs_tarball(tmp_path / "VLCS.tar.gz")
    cache = {"DGZOO_CACHE": str(tmp_path / "dgzoo-cache")}
    with HubServer(tmp_path / "storage") as server:
        sha = run(server, tmp_path / "hf0", SETUP, tmp_path / "VLCS.tar.gz")[0]["sha"]
        start = len(server.requests)
        # The registry pins a short commit id (as the Hub's pages show it); it is expanded via the commit list.
        first, proc = run(server, tmp_path / "hf1", LOAD, sha[:7], "errors", **cache)
        during = [path for _, path, _ in server.requests[start:]]
        assert first["first"]["revision"] == sha and first["first"]["repo"] == "PTeterwak/DomainBed_EasyHard"
        assert [p for p in during if "/resolve/" in p] == [
            f"/datasets/PTeterwak/DomainBed_EasyHard/resolve/{sha}/all/VLCS.tar.gz"
        ] * 2  # HEAD + GET, at the full sha
        assert "packing images" in proc.stderr  # the progress bar of the one-time conversion
        # A pin the Hub does not serve: one line naming the pin and --revision.
        for name, pin in (("gone", "0" * 40), ("short_gone", "abcdef0")):
            message = first[name]
            assert f"pinned commit {pin}" in message and "--revision" in message and "\n" not in message
        # Second load, fresh process and fresh HF cache: the parquet in dgzoo's cache, no request for the source
        # repo at all; then `dgzoo datasets push` publishes that parquet and it loads back by repo id.
        before = len(server.requests)
        second, _ = run(server, tmp_path / "hf2", LOAD, sha[:7], "push", **cache)
        assert [p for _, p, _ in server.requests[before:] if "DomainBed_EasyHard" in p] == []
        assert server.errors == []
    assert second["first"] == first["first"]
    assert second["push"] == 0 and second["copy"] == {
        "domains": list(VLCS_DOMAINS),
        "classes": list(VLCS_CLASSES),
        "sizes": counts,
    }
    assert re.search(r"from PTeterwak/DomainBed_EasyHard/all/VLCS.tar.gz@[0-9a-f]{12}", second["push_stdout"])
    assert first["first"]["domains"] == list(VLCS_DOMAINS) and first["first"]["classes"] == list(VLCS_CLASSES)
    assert first["first"]["sizes"] == counts and first["first"]["size"] == [6, 6]
    stored = list((tmp_path / "dgzoo-cache" / "hub-archives").rglob("*.parquet"))
    assert len(stored) == 1 and not list((tmp_path / "dgzoo-cache").rglob("*.tar.gz"))  # the archive is not kept
    source = json.loads((stored[0].parent.parent / "source.json").read_text())
    assert source == {
        "repo_id": "PTeterwak/DomainBed_EasyHard",
        "revision": sha,
        "archive": "all/VLCS.tar.gz",
        "rows": sum(counts.values()),
    }


UNPINNED = r"""
import dataclasses, json
from dgzoo.data import REGISTRY, load_dg_dataset, register_dataset
register_dataset(dataclasses.replace(REGISTRY["vlcs"], revision=None), replace=True)
data = load_dg_dataset("vlcs")
print(json.dumps({"revision": data.revision, "sizes": {d: len(r) for d, r in data.rows_by_domain.items()}}))
"""


@pytest.mark.slow  # ~15 s: a local Hub server and three fresh interpreters
def test_tarball_dataset_without_a_pin_loads_the_repos_current_commit(tmp_path):
    # A tarball dataset registered without a pin (a user's own) used to reach the download with no commit at all
    # and crash on it (TypeError); it loads the commit the repo's main branch points at, as a Hub dataset does.
    counts = make_vlcs_tarball(tmp_path / "VLCS.tar.gz", per_class=1)
    with HubServer(tmp_path / "storage") as server:
        run(server, tmp_path / "hf0", SETUP, tmp_path / "VLCS.tar.gz")
        head, _ = run(
            server,
            tmp_path / "hf1",
            "import json; from huggingface_hub import HfApi; print(json.dumps("
            "HfApi().repo_info('PTeterwak/DomainBed_EasyHard', repo_type='dataset').sha))",
        )
        loaded, _ = run(server, tmp_path / "hf2", UNPINNED, DGZOO_CACHE=str(tmp_path / "dgzoo-cache"))
        assert server.errors == []
    assert loaded == {"revision": head, "sizes": counts}


# ---------------------------------------------------------------------- pins and column layouts (no network)


def test_every_hub_dataset_of_the_registry_is_pinned():
    from dgzoo.data import REGISTRY

    for spec in REGISTRY.values():
        if spec.kind in ("hub", "tarball"):
            assert spec.revision and re.fullmatch(r"[0-9a-f]{7}([0-9a-f]{33})?", spec.revision), spec.name
    assert REGISTRY["vlcs"].archive == "all/VLCS.tar.gz"
    assert REGISTRY["terra-incognita"].archive == "all/terra_incognit.tar.gz"


def test_domainnet_columns_follow_the_commit():
    from dgzoo.data import REGISTRY

    spec = REGISTRY["domainnet"]
    pinned = spec.layout_at(spec.revision, ["image", "domain", "category", "y"])
    assert (pinned.image, pinned.label, pinned.domain) == ("image", "y", "domain")
    latest = spec.layout_at("ee20570ae7a29c51571e55a9a17983f7625295d6", ["image", "label"])
    assert (latest.image, latest.label, latest.domain) == ("image", "label", None)
    older = spec.layout_at(
        "7cc2add8164cd9179af0c58c6195bc88ddde29aa", ["image", "domain", "category", "y", "image_path"]
    )
    assert (older.label, older.domain) == ("y", "domain")
    assert spec.layout_at("cd16ade672a036d4ac99e4a00b80ffd31d83eca5", []).images is False
    # A commit the registry does not list: the first layout whose columns it has.
    assert spec.layout_at("f" * 40, ["image", "label"]).label == "label"


def _table(paths, labels, with_domain=None):
    import datasets

    rng = np.random.default_rng(0)
    images = []
    for path in paths:
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (4, 4, 3)).astype(np.uint8)).save(buffer, format="PNG")
        images.append({"bytes": buffer.getvalue(), "path": path})
    columns = {"image": images, "label": labels}
    features = {"image": datasets.Image(), "label": datasets.ClassLabel(names=["apple", "zebra"])}
    if with_domain is not None:
        columns["domain"], features["domain"] = with_domain, datasets.Value("string")
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


def test_domain_from_the_image_path_when_a_commit_has_no_domain_column():
    from dgzoo.data import REGISTRY
    from dgzoo.data.loading import _normalize
    from dgzoo.data.revisions import apply_layout
    from dgzoo.errors import DGZooError

    spec, sha = REGISTRY["domainnet"], "ee20570ae7a29c51571e55a9a17983f7625295d6"
    table = _table(["real/zebra/real_344_000001.jpg", "quickdraw_001_000002.jpg", "clipart/apple/a.jpg"], [1, 0, 0])
    none = dict(image=None, label=None, domain=None)
    table, columns = apply_layout(table, spec, sha, {"image": "image", "label": "y", "domain": "domain"}, none)
    data = _normalize(table, "DomainNet", "hub", columns, spec=spec)
    assert columns == {"image": "image", "label": "label", "domain": "domain"}
    assert [data.domains[i] for i in data.domain_of_row] == ["real", "quickdraw", "clipart"]
    assert data.labels.tolist() == [1, 0, 0] and data.class_names == ["apple", "zebra"]
    # A domain column, where that commit has one, wins over the paths.
    kept, _ = apply_layout(_table(["x.jpg"], [0], ["sketch"]), spec, sha, columns, none)
    assert kept["domain"] == ["sketch"]
    with pytest.raises(DGZooError, match="names no domain of clipart"):
        apply_layout(_table(["photos/x.jpg"], [0]), spec, sha, columns, none)
    with pytest.raises(DGZooError, match="holds file names only.*--revision 8f5b9a1"):
        apply_layout(table, spec, "cd16ade672a036d4ac99e4a00b80ffd31d83eca5", columns, none)
