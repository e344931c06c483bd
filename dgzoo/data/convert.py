"""Convert image-folder DG datasets into the parquet layout dgzoo trains from, locally or on the Hub.

VLCS and TerraIncognita (and DomainBed's own downloads of PACS, OfficeHome, DomainNet) are distributed as
image folders ``root/<domain>/<class>/<image>``, often inside a tarball. :func:`convert_image_folders` turns
such a source into one table with the columns of the Hub DG datasets (``flwrlabs/pacs``): ``image`` (Image,
the original encoded bytes, never re-encoded), ``label`` (ClassLabel, classes sorted by name as ImageFolder
and DomainBed order them) and ``domain`` (string, the folder name). Rows are ordered domain, class, file name,
so a converted dataset's seeded splits are the same on every machine.

The result is written as parquet shards (``data/train-0000i-of-0000n.parquet``) to a folder, pushed to a Hub
dataset repo with a dataset card, or both; ``dgzoo train --dataset REPO_ID|FOLDER`` then trains from it.
"""

from __future__ import annotations

import logging
import os
import shutil
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import DGZooError, writing
from .folders import IMAGE_EXTENSIONS, image_folder_table, is_image_folder
from .registry import REGISTRY, DatasetSpec, hub_license
from .verify import image_source, undecodable_rows

logger = logging.getLogger(__name__)

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".zip")
DEFAULT_SHARD_BYTES = 500 * 2**20  # the size datasets.push_to_hub aims for


@contextmanager
def image_folder_root(source: str | Path) -> Iterator[Path]:
    """Yield the ``root`` of ``root/<domain>/<class>/*`` inside ``source`` (a folder or an archive).

    An archive is extracted to a temporary folder (``TMPDIR``) that is removed afterwards; tar members that
    would land outside it (absolute paths, ``..``, links) are refused. Single wrapping folders, such as the
    ``VLCS/`` inside ``VLCS.tar.gz``, are descended into.
    """
    source = Path(source).expanduser()
    if not source.exists():
        raise DGZooError(f"{source} does not exist; pass a folder root/<domain>/<class>/* or a .tar(.gz)/.zip of one")
    if source.is_dir():
        yield _find_root(source, source)
        return
    if not source.name.lower().endswith(ARCHIVE_SUFFIXES):
        raise DGZooError(f"{source} is neither a folder nor an archive ({', '.join(ARCHIVE_SUFFIXES)})")
    tmp = Path(tempfile.mkdtemp(prefix="dgzoo-convert-"))
    try:
        _extract(source, tmp)
        yield _find_root(tmp, source)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _extract(archive: Path, target: Path) -> None:
    try:
        if archive.name.lower().endswith(".zip"):
            with zipfile.ZipFile(archive) as z:
                for name in z.namelist():
                    if Path(name).is_absolute() or ".." in Path(name).parts:
                        raise DGZooError(f"{archive} holds an unsafe path '{name}'; refusing to extract it")
                z.extractall(target)
        else:
            with tarfile.open(archive) as t:
                t.extractall(target, filter="data")
    except (tarfile.TarError, zipfile.BadZipFile, OSError) as e:
        raise DGZooError(f"could not extract {archive} ({type(e).__name__}: {e}); check the file is complete") from None


