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
from .registry import DatasetSpec, get_spec, unknown_dataset_error
from . import builtin

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


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
    path: str | None = None
    spec: DatasetSpec | None = None
    rows_by_domain: dict[str, np.ndarray] = field(init=False)

    def __post_init__(self) -> None:
        self.rows_by_domain = {d: np.flatnonzero(self.domain_of_row == i) for i, d in enumerate(self.domains)}

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
        return {"name": self.spec.name if self.spec else self.name, "title": self.spec.title if self.spec else self.name,
                "source": self.source, "repo_id": self.repo_id, "revision": self.revision, "path": self.path,
                "domains": self.domains, "class_names": self.class_names,
                "domain_sizes": {d: int(len(r)) for d, r in self.rows_by_domain.items()}}


def load_dg_dataset(name: str, revision: str | None = None, image_column: str | None = None,
                    label_column: str | None = None, domain_column: str | None = None) -> DGDataset:
    """Load ``name`` (registry name, Hub repo id, or local path) as a :class:`DGDataset`.

    Raises DGZooError with a one-line fix for a missing dataset, revision or domain column.
    """
    spec = get_spec(name)
    columns = dict(image=image_column or (spec.image_column if spec else "image"),
                   label=label_column or (spec.label_column if spec else "label"),
                   domain=domain_column or (spec.domain_column if spec else "domain"))
    local = Path(name).expanduser()
    if spec is not None and spec.kind == "builtin":
        path = builtin.BUILDERS[spec.name]()
        table = _read_parquet([path])
        return _normalize(table, spec.title, "builtin", columns, spec=spec)  # its cache path says nothing
    if local.exists():
        table, source = _read_local(local)
        return _normalize(table, str(local), source, columns, spec=spec, path=str(local.resolve()))
    if spec is not None and spec.kind == "imagefolder":
        raise DGZooError(f"{spec.title} has no parquet copy on the Hub; download it ({spec.homepage}), extract it and "
                         f"pass the folder root/<domain>/<class>/* with --dataset PATH")
    if spec is not None or _looks_like_repo_id(name):
        repo_id = spec.repo_id if spec else name
        table, sha = _read_hub(repo_id, revision or (spec.revision if spec else None), spec)
        return _normalize(table, spec.title if spec else repo_id, "hub", columns, spec=spec, repo_id=repo_id,
                          revision=sha)
    raise unknown_dataset_error(name)


# ---------------------------------------------------------------------- readers


def _looks_like_repo_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def _read_parquet(files: list[Path]) -> Any:
    import datasets

    return datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train")


def _read_local(path: Path) -> tuple[Any, str]:
    import datasets

    if path.is_file():
        if path.suffix == ".parquet":
            return _read_parquet([path]), "parquet"
        raise DGZooError(f"{path} is not a parquet file; pass a .parquet file, a parquet folder, a save_to_disk "
                         f"folder or image folders root/<domain>/<class>/*")
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
    raise DGZooError(f"{path} holds no parquet files, no save_to_disk dataset and no image folders "
                     f"root/<domain>/<class>/*; point --dataset at one of those")


def _is_image_folder(root: Path) -> bool:
    for domain in (p for p in root.iterdir() if p.is_dir()):
        for cls in (p for p in domain.iterdir() if p.is_dir()):
            if any(f.suffix.lower() in IMAGE_EXTENSIONS for f in cls.iterdir()):
                return True
    return False


def image_folder_table(root: str | Path) -> Any:
    """Index image folders ``root/<domain>/<class>/*`` as a table (paths, decoded lazily), classes sorted by name."""
    import datasets

    root = Path(root)
    entries: list[tuple[str, str, str]] = []
    for domain in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for cls in sorted(p for p in domain.iterdir() if p.is_dir() and not p.name.startswith(".")):
            for f in sorted(cls.iterdir()):
                if f.suffix.lower() in IMAGE_EXTENSIONS:
                    entries.append((str(f), cls.name, domain.name))
    if not entries:
        raise DGZooError(f"no images found under {root}; expected root/<domain>/<class>/<image>.jpg")
    classes = sorted({c for _, c, _ in entries})
    index = {c: i for i, c in enumerate(classes)}  # a list lookup per image is quadratic on DomainNet-size folders
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=classes),
                                  "domain": datasets.Value("string")})
    return datasets.Dataset.from_dict({"image": [e[0] for e in entries],
                                       "label": [index[e[1]] for e in entries],
                                       "domain": [e[2] for e in entries]}, features=features)


