"""Typed schema of a run's ``results.json`` (no torch: reports and cards load it fast).

Modelled on transformers' ``TrainerState`` (a dataclass saved to and loaded from JSON) and timm's
``PretrainedCfg`` (typed fields, unknown keys kept): :class:`RunResults` names the fields every reader relies on,
with nested :class:`DatasetRef`, :class:`Selection`, :class:`SelectionResult` and :class:`Timing`.

Compatibility rules, because results.json files live on in sweeps and Hub repos:

- ``from_json`` reads every version written so far: 0.1 files (no ``format_version``, no dataset
  ``fingerprint``, no ``init_from``/``derived``/``splits``/``code``) and the current one.
- ``to_json(from_json(d))`` gives back ``d``: same keys in the same order, with ``format_version`` added. Keys
  this schema does not name (a soup's or an unlearning run's own fields) are kept in ``extra`` and written back
  where they were; known keys a file lacks are left out again rather than written as ``null``.
- A file whose ``format_version`` is newer than this code knows is refused with one line saying to upgrade.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from ..errors import DGZooError

FORMAT_VERSION = "1.0"
"""Written into every new results.json. Files without the key are the 0.1 layout."""

LEGACY_FORMAT_VERSION = "0.1"


_R = TypeVar("_R", bound="_Record")


def _major(version: str) -> int:
    try:
        return int(str(version).split(".")[0])
    except ValueError:
        raise DGZooError(
            f"results.json has an unreadable format_version {version!r}; "
            "rewrite it with the dgzoo version that produced it"
        ) from None


@dataclass
class _Record:
    """Base of the schema's records: JSON round trip that keeps key order, unknown keys and absent keys."""

    extra: dict[str, Any] = field(default_factory=dict, repr=False, compare=False, kw_only=True)
    # Key order of the source and the known keys it lacked, so writing back reproduces it.
    _order: tuple[str, ...] = field(default=(), repr=False, compare=False, kw_only=True)
    _absent: frozenset[str] = field(default=frozenset(), repr=False, compare=False, kw_only=True)

    _nested: ClassVar[dict[str, type[_Record]]] = {}
    _nested_maps: ClassVar[dict[str, type[_Record]]] = {}

    @classmethod
    def _known(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if not f.name.startswith("_") and f.name != "extra"]

    @classmethod
    def from_json(cls, data: Mapping[str, Any]):
        """Build the record from a parsed JSON object; missing known keys take their defaults."""
        if not isinstance(data, Mapping):
            raise DGZooError(
                f"{cls.__name__} expects a JSON object, got {type(data).__name__}; "
                "check that the file is a dgzoo results.json"
            )
        known = cls._known()
        kwargs: dict[str, Any] = {}
        for name in known:
            if name not in data:
                continue
            value = data[name]
            if name in cls._nested and isinstance(value, Mapping):
                value = cls._nested[name].from_json(value)
            elif name in cls._nested_maps and isinstance(value, Mapping):
                value = {
                    k: cls._nested_maps[name].from_json(v) if isinstance(v, Mapping) else v for k, v in value.items()
                }
            kwargs[name] = value
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.name in known
            and f.name not in data
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ]
        if missing:
            raise DGZooError(
                f"results.json lacks {', '.join(missing)} for {cls.__name__}; "
                "it was not written by dgzoo (re-run or re-export the run)"
            )
        return cls(
            **kwargs,
            extra={k: v for k, v in data.items() if k not in known},
            _order=tuple(data),
            _absent=frozenset(n for n in known if n not in data),
        )

    def to_json(self) -> dict[str, Any]:
        """The JSON object, in the source's key order (field order for new records), known keys first."""
        values: dict[str, Any] = {}
        for name in self._known():
            if name in self._absent:
                continue
            values[name] = _plain(getattr(self, name))
        values.update(self.extra)
        order = [k for k in self._order if k in values] + [k for k in values if k not in self._order]
        return {k: values[k] for k in order}

    def has(self, name: str) -> bool:
        """Whether the file held the field ``name`` (a field it lacked reads as its default)."""
        return name not in self._absent

    def require(self: _R, *names: str) -> _R:
        """``self``, or a KeyError naming the first of ``names`` the file lacked: for readers that cannot use a run
        without those fields (the report skips such a run with a note naming the key)."""
        for name in names:
            if name in self._absent:
                raise KeyError(name)
        return self


def _plain(value: Any) -> Any:
    if isinstance(value, _Record):
        return value.to_json()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


@dataclass
class DatasetRef(_Record):
    """Which data a run trained on: a registered/embedded dataset or a Hub/folder one (``fingerprint`` from 0.2)."""

    name: str
    title: str | None = None
    source: str | None = None
    repo_id: str | None = None
    revision: str | None = None
    path: str | None = None
    fingerprint: str | None = None