def _find_root(path: Path, source: Path) -> Path:
    while not is_image_folder(path):
        children = [p for p in path.iterdir() if not p.name.startswith(".") and not p.name.startswith("__MACOSX")]
        if len(children) != 1 or not children[0].is_dir():
            raise DGZooError(
                f"no image folders root/<domain>/<class>/<image> found in {source} (image types: "
                f"{', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
        path = children[0]
    return path


def known_spec(domains: list[str]) -> DatasetSpec | None:
    """The registry entry whose domains are exactly these folder names (e.g. VLCS), if any."""
    for spec in REGISTRY.values():
        if set(spec.domains) == set(domains):
            return spec
    return None


def convert_image_folders(root: str | Path) -> Any:
    """The ``image``/``label``/``domain`` table of image folders at ``root`` (images referenced by path).

    The bytes are embedded when the table is written (:func:`write_parquet`, :func:`push_dataset`). Every image is
    decoded once first, so an archive with a corrupt file is refused here, naming the file.
    """
    table = image_folder_table(root)
    spec = known_spec(sorted(set(table["domain"])))
    if spec is not None and spec.classes and tuple(table.features["label"].names) != tuple(sorted(spec.classes)):
        raise DGZooError(
            f"{root} has {spec.title}'s domains but classes {', '.join(table.features['label'].names)}, "
            f"not {', '.join(spec.classes)}; check the archive is complete"
        )
    bad = undecodable_rows(table, "image", range(len(table)))  # never pack (or publish) an image nobody can read
    if bad:
        files = ", ".join(f"{image_source(table, 'image', row)} ({why})" for row, why in bad[:3])
        raise DGZooError(
            f"{len(bad)}{'+' if len(bad) >= 5 else ''} image(s) under {root} do not decode: {files}; "
            f"replace or remove them and convert again"
        )
    _warn_wide_images(table, root)
    return table


def _warn_wide_images(table: Any, root: str | Path) -> None:
    """Say when images hold more than 8 bits per pixel (16-bit PNGs...): they are kept as they are, and dgzoo
    scales them to 8 bits when it reads them (:func:`dgzoo.data.transforms.to_rgb`); other tools may clip them."""
    import datasets
    from PIL import Image

    from .transforms import WIDE_MODES

    wide: dict[str, list[str]] = {}
    for raw in table.select_columns(["image"]).cast_column("image", datasets.Image(decode=False))["image"]:
        with Image.open(raw["path"]) as image:  # the header only
            if image.mode in WIDE_MODES:
                wide.setdefault(image.mode, []).append(raw["path"])
    for mode, paths in wide.items():
        logger.warning(
            "warning: %d image(s) under %s are %s (more than 8 bits per pixel, e.g. %s); they are kept "
            "as they are and dgzoo scales them to 8 bits when it reads them (PIL's convert('RGB') would "
            "clip them to near-white)",
            len(paths),
            root,
            mode,
            paths[0],
        )


def domain_counts(table: Any) -> dict[str, int]:
    """Images per domain, domains sorted by name."""
    counts: dict[str, int] = {}
    for d in table["domain"]:
        counts[d] = counts.get(d, 0) + 1
    return dict(sorted(counts.items()))


def num_shards(table: Any, shard_bytes: int = DEFAULT_SHARD_BYTES) -> int:
    """How many parquet shards keep each near ``shard_bytes`` (from the image files' sizes on disk)."""
    import datasets

    paths = table.select_columns(["image"]).cast_column("image", datasets.Image(decode=False))["image"]
    return max(1, -(-sum(os.path.getsize(p["path"]) for p in paths) // shard_bytes))


def write_parquet(
    table: Any, output_dir: str | Path, shards: int | None = None, progress: str | None = None
) -> list[Path]:
    """Write ``table`` with its image bytes embedded as ``output_dir/data/train-*.parquet``; return the files.

    Shards are written under temporary names and renamed at the end, so an interrupted conversion never leaves
    a folder that loads as a partial dataset. ``progress`` is the label of a progress bar over the images.
    """
    from datasets.table import embed_table_storage
    from tqdm.auto import tqdm

    data_dir = Path(output_dir) / "data"
    if data_dir.exists() and any(data_dir.glob("*.parquet")):
        raise DGZooError(f"{data_dir} already holds parquet files; choose an empty --output-dir")
    data_dir.mkdir(parents=True, exist_ok=True)
    shards = shards or num_shards(table)
    written: list[Path] = []
    bar = tqdm(total=len(table), desc=progress, unit="img", disable=progress is None)

    def embed(batch: Any) -> Any:  # what datasets.push_to_hub does per shard: read each file into the image column
        bar.update(batch.num_rows)
        return embed_table_storage(batch)

    with writing(data_dir, cleanup=written):  # a full disk: one line, and no temporary shard is left behind
        for i in range(shards):
            shard = table.shard(num_shards=shards, index=i, contiguous=True)
            shard = shard.with_format("arrow").map(embed, batched=True, keep_in_memory=True)
            tmp = data_dir / f".train-{i:05d}-of-{shards:05d}.parquet.tmp"
            written.append(tmp)
            shard.with_format(None).to_parquet(str(tmp))
        bar.close()
        final = [tmp.with_name(tmp.name[1 : -len(".tmp")]) for tmp in written]
        for tmp, path in zip(written, final):
            os.replace(tmp, path)
    return final


def dataset_card(
    table: Any, title: str, source: str, repo_id: str, spec: DatasetSpec | None
) -> tuple[dict[str, Any], str]:
    """Front matter fields and body of the dataset card: what is in it, where it came from, how to train on it."""
    counts = domain_counts(table)
    domains, classes = list(counts), table.features["label"].names
    fields: dict[str, Any] = {
        "pretty_name": title,
        "task_categories": ["image-classification"],
        "tags": ["domain-generalization", "dgzoo"],
        **hub_license(spec),
    }
    rows = "\n".join(f"| {d} | {counts[d]} |" for d in domains)
    body = f"""# {title}

Converted from image folders `root/<domain>/<class>/*` (`{Path(source).name}`) with `dgzoo datasets convert`:
{len(table)} images, {len(domains)} domains, {len(classes)} classes.

Columns: `image` (the original encoded bytes), `label` (class index; names below, sorted as ImageFolder and
DomainBed sort them), `domain` (the folder name).

| Domain | Images |
|---|---|
{rows}

Classes: {", ".join(classes)}.

Train a domain-generalization model on it, holding out one domain:

```bash
dgzoo train --dataset {repo_id} --target-domains "{domains[-1]}"
```
"""
    if spec is not None:
        body += f"\n## Source\n\n{spec.title}: {spec.homepage}\n\n{spec.notes}\n"
        if spec.citation:
            body += f"\n```bibtex\n{spec.citation}\n```\n"
    return fields, body


def push_dataset(
    table: Any,
    repo_id: str,
    title: str,
    source: str,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | None = None,
    shards: int | None = None,
) -> str:
    """Push ``table`` (images embedded) and its dataset card to the Hub dataset ``repo_id``; return the commit sha.

    ``datasets.push_to_hub`` writes the parquet shards and the card's ``dataset_info``; the card's description
    and front matter (licence, tags, task) follow in a second commit on top of exactly that one.
    """
    from huggingface_hub import DatasetCard, hf_hub_download

    spec = known_spec(sorted(set(table["domain"])))
    message = commit_message or f"dgzoo datasets convert {Path(source).name}"
    pushed = table.push_to_hub(
        repo_id,
        private=private or None,
        token=token,
        revision=revision,
        commit_message=message,
        num_shards=shards or num_shards(table),
    )
    card = DatasetCard.load(
        hf_hub_download(repo_id, "README.md", repo_type="dataset", revision=pushed.oid, token=token)
    )
    fields, body = dataset_card(table, title, source, repo_id, spec)
    for key, value in fields.items():
        setattr(card.data, key, value)
    card.text = body
    info = card.push_to_hub(
        repo_id,
        repo_type="dataset",
        token=token,
        revision=revision,
        commit_message="dgzoo: dataset card",
        parent_commit=pushed.oid,
    )
    return info.oid
