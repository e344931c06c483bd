"""Load a DG dataset from anywhere into one normalized table.

Sources: a registry name (``pacs``, ``rotated-digits``...), a Hub repo id with ``image / label / domain``
columns (pinned to a resolved commit sha), a local parquet file or folder, a ``save_to_disk`` folder, or image
folders laid out ``root/<domain>/<class>/*``. Whatever the source, the result is a :class:`DGDataset` whose
rows can be grouped by domain without decoding a single image: only the label and domain columns are read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DGZooError
from . import builtin, plan_cache
from .fingerprint import local_fingerprint, local_name
from .folders import IMAGE_EXTENSIONS, image_folder_table  # noqa: F401  (re-exported)
from .folders import is_image_folder as _is_image_folder
from .registry import DatasetSpec, get_spec, unknown_dataset_error
from .revisions import apply_layout, commit_of, resolve_pinned

logger = logging.getLogger(__name__)


@dataclass
class DGDataset:
    """A multi-domain image classification dataset: one table plus the row indices of every domain."""

    name: str
    source: str  # builtin | hub | parquet | disk | imagefolder
    table: Any  # datasets.Dataset with an Image column
    image_column: str
    labels: np.ndarray  # class index of every row, 0..C-1
    domain_of_row: np.ndarray  # domain index of every row
    domains: list[str]
    class_names: list[str]
    repo_id: str | None = None
    revision: str | None = None
    path: str | None = None  # a local source's absolute path: on this machine only, never published
    spec: DatasetSpec | None = None
    fingerprint: str | None = None  # a local source's content fingerprint (dgzoo.data.fingerprint)
    plan_key: str | None = None  # names this table's plan in dgzoo.data.plan_cache; None: the plan is not cached
    images_in_key: bool = False  # plan_key also names every image's content (a decode check may be remembered by it)
    _stored_images: Any = field(default=None, init=False, repr=False, compare=False)
    _rows_by_domain: dict[str, np.ndarray] | None = field(default=None, init=False, repr=False, compare=False)
    _class_presence: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def rows_by_domain(self) -> dict[str, np.ndarray]:
        """The rows of every domain, ascending, in the order of :attr:`domains` (computed once, or read from the
        plan cache)."""
        if self._rows_by_domain is None:
            self._rows_by_domain = {d: np.flatnonzero(self.domain_of_row == i) for i, d in enumerate(self.domains)}
        return self._rows_by_domain

    @property
    def class_presence(self) -> np.ndarray:
        """``(domains, classes)`` booleans: whether domain ``d`` has an image of class ``c``."""
        if self._class_presence is None:
            presence = np.zeros((len(self.domains), self.num_classes), dtype=bool)
            presence[self.domain_of_row, self.labels] = True
            self._class_presence = presence
        return self._class_presence

    def __getstate__(self) -> dict[str, Any]:
        # A loader worker started by spawn rebuilds the Arrow view itself rather than receive a copy of every image.
        return {**self.__dict__, "_stored_images": None}

    def decode_image(self, row: int) -> Any:
        """The image of row ``row``, decoded: its stored value read from the Arrow column and decoded by the column's
        own ``datasets.Image`` feature. The same image as ``table[row][image_column]``, without formatting the whole
        row into Python first (the per-sample cost a loader pays on every step)."""
        if self._stored_images is None:
            indices = self.table._indices
            self._stored_images = (
                self.table.data.column(self.image_column),
                None if indices is None else indices.column(0),
            )
        column, indices = self._stored_images
        position = int(row) if indices is None else indices[int(row)].as_py()
        return self.table.features[self.image_column].decode_example(column[position].as_py())

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def canonical_domain(self, name: str) -> str | None:
        """Resolve a user-given domain name (exact, registry alias, or case-insensitive)."""
        if name in self.domains:
            return name
        if self.spec is not None:
            found = self.spec.canonical_domain(name)
            if found in self.domains:
                return found
        lowered = {d.lower(): d for d in self.domains}
        return lowered.get(str(name).lower())

    def info(self) -> dict[str, Any]:
        """What results.json and the model card record about the data."""
        return {
            "name": self.spec.name if self.spec else self.name,
            "title": self.spec.title if self.spec else self.name,
            "source": self.source,
            "repo_id": self.repo_id,
            "revision": self.revision,
            "path": self.path,
            "fingerprint": self.fingerprint,
            "domains": self.domains,
            "class_names": self.class_names,
            "domain_sizes": {d: int(len(r)) for d, r in self.rows_by_domain.items()},
        }


def load_dg_dataset(
    name: str,
    revision: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    domain_column: str | None = None,
    remember: bool = True,
) -> DGDataset:
    """Load ``name`` (registry name, Hub repo id, or local path) as a :class:`DGDataset`.

    Its class and domain tables are read from dgzoo's plan cache when an earlier run stored them for this very table
    (:mod:`dgzoo.data.plan_cache`), else computed and, unless ``remember`` is False (a dry run), stored there.
    Raises DGZooError with a one-line fix for a missing dataset, revision or domain column.
    """
    spec = get_spec(name)
    columns = dict(
        image=image_column or (spec.image_column if spec else "image"),
        label=label_column or (spec.label_column if spec else "label"),
        domain=domain_column or (spec.domain_column if spec else "domain"),
    )
    local = Path(name).expanduser()
    if spec is not None and spec.kind == "builtin":
        path = builtin.BUILDERS[spec.name]()
        table = _read_parquet([path])
        return _normalize(table, spec.title, "builtin", columns, remember, spec=spec)  # its cache path says nothing
    if local.exists():
        table, source = _read_local(local)
        # Named by base name and content, not by where it lies on this machine (nothing else can use that).
        return _normalize(
            table,
            local_name(local),
            source,
            columns,
            remember,
            spec=spec,
            path=str(local.resolve()),
            fingerprint=local_fingerprint(local),
        )
    if spec is not None and spec.kind == "imagefolder":
        raise DGZooError(
            f"{spec.title} has no parquet copy on the Hub; download it ({spec.homepage}), extract it and "
            f"pass the folder root/<domain>/<class>/* with --dataset PATH"
        )
    if spec is not None and spec.kind == "tarball":  # an archive in a Hub repo, converted once into the cache
        from .tarball import load_archive

        table, archive_sha = load_archive(spec, revision)
        return _normalize(
            table, spec.title, "hub", columns, remember, spec=spec, repo_id=spec.repo_id, revision=archive_sha
        )
    if spec is not None or _looks_like_repo_id(name):
        repo_id = spec.repo_id if spec else name
        assert repo_id is not None  # a registry Hub dataset names its repo
        table, sha = _read_hub(repo_id, resolve_pinned(spec, revision) if spec else revision, spec)
        if spec is not None:  # the registry's column mapping at that commit, unless the user named the columns
            table, columns = apply_layout(
                table, spec, sha, columns, dict(image=image_column, label=label_column, domain=domain_column)
            )
        return _normalize(
            table, spec.title if spec else repo_id, "hub", columns, remember, spec=spec, repo_id=repo_id, revision=sha
        )
    raise unknown_dataset_error(name)


# ---------------------------------------------------------------------- readers


def _looks_like_repo_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def _read_parquet(files: list[Path]) -> Any:
    import datasets

    try:
        return datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train")
    except ValueError as e:
        if "no data" not in str(e):
            raise
        names = ", ".join(str(f) for f in files[:3]) + (" ..." if len(files) > 3 else "")
        raise DGZooError(
            f"{names} hold(s) no rows; point --dataset at parquet files with images, labels and domains"
        ) from None


def _read_local(path: Path) -> tuple[Any, str]:
    import datasets

    if path.is_file():
        if path.suffix == ".parquet":
            return _read_parquet([path]), "parquet"
        raise DGZooError(
            f"{path} is not a parquet file; pass a .parquet file, a parquet folder, a save_to_disk "
            f"folder or image folders root/<domain>/<class>/*"
        )
    if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            loaded = datasets.concatenate_datasets([loaded[k] for k in sorted(loaded)])
        return loaded, "disk"
    parquet = sorted(path.rglob("*.parquet"))
    if parquet:
        return _read_parquet(parquet), "parquet"
    if _is_image_folder(path):
        return image_folder_table(path), "imagefolder"
    raise DGZooError(
        f"{path} holds no parquet files, no save_to_disk dataset and no image folders "
        f"root/<domain>/<class>/*; point --dataset at one of those"
    )


def resolve_hub_revision(
    repo_id: str, revision: str | None, repo_type: str = "dataset", token: str | None = None
) -> str | None:
    """Resolve a branch or tag to its commit sha so a run loads, and records, exactly one commit.

    Returns None when huggingface_hub is in offline mode (the cache then decides). Errors become one-line
    DGZooErrors that say what to check.
    """
    import huggingface_hub

    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return revision
    return commit_of(repo_id, revision, repo_type, token)


def _read_hub(repo_id: str, revision: str | None, spec: DatasetSpec | None) -> tuple[Any, str | None]:
    import datasets

    sha = resolve_hub_revision(repo_id, revision)
    try:
        loaded = datasets.load_dataset(repo_id, revision=sha)
    except (FileNotFoundError, ConnectionError, OSError) as e:
        import huggingface_hub

        if huggingface_hub.constants.HF_HUB_OFFLINE or datasets.config.HF_HUB_OFFLINE:
            raise DGZooError(
                f"Hub dataset {repo_id}@{sha or revision or 'main'} is not in the local cache "
                f"({datasets.config.HF_DATASETS_CACHE}) and HF_HUB_OFFLINE is set, so it cannot be "
                f"downloaded; unset HF_HUB_OFFLINE (once, with a connection) to cache it, or pass a "
                f"local copy with --dataset PATH"
            ) from None
        raise DGZooError(
            f"could not load Hub dataset {repo_id}@{sha or revision or 'main'} "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); check the repo holds "
            f"parquet data, or download it and pass a local path"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        names = list(spec.splits) if spec and spec.splits else sorted(loaded)
        missing = [n for n in names if n not in loaded]
        if missing:
            raise DGZooError(f"Hub dataset {repo_id} has no split(s) {', '.join(missing)} (has: {', '.join(loaded)})")
        loaded = datasets.concatenate_datasets([loaded[n] for n in names]) if len(names) > 1 else loaded[names[0]]
    return loaded, sha


# ---------------------------------------------------------------------- normalization


def _normalize(
    table: Any, name: str, source: str, columns: dict[str, str], remember: bool = True, **kw: Any
) -> DGDataset:
    import datasets

    present = list(table.column_names)
    for role in ("image", "label", "domain"):
        if columns[role] not in present:
            hint = {"domain": "; for image folders use root/<domain>/<class>/*"}.get(role, "")
            raise DGZooError(
                f"dataset {name} has no {role} column '{columns[role]}' (columns: {', '.join(present)}); "
                f"pass --{role}-column NAME{hint}"
            )
    if _is_binary(table.features[columns["image"]]):  # encoded image bytes, stored without the Image type
        table = table.cast_column(columns["image"], datasets.Image())
    if not isinstance(table.features[columns["image"]], datasets.Image):
        raise DGZooError(
            f"column '{columns['image']}' of {name} is not an image column "
            f"({table.features[columns['image']]}); pass --image-column NAME"
        )
    spec: DatasetSpec | None = kw.get("spec")
    _check_class_names(table, columns["label"], spec)
    key = plan_cache.tables_key(table, source, columns, spec, kw.get("fingerprint"))
    cached = plan_cache.load_tables(key, table.num_rows) if key is not None else None
    if cached is not None:
        domains, class_names = cached["domains"].tolist(), cached["class_names"].tolist()
        domain_of_row, labels = cached["domain_of_row"], cached["labels"]
    else:
        domains, domain_of_row = _domain_codes(table, columns["domain"], spec)
        class_names, labels = _label_codes(table, columns["label"], spec)
    data = DGDataset(
        name=name,
        source=source,
        table=table,
        image_column=columns["image"],
        labels=labels,
        domain_of_row=domain_of_row,
        domains=domains,
        class_names=class_names,
        plan_key=None if key is None else plan_cache.key_hash("tables", key),
        **kw,
    )
    if cached is not None:
        bounds = np.concatenate([[0], np.cumsum(cached["domain_sizes"])])
        data._rows_by_domain = {d: cached["by_domain"][bounds[i] : bounds[i + 1]] for i, d in enumerate(domains)}
        data._class_presence = cached["class_presence"]
        data.images_in_key = bool(cached["images_in_key"])
    elif key is not None:
        # Embedded bytes are covered by the table's fingerprint; an image folder's files by its content fingerprint.
        data.images_in_key = plan_cache.all_embedded(table, columns["image"]) or (
            source == "imagefolder" and data.fingerprint is not None
        )
        if remember:
            plan_cache.save("tables", key, _tables_arrays(data))
    return data


def _tables_arrays(data: DGDataset) -> dict[str, np.ndarray]:
    rows = data.rows_by_domain
    return {
        "domains": np.array(data.domains, dtype=str),
        "class_names": np.array(data.class_names, dtype=str),
        "labels": data.labels,
        "domain_of_row": data.domain_of_row,
        "by_domain": np.concatenate([rows[d] for d in data.domains]).astype(np.int64),
        "domain_sizes": np.array([len(rows[d]) for d in data.domains], dtype=np.int64),
        "class_presence": data.class_presence,
        "images_in_key": np.array(data.images_in_key),
    }


def _is_binary(feature: Any) -> bool:
    return getattr(feature, "dtype", None) in ("binary", "large_binary")


def _column(table: Any, name: str) -> Any:
    """Column ``name`` of ``table`` as one Arrow array, in row order, read in one call: a zero-copy slice of the
    Arrow table (through its indices mapping when the table is a selection), never a conversion row by row."""
    import pyarrow as pa

    column = table.select_columns([name]).with_format("arrow")[:][name]
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


def _codes(table: Any, column: str, role: str, name: str, valid: int | None = None) -> tuple[list[Any], np.ndarray]:
    """The distinct values of ``column`` (first-seen order) and each row's index into them, computed in Arrow.

    Refuses missing values (null, NaN; for a ClassLabel also -1 or out of range): they would become a class or
    domain of their own, silently.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    values = _column(table, column)
    missing = values.is_null()
    if pa.types.is_floating(values.type):
        missing = pc.or_(missing, pc.invert(pc.is_finite(values)))
    elif valid is not None and pa.types.is_integer(values.type):
        missing = pc.or_(missing, pc.or_(pc.less(values, 0), pc.greater_equal(values, valid)))
    bad = np.flatnonzero(missing.fill_null(True).to_numpy(zero_copy_only=False))
    if len(bad):
        raise DGZooError(
            f"{len(bad)} row(s) of {name} have no {role} in column '{column}' (first: row "
            f"{int(bad[0])}); remove or label those rows, or pass the right --{role}-column"
        )
    encoded = values.dictionary_encode()
    return encoded.dictionary.to_pylist(), encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64)


