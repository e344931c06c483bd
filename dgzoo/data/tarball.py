"""Registry datasets that exist on the Hub only as DomainBed-layout tarballs (VLCS, TerraIncognita).

``--dataset vlcs`` downloads the entry's archive (``all/VLCS.tar.gz`` of ``PTeterwak/DomainBed_EasyHard``) with
``hf_hub_download`` at the pinned commit, converts it once to parquet with :mod:`dgzoo.data.convert` (the original
encoded image bytes; a progress bar while they are packed), and keeps the parquet in dgzoo's cache::

    <cache>/hub-archives/<owner>--<repo>/<commit sha>/<archive name>/data/train-*.parquet

Later loads of that commit read the cache without touching the network: a commit's content never changes, and
the pinned (short) commit id is mapped to its full sha in ``pins.json`` when it is first resolved. The archive
itself is downloaded into a temporary folder and deleted once converted, so the data is stored once.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..errors import DGZooError
from .builtin import cache_root
from .convert import convert_image_folders, image_folder_root, write_parquet
from .registry import DatasetSpec
from .revisions import SHA_LENGTH, commit_of, resolve_pinned

logger = logging.getLogger(__name__)

SOURCE_FILE = "source.json"  # written last: a folder without it is an interrupted conversion


def archive_root() -> Path:
    return cache_root() / "hub-archives"


def converted_folder(spec: DatasetSpec, sha: str) -> Path:
    """Where the parquet conversion of ``spec``'s archive at commit ``sha`` lives in the cache."""
    name = Path(spec.archive or spec.name).name.split(".")[0]
    return archive_root() / str(spec.repo_id).replace("/", "--") / sha / name


def _pins_file() -> Path:
    return archive_root() / "pins.json"


def _cached_pin(spec: DatasetSpec) -> str | None:
    try:
        return json.loads(_pins_file().read_text()).get(f"{spec.repo_id}@{spec.revision}")
    except (OSError, ValueError):
        return None


def _remember_pin(spec: DatasetSpec, sha: str) -> None:
    path = _pins_file()
    try:
        pins = json.loads(path.read_text())
    except (OSError, ValueError):
        pins = {}
    pins[f"{spec.repo_id}@{spec.revision}"] = sha
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(pins, indent=2) + "\n")
    os.replace(tmp, path)


def _is_converted(folder: Path) -> bool:
    return (folder / SOURCE_FILE).is_file() and any((folder / "data").glob("*.parquet"))


def converted_archive(spec: DatasetSpec, revision: str | None = None, token: str | None = None) -> tuple[Path, str]:
    """The cached parquet folder of ``spec``'s archive at ``revision`` (default: the pinned commit) and its sha;
    downloads and converts the archive the first time."""
    if spec.kind != "tarball" or not spec.repo_id or not spec.archive:
        raise DGZooError(f"{spec.name} is not a tarball dataset of the registry")
    if revision and len(revision) == SHA_LENGTH and _is_converted(converted_folder(spec, revision)):
        return converted_folder(spec, revision), revision
    pinned = None if revision else _cached_pin(spec)
    if pinned and _is_converted(converted_folder(spec, pinned)):
        return converted_folder(spec, pinned), pinned
    import huggingface_hub

    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise DGZooError(
            f"{spec.title} at {revision or spec.revision} is not in dgzoo's cache yet and HF_HUB_OFFLINE "
            f"is set; unset it once to download and convert {spec.archive} from {spec.repo_id}"
        )
    if revision or not spec.revision:  # a given revision, or a dataset with no pin: the commit it points at now
        sha = commit_of(spec.repo_id, revision, token=token)
    else:  # the registry's pin as a full sha (resolve_pinned returns one, or raises, for a pinned spec)
        sha = resolve_pinned(spec, None, token=token) or spec.revision
    folder = converted_folder(spec, sha)
    if not _is_converted(folder):
        _download_and_convert(spec, sha, folder, token)
    if not revision:
        _remember_pin(spec, sha)
    return folder, sha


def _download_and_convert(spec: DatasetSpec, sha: str, folder: Path, token: str | None) -> None:
    import huggingface_hub

    assert spec.repo_id and spec.archive  # checked by the caller, before anything is downloaded
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".convert-", dir=folder.parent))
    try:
        logger.warning(
            "%s: downloading %s from %s at %s and converting it to parquet (once)",
            spec.title,
            spec.archive,
            spec.repo_id,
            sha[:12],
        )
        try:
            archive = huggingface_hub.hf_hub_download(
                spec.repo_id, spec.archive, repo_type="dataset", revision=sha, token=token, local_dir=work / "download"
            )
        except huggingface_hub.errors.EntryNotFoundError:
            raise DGZooError(
                f"{spec.repo_id} at commit {sha} has no {spec.archive}; pass --revision with a commit that has it"
            ) from None
        except Exception as e:
            first = str(e).splitlines()[0] if str(e) else ""
            raise DGZooError(
                f"could not download {spec.archive} from {spec.repo_id} ({type(e).__name__}: {first}); "
                f"check the connection and run again"
            ) from None
        with image_folder_root(archive) as root:
            table = convert_image_folders(root)
            unknown = sorted(set(table.unique("domain")) - set(spec.domains))
            if unknown:
                raise DGZooError(
                    f"{spec.archive} of {spec.repo_id} has folders {', '.join(unknown)}, which are not "
                    f"{spec.title} domains ({', '.join(spec.domains)}); check the archive"
                )
            write_parquet(table, work / "out", progress=f"{spec.title}: packing images")
        (work / "out" / SOURCE_FILE).write_text(
            json.dumps(
                {"repo_id": spec.repo_id, "revision": sha, "archive": spec.archive, "rows": len(table)}, indent=2
            )
            + "\n"
        )
        if folder.exists():  # an interrupted earlier conversion (no source.json): replaced
            shutil.rmtree(folder)
        os.replace(work / "out", folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def load_archive(spec: DatasetSpec, revision: str | None = None, token: str | None = None) -> tuple[Any, str]:
    """The table of a tarball dataset (``image``/``label``/``domain``, images embedded) and its commit sha."""
    import datasets

    folder, sha = converted_archive(spec, revision, token)
    files = sorted(str(f) for f in (folder / "data").glob("*.parquet"))
    return datasets.load_dataset("parquet", data_files=files, split="train"), sha