def resolve_hub_revision(repo_id: str, revision: str | None, repo_type: str = "dataset",
                         token: str | None = None) -> str | None:
    """Resolve a branch or tag to its commit sha so a run loads, and records, exactly one commit.

    Returns None when huggingface_hub is in offline mode (the cache then decides). Errors become one-line
    DGZooErrors that say what to check.
    """
    import huggingface_hub
    from huggingface_hub import errors as hf_errors

    if huggingface_hub.constants.HF_HUB_OFFLINE:
        return revision
    try:
        info = huggingface_hub.HfApi(token=token).repo_info(repo_id, repo_type=repo_type, revision=revision)
    except hf_errors.RevisionNotFoundError:
        raise DGZooError(f"revision '{revision}' does not exist in the Hub {repo_type} {repo_id}; "
                         f"pass an existing branch, tag or commit sha with --revision") from None
    except hf_errors.RepositoryNotFoundError:
        raise DGZooError(f"Hub {repo_type} '{repo_id}' does not exist or is private; check the id, log in with "
                         f"`hf auth login` for private repos, or pass a local path") from None
    except (hf_errors.HfHubHTTPError, OSError, getattr(hf_errors, "HTTPError", OSError)) as e:  # + httpx errors
        endpoint = huggingface_hub.constants.ENDPOINT
        raise DGZooError(f"cannot reach the Hub at {endpoint} to load {repo_id} ({type(e).__name__}); check the "
                         f"connection, or set HF_HUB_OFFLINE=1 to use a cached copy") from None
    return info.sha


def _read_hub(repo_id: str, revision: str | None, spec: DatasetSpec | None) -> tuple[Any, str | None]:
    import datasets

    sha = resolve_hub_revision(repo_id, revision)
    try:
        loaded = datasets.load_dataset(repo_id, revision=sha)
    except (FileNotFoundError, ConnectionError, OSError) as e:
        raise DGZooError(f"could not load Hub dataset {repo_id}@{sha or revision or 'main'} "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); check the repo holds "
                         f"parquet data, or download it and pass a local path") from None
    if isinstance(loaded, datasets.DatasetDict):
        names = list(spec.splits) if spec and spec.splits else sorted(loaded)
        missing = [n for n in names if n not in loaded]
        if missing:
            raise DGZooError(f"Hub dataset {repo_id} has no split(s) {', '.join(missing)} (has: {', '.join(loaded)})")
        loaded = datasets.concatenate_datasets([loaded[n] for n in names]) if len(names) > 1 else loaded[names[0]]
    return loaded, sha


# ---------------------------------------------------------------------- normalization


def _normalize(table: Any, name: str, source: str, columns: dict[str, str], **kw: Any) -> DGDataset:
    import datasets

    present = list(table.column_names)
    for role in ("image", "label", "domain"):
        if columns[role] not in present:
            hint = {"domain": "; for image folders use root/<domain>/<class>/*"}.get(role, "")
            raise DGZooError(f"dataset {name} has no {role} column '{columns[role]}' (columns: {', '.join(present)}); "
                             f"pass --{role}-column NAME{hint}")
    if not isinstance(table.features[columns["image"]], datasets.Image):
        raise DGZooError(f"column '{columns['image']}' of {name} is not an image column "
                         f"({table.features[columns['image']]}); pass --image-column NAME")
    spec: DatasetSpec | None = kw.get("spec")
    domains, domain_of_row = _domain_codes(table, columns["domain"], spec)
    class_names, labels = _label_codes(table, columns["label"], spec)
    return DGDataset(name=name, source=source, table=table, image_column=columns["image"], labels=labels,
                     domain_of_row=domain_of_row, domains=domains, class_names=class_names, **kw)


def _column(table: Any, name: str) -> np.ndarray:
    return np.asarray(table.select_columns([name]).with_format("numpy")[name])


def _domain_codes(table: Any, column: str, spec: DatasetSpec | None) -> tuple[list[str], np.ndarray]:
    import datasets

    feature = table.features[column]
    values = _column(table, column)
    if isinstance(feature, datasets.ClassLabel):
        names = list(feature.names)
        raw = [names[int(v)] for v in values]
    elif np.issubdtype(values.dtype, np.integer) and spec is not None and len(spec.domains) > int(values.max()):
        raw = [spec.domains[int(v)] for v in values]  # integer domain ids in the registry's order
    else:
        raw = [str(v) for v in values]
    present = set(raw)
    if spec is not None and present <= set(spec.domains):
        domains = [d for d in spec.domains if d in present]
    else:
        domains = sorted(present, key=_natural_key)
    index = {d: i for i, d in enumerate(domains)}
    return domains, np.fromiter((index[r] for r in raw), dtype=np.int64, count=len(raw))


def _label_codes(table: Any, column: str, spec: DatasetSpec | None) -> tuple[list[str], np.ndarray]:
    import datasets

    feature = table.features[column]
    values = _column(table, column)
    if isinstance(feature, datasets.ClassLabel):
        names = list(feature.names)
        if spec is not None and spec.classes and tuple(names) != spec.classes:
            logger.warning("class names of %s differ from the registry's; using the dataset's own", spec.name)
        return names, values.astype(np.int64)
    uniques = sorted(set(values.tolist()), key=_natural_key)
    index = {v: i for i, v in enumerate(uniques)}
    return [str(u) for u in uniques], np.fromiter((index[v] for v in values.tolist()), dtype=np.int64,
                                                  count=len(values))


def _natural_key(value: Any) -> tuple:
    text = str(value)
    return (0, float(text), text) if _is_number(text) else (1, 0.0, text)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False