def _domain_codes(table: Any, column: str, spec: DatasetSpec | None) -> tuple[list[str], np.ndarray]:
    import datasets

    feature = table.features[column]
    is_label = isinstance(feature, datasets.ClassLabel)
    uniques, codes = _codes(
        table, column, "domain", str(spec.name if spec else column), len(feature.names) if is_label else None
    )
    if is_label:
        raw = [feature.names[int(v)] for v in uniques]
    elif uniques and all(isinstance(v, int) for v in uniques) and spec is not None and len(spec.domains) > max(uniques):
        raw = [spec.domains[int(v)] for v in uniques]  # integer domain ids in the registry's order
    else:
        raw = [str(v) for v in uniques]
    present = set(raw)
    if spec is not None and present <= set(spec.domains):
        domains = [d for d in spec.domains if d in present]
    else:
        domains = sorted(present, key=_natural_key)
    index = {d: i for i, d in enumerate(domains)}
    return domains, np.array([index[r] for r in raw], dtype=np.int64)[codes]


def _label_codes(table: Any, column: str, spec: DatasetSpec | None) -> tuple[list[str], np.ndarray]:
    import datasets

    feature = table.features[column]
    is_label = isinstance(feature, datasets.ClassLabel)
    uniques, codes = _codes(
        table, column, "label", str(spec.name if spec else column), len(feature.names) if is_label else None
    )
    if is_label:
        return list(feature.names), np.array(uniques, dtype=np.int64)[codes]
    ordered = sorted(uniques, key=_natural_key)
    index = {v: i for i, v in enumerate(ordered)}
    return [str(u) for u in ordered], np.array([index[v] for v in uniques], dtype=np.int64)[codes]


def _check_class_names(table: Any, column: str, spec: DatasetSpec | None) -> None:
    """Warn when a class-label column names its classes otherwise than the registry (the dataset's names are used)."""
    import datasets

    feature = table.features[column]
    if isinstance(feature, datasets.ClassLabel) and spec is not None and spec.classes:
        if tuple(feature.names) != spec.classes:
            logger.warning("class names of %s differ from the registry's; using the dataset's own", spec.name)


def _natural_key(value: Any) -> tuple:
    text = str(value)
    return (0, float(text), text) if _is_number(text) else (1, 0.0, text)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False
