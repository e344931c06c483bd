"""What a sweep spec may say: the grid (datasets, algorithms, held-out domains, samples, trials), the recipe its runs
share, the search spaces and the ``slurm`` and ``soup`` sections, each checked with a one-line error naming the key.

:mod:`dgzoo.experiments.sweep` turns a checked :class:`SweepSpec` into runs; docs/sweeps.md describes the format.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..algorithms import parse_algorithm
from ..config import PLACEMENT_FIELDS, TrainConfig, load_yaml, training_search_space
from ..data import get_spec
from ..errors import DGZooError, suggest
from ..hparams import Distribution, Uniform, parse_distribution

TEST_DOMAIN_MODES = ("single", "single_and_pairs")

# Fields the sweep itself sets for every run; a spec's ``train`` section may not set them.
SWEEP_FIELDS = (
    "dataset",
    "algorithm",
    "target_domains",
    "source_domains",
    "seed",
    "split_seed",
    *PLACEMENT_FIELDS,
)
# The spec's ``slurm`` section (flags of the same names override it): key -> (type, meaning).
SLURM_KEYS: dict[str, tuple[type, str]] = {
    "partition": (str, "the Slurm partition"),
    "time": (int, "minutes per job (--time)"),
    "gpus": (int, "GPUs per run (--gpus-per-node)"),
    "cpus": (int, "CPUs per run (--cpus-per-task)"),
    "mem": (int, "memory per run in GB (--mem)"),
    "account": (str, "the account to charge (--account)"),
    "array_parallelism": (int, "most runs of the array at once (--array=...%N)"),
    "max_requeues": (
        int,
        "how often submitit requeues a job that ran out of time (default: 3; preemptions do not count)",
    ),
}


# ---------------------------------------------------------------------- search spaces

# Per-dataset replacements of the declared distributions (None: not searched). The declarations (HParam's
# ``search`` / ``small_search``, TrainConfig's field metadata) hold DomainBed's image-dataset and small-image
# distributions; only what a single dataset does differently lives here.
DATASET_SEARCH_SPACES: dict[str, dict[str, Distribution | None]] = {
    "domainnet": {"batch_size": Uniform(3, 5, base=2, integer=True)},
}


def search_space(
    algorithm: str, dataset: str, overrides: dict[str, Distribution | None] | None = None
) -> dict[str, Distribution]:
    """The distributions searched for ``algorithm`` on ``dataset``: training keys bare, algorithm keys namespaced.

    Layers, later winning: the declarations (TrainConfig's searched fields, then each component of
    ``host+addon...``, for small-image datasets their small-image distributions), :data:`DATASET_SEARCH_SPACES`,
    then the spec's ``overrides``. A ``None`` removes a key.
    """
    host, addons = parse_algorithm(algorithm)
    spec = get_spec(dataset)
    small = bool(spec and spec.small_images)
    space: dict[str, Distribution | None] = dict(training_search_space(small))
    for component in (host, *addons):
        for key, declared in component.HPARAMS.items():
            space[f"{component.name}.{key}"] = declared.search_for(small)
    space.update(DATASET_SEARCH_SPACES.get(spec.name if spec else dataset, {}))
    names = {host.name, *(a.name for a in addons)}
    for key, dist in (overrides or {}).items():
        namespace = key.rpartition(".")[0]
        if not namespace or namespace in names:  # keys of the sweep's other algorithms are not this one's
            space[key] = dist
    return {k: v for k, v in space.items() if v is not None}


def unsearched_hparams(algorithm: str, space: dict[str, Distribution]) -> list[str]:
    """Hyperparameters of ``algorithm`` with no distribution: every sample keeps the recipe's value."""
    host, addons = parse_algorithm(algorithm)
    return [f"{c.name}.{k}" for c in (host, *addons) for k in c.HPARAMS if f"{c.name}.{k}" not in space]


# ---------------------------------------------------------------------- the spec