@dataclass
class Selection(_Record):
    """The record the run's configured selection method picked: method, step and the method's score."""

    method: str
    step: int
    score: float


@dataclass
class SelectionResult(Selection):
    """One selection method's pick with the accuracy it reports (results.json's ``selections`` entries)."""

    accuracy: dict[str, float] = field(default_factory=dict)
    target_accuracy: float = float("nan")


@dataclass
class Timing(_Record):
    """Training time and throughput (training images only, evaluation excluded)."""

    train_seconds: float
    images_per_second: float
    train_images: int
    steps_per_second: float


@dataclass
class RunResults(_Record):
    """A finished run's results.json. Field order is the order the training engine writes."""

    algorithm: str
    host_algorithm: str | None = None
    addons: list[str] = field(default_factory=list)
    algorithm_title: str | None = None
    backbone: str | None = None
    pretrained: bool | None = None
    base_model: str | None = None
    dataset: DatasetRef | None = None
    class_names: list[str] = field(default_factory=list)
    protocol: str | None = None
    source_domains: list[str] = field(default_factory=list)
    target_domains: list[str] = field(default_factory=list)
    seed: int | None = None
    split_seed: int | None = None
    steps: int | None = None
    init_from: dict[str, Any] | None = None
    selection: Selection | None = None
    accuracy: dict[str, float] = field(default_factory=dict)
    target_accuracy: float | None = None
    accuracy_splits: dict[str, dict[str, float]] = field(default_factory=dict)
    selections: dict[str, SelectionResult] = field(default_factory=dict)
    hparams: dict[str, Any] = field(default_factory=dict)
    derived: dict[str, Any] | None = None
    splits: dict[str, dict[str, int]] | None = None
    diagnostics: dict[str, Any] = field(default_factory=dict)
    citations: list[Any] = field(default_factory=list)
    timing: Timing | None = None
    num_processes: int | None = None
    device: str | None = None
    cpu_threads: int | None = None  # torch's compute threads of a run computed on a CPU (absent on accelerators)
    dgzoo_version: str | None = None
    timm_version: str | None = None
    torch_version: str | None = None
    code: dict[str, Any] | None = None
    finished: str | None = None
    format_version: str = FORMAT_VERSION
    # The fields of the other kinds of run directory; written where the writer put them, like every field.
    kind: str | None = None  # "unlearning" for dgzoo unlearn's runs; absent for trained runs and soups
    soup: dict[str, Any] | None = None  # a weight average's method, ingredients and choice (dgzoo soup)
    unlearning: dict[str, Any] | None = None  # an unlearning run's own metrics (dgzoo unlearn)

    _nested: ClassVar[dict[str, type[_Record]]] = {"dataset": DatasetRef, "selection": Selection, "timing": Timing}
    _nested_maps: ClassVar[dict[str, type[_Record]]] = {"selections": SelectionResult}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunResults:
        """Read any results.json layout written so far (see the module docstring); refuse newer ones."""
        version = data.get("format_version", LEGACY_FORMAT_VERSION) if isinstance(data, Mapping) else None
        if version is not None and _major(version) > _major(FORMAT_VERSION):
            raise DGZooError(
                f"results.json has format_version {version}, newer than this dgzoo reads "
                f"({FORMAT_VERSION}); upgrade dgzoo: pip install -U dgzoo"
            )
        results = super().from_json(data)
        if "format_version" not in data:
            # A 0.1 file: report its version, and write it back without inventing the key's position.
            results.format_version = LEGACY_FORMAT_VERSION
        return results

    @classmethod
    def of(cls, results: RunResults | Mapping[str, Any]) -> RunResults:
        """``results`` typed: itself, or a parsed results.json read with :meth:`from_json` (for readers that take
        either)."""
        return results if isinstance(results, RunResults) else cls.from_json(results)

    @classmethod
    def create(cls, fields: Mapping[str, Any]) -> RunResults:
        """A new run's results from the writer's fields, in the current format (``format_version`` last)."""
        return cls.from_json({**fields, "format_version": FORMAT_VERSION})

    def to_json(self) -> dict[str, Any]:
        """The JSON object; ``format_version`` is always written (a 0.1 file read back gains it, last)."""
        out = super().to_json()
        out["format_version"] = self.format_version
        return out

    @property
    def data_split_seed(self) -> int | None:
        """The seed of the run's data split: ``split_seed``, or ``seed`` in a file written before runs had both."""
        return self.seed if "split_seed" in self._absent else self.split_seed

    @property
    def is_soup(self) -> bool:
        """Whether the run is a weight average of other runs (``dgzoo soup``)."""
        return isinstance(self.soup, dict)

    @classmethod
    def load(cls, path: str | Path) -> RunResults:
        """Read ``path`` (a results.json file)."""
        return cls.from_json(json.loads(Path(path).read_text()))