@dataclass
class SweepSpec:
    """A sweep: which runs to train (the grid) and the recipe they share."""

    datasets: list[str]
    algorithms: list[str]
    output_dir: str
    test_domains: str | list[Any] = "single"
    n_hparams: int = 1
    n_trials: int = 3
    train: dict[str, Any] = field(default_factory=dict)
    search: dict[str, Distribution | None] = field(default_factory=dict)
    slurm: dict[str, Any] = field(default_factory=dict)
    soup: dict[str, Any] = field(default_factory=dict)  # soups built per cell after the runs (docs/soups.md)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "sweep spec", base_dir: Path | None = None) -> SweepSpec:
        """Build and validate a spec from a mapping; unknown keys are errors with a suggestion."""
        names = {f.name for f in fields(cls)}
        for key in values:
            if key not in names:
                raise DGZooError(
                    f"unknown key '{key}' in {source}{suggest(str(key), names)}; valid: {', '.join(sorted(names))}"
                )
        for key in ("datasets", "algorithms"):
            if not values.get(key):
                raise DGZooError(
                    f"{source} needs '{key}': a list, e.g. {key}: [{'rotated-digits' if key == 'datasets' else 'erm'}]"
                )
        train = dict(values.get("train") or {})
        if "config" in train:  # a recipe file the train section starts from
            recipe = Path(str(train.pop("config")))
            if base_dir is not None and not recipe.is_absolute() and (base_dir / recipe).exists():
                recipe = base_dir / recipe
            train = {**load_yaml(recipe), **train}
        for key in train:
            if str(key).replace("-", "_") in SWEEP_FIELDS:
                raise DGZooError(
                    f"'{key}' cannot be set in the train section of {source}: the sweep sets it for "
                    f"every run (use datasets, algorithms, test_domains, n_trials or output_dir)"
                )
        TrainConfig.from_dict(train, source=f"{source} train")  # unknown keys fail here
        search = {str(k): parse_distribution(v, str(k)) for k, v in (values.get("search") or {}).items()}
        train_fields = {f.name for f in fields(TrainConfig)}
        for key in search:
            if "." not in key and key not in train_fields:
                raise DGZooError(
                    f"search key '{key}' in {source} is neither a training setting"
                    f"{suggest(key, train_fields)} nor a namespaced algorithm hyperparameter "
                    f"(e.g. gga.rho)"
                )
            if key in SWEEP_FIELDS:
                raise DGZooError(f"search key '{key}' in {source} is set by the sweep itself and cannot be searched")
        counts = {}
        for key, default in (("n_hparams", 1), ("n_trials", 3)):
            value = values.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int):
                raise DGZooError(f"{key} in {source} must be an integer, got {value!r}")
            counts[key] = value
        slurm = check_slurm_options(values.get("slurm") or {}, f"the slurm section of {source}")
        soup = check_soup_section(values.get("soup"), f"the soup section of {source}")
        spec = cls(
            soup=soup,
            datasets=_str_list(values["datasets"]),
            algorithms=_str_list(values["algorithms"]),
            output_dir=str(values.get("output_dir") or ""),
            test_domains=values.get("test_domains", "single"),
            train=train,
            search=search,
            slurm=slurm,
            **counts,
        )
        if spec.n_hparams < 1 or spec.n_trials < 1:
            raise DGZooError(
                f"n_hparams ({spec.n_hparams}) and n_trials ({spec.n_trials}) in {source} must be >= 1; "
                f"n_hparams: 1 trains the defaults only"
            )
        if spec.test_domains is None or (isinstance(spec.test_domains, list) and not spec.test_domains):
            raise DGZooError(
                f"test_domains in {source} is empty; a sweep holds out a domain in every run: leave the key out "
                f"(default: single, each domain in turn), or give {' or '.join(TEST_DOMAIN_MODES)} or a list of domains"
            )
        if isinstance(spec.test_domains, str) and spec.test_domains not in TEST_DOMAIN_MODES:
            raise DGZooError(
                f"test_domains '{spec.test_domains}' in {source} is not one of "
                f"{', '.join(TEST_DOMAIN_MODES)} or a list{suggest(spec.test_domains, TEST_DOMAIN_MODES)}"
            )
        if not spec.output_dir:
            raise DGZooError(f"{source} needs an output_dir (or pass --output-dir)")
        return spec

    @classmethod
    def from_yaml(cls, path: str | Path, output_dir: str | None = None) -> SweepSpec:
        """Load a spec file; ``output_dir`` defaults to ``sweeps/<file name>``."""
        path = Path(path)
        if not path.is_file():
            raise DGZooError(f"sweep spec '{path}' not found; give the path of a YAML file (see docs/sweeps.md)")
        values = load_yaml(path)
        values["output_dir"] = output_dir or values.get("output_dir") or str(Path("sweeps") / path.stem)
        return cls.from_dict(values, source=f"sweep spec {path}", base_dir=path.parent)

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain values (distributions as text), for the manifest."""
        return {
            "datasets": self.datasets,
            "algorithms": self.algorithms,
            "output_dir": self.output_dir,
            "test_domains": self.test_domains,
            "n_hparams": self.n_hparams,
            "n_trials": self.n_trials,
            "train": self.train,
            "search": {k: None if v is None else str(v) for k, v in self.search.items()},
            "slurm": self.slurm,
            **({"soup": self.soup} if self.soup else {}),
        }


def check_slurm_options(values: dict[str, Any], source: str) -> dict[str, Any]:
    """Validate Slurm resources (the spec's ``slurm`` section or the flags): known keys, right types, positive."""
    if not isinstance(values, dict):
        raise DGZooError(f"{source} must be a mapping, e.g. slurm: {{partition: gpu, time: 240, gpus: 1}}")
    checked = {}
    for key, value in values.items():
        if key not in SLURM_KEYS:
            raise DGZooError(
                f"unknown key '{key}' in {source}{suggest(str(key), SLURM_KEYS)}; valid: {', '.join(SLURM_KEYS)}"
            )
        kind, meaning = SLURM_KEYS[key]
        if value is None:
            continue
        least = 0 if key in ("gpus", "max_requeues") else 1  # a CPU-only sweep asks for no GPU
        if kind is int and (isinstance(value, bool) or not isinstance(value, int) or value < least):
            raise DGZooError(f"{key} in {source} ({meaning}) must be an integer >= {least}, got {value!r}")
        checked[key] = kind(value)
    return checked


# The spec's ``soup`` section: key -> meaning (``dgzoo soup``'s flags of the same names).
SOUP_KEYS = {
    "methods": "soups to build per cell: uniform, greedy, top-k",
    "k": "top-k: how many ingredients",
    "bn_steps": "batches of the BatchNorm recomputation",
    "freeze_bn": "keep the averaged BatchNorm statistics",
}
SOUP_METHOD_NAMES = ("uniform", "greedy", "top-k")


def check_soup_section(values: Any, source: str) -> dict[str, Any]:
    """Validate a sweep spec's ``soup`` section (empty: no soups), e.g. ``{methods: [uniform, greedy]}``."""
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise DGZooError(f"{source} must be a mapping, e.g. soup: {{methods: [uniform, greedy]}}")
    for key in values:
        if key not in SOUP_KEYS:
            raise DGZooError(
                f"unknown key '{key}' in {source}{suggest(str(key), SOUP_KEYS)}; valid: {', '.join(SOUP_KEYS)}"
            )
    methods = _str_list(values.get("methods", ["uniform"]))
    for method in methods:
        if method not in SOUP_METHOD_NAMES:
            raise DGZooError(
                f"soup method '{method}' in {source} is not one of {', '.join(SOUP_METHOD_NAMES)}"
                f"{suggest(method, SOUP_METHOD_NAMES)}"
            )
    checked: dict[str, Any] = {"methods": methods}
    for key in ("k", "bn_steps"):
        value = values.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise DGZooError(f"{key} in {source} ({SOUP_KEYS[key]}) must be a whole number, got {value!r}")
        if value is not None:
            checked[key] = value
    if ("top-k" in methods) != ("k" in checked):
        raise DGZooError(f"{source}: k goes with the top-k method (methods: [top-k], k: 5)")
    if values.get("freeze_bn") is not None:
        checked["freeze_bn"] = bool(values["freeze_bn"])
    return checked


def _str_list(value: Any) -> list[str]:
    return [str(v) for v in (value if isinstance(value, (list, tuple)) else [value])]
