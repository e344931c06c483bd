"""One dataclass holds every field of a training recipe.

Over 500 lines for one job: about half the file is the fields themselves, each with its help text, which the flags,
the YAML reader and the docs are all generated from.

A recipe is built in three layers, later ones winning: the defaults below (the embedded ``rotated-digits``
job), a YAML file given with ``--config``, and command-line flags. The same fields back ``recipes/train.py``
and ``dgzoo train``; the flags are generated from the dataclass so the two can never drift apart.
Unknown keys are errors with a suggestion, never silently ignored.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import re
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .errors import DGZooError, suggest
from .hparams import SAME, Choice, Distribution, Uniform, parse_scalar

OPTIMIZERS = ("adam", "adamw", "sgd")
LR_SCHEDULES = ("constant", "cosine")
AUGMENTATIONS = ("auto", "domainbed", "randaugment", "none")
PRECISIONS = ("no", "fp16", "bf16")
SELECTIONS = ("training_domain_validation", "oracle", "last")
# Where a run is written and published, never what it computes: the fields every tool that repeats, compares or
# re-homes a run (sweeps, soups, the card's command) sets or leaves out itself.
PLACEMENT_FIELDS = (
    "output_dir",
    "overwrite",
    "resume",
    "push_to_hub",
    "hub_private",
    "hub_revision",
)
# Fields that do not change what a run computes: runs that differ only in these are the same run.
NON_RESULT_FIELDS = (
    *PLACEMENT_FIELDS,
    "num_workers",
    "log_with",
    "eval_batch_size",
    "keep_checkpoints",
    "checkpoint_every",
    "dry_run",
    "channels_last",
    "compile",
)


# The block of train_config.json recording the code, the data and the values given before dgzoo resolved them
# (dgzoo.run.provenance); read back as a record, never as a setting.
PROVENANCE_KEY = "provenance"


def recipe_dirs() -> list[Path]:
    """Where named recipes live: ./recipes/configs, then the one next to the installed package (a checkout)."""
    return [Path.cwd() / "recipes" / "configs", Path(__file__).resolve().parent.parent / "recipes" / "configs"]


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=functools.partial(type(default), default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    """Every setting of a dgzoo training run. Defaults train ERM on the embedded rotated-digits dataset."""

    # -- data
    dataset: str = _f("rotated-digits", "registry name (see `dgzoo datasets list`), Hub repo id, or local path")
    revision: str | None = _f(None, "dataset revision (branch, tag or commit sha) for Hub datasets")
    target_domains: list[str] | None = _f(None, "held-out domains (leave-domains-out); the rest are sources")
    source_domains: list[str] | None = _f(None, "train only on these domains (one domain = single-source)")
    holdout_fraction: float = _f(0.2, "fraction of every domain held out as its validation ('out') split")
    split_seed: int | None = _f(None, "seed of the in/out splits (DomainBed's trial seed); defaults to --seed")
    image_size: int | None = _f(None, "input resolution; defaults to the dataset's native size, else the backbone's")
    augment: str = _f(
        "auto",
        "training augmentation: domainbed, randaugment, none, or auto (the dataset's default)",
        choices=AUGMENTATIONS,
    )
    image_column: str | None = _f(None, "image column name (default: the registry's, else 'image')")
    label_column: str | None = _f(None, "label column name (default: the registry's, else 'label')")
    domain_column: str | None = _f(None, "domain column name (default: the registry's, else 'domain')")
    # -- model
    backbone: str = _f("resnet18", "any timm model name, e.g. resnet50.tv_in1k or vit_small_patch16_224")
    pretrained: bool = _f(False, "start from the backbone's pretrained weights (downloads from the Hub)")
    freeze_bn: bool = _f(False, "keep BatchNorm running statistics fixed (DomainBed's paper setting)")
    init_from: str | None = _f(
        None,
        "start from this checkpoint's weights, head included (its label names must be "
        "the dataset's): a run directory or a Hub repo REPO@REV; a sweep's runs then "
        "share one initialisation",
    )
    dropout: float = _f(0.0, "dropout before the classifier head", search=Choice((0.0, 0.1, 0.5)))
    # -- algorithm
    algorithm: str = _f("erm", "algorithm, optionally with add-ons: erm, erm+gga, equilibrium+gga+iu, ...")
    hparams: dict[str, Any] = _f({}, "algorithm hyperparameters KEY=VALUE; add-on keys are namespaced (gga.rho=1e-5)")
    # -- optimisation
    steps: int = _f(
        400,
        "number of training steps (the default is the first job's: held-out accuracy on "
        "rotated-digits stops improving by step 400; recipes for real datasets set their own)",
    )
    batch_size: int = _f(
        32,
        "images per source domain per step (global, split across processes)",
        search=Uniform(3, 5.5, base=2, integer=True),
        small_search=Uniform(3, 9, base=2, integer=True),
    )
    lr: float = _f(1e-3, "learning rate", search=Uniform(-5, -3.5, base=10), small_search=Uniform(-4.5, -2.5, base=10))
    optimizer: str = _f("adam", "optimizer", choices=OPTIMIZERS)
    weight_decay: float = _f(0.0, "weight decay", search=Uniform(-6, -2, base=10), small_search=None)
    momentum: float = _f(0.9, "SGD momentum")
    lr_schedule: str = _f(
        "constant", "learning-rate schedule (timm's), stepped every training step", choices=LR_SCHEDULES
    )
    warmup_steps: int = _f(0, "steps of linear learning-rate warm-up from 0 before the schedule")
    grad_accumulation: int = _f(
        1,
        "split every step's batch into N micro-batches whose gradients are accumulated "
        "(loss hosts; same optimisation, less memory)",
    )
    clip_grad_norm: float | None = _f(None, "clip the gradient norm before every optimizer step to this value")
    seed: int = _f(0, "seed of initialisation, data order and augmentation")
    mixed_precision: str = _f("no", "mixed precision mode passed to Accelerate", choices=PRECISIONS)
    channels_last: bool = _f(
        False,
        "keep the network's weights and input images in channels-last memory format "
        "(faster convolutions on GPUs; same numbers up to float rounding)",
    )
    compile: bool = _f(
        False,
        "torch.compile the network (slower first steps, faster after; refused for "
        "algorithms that cannot be compiled, see docs/performance.md)",
    )
    # -- evaluation and checkpoints
    eval_every: int = _f(100, "evaluate every domain's in/out splits every N steps")
    eval_batch_size: int = _f(128, "evaluation batch size per process")
    checkpoint_every: int | None = _f(
        None, "save a resumable Accelerate checkpoint every N steps (default: eval_every)"
    )
    keep_checkpoints: int = _f(2, "resumable checkpoints to keep (two: a corrupt newest one has an intact fallback)")
    selection: str = _f("training_domain_validation", "which step's weights the run exports", choices=SELECTIONS)
    # -- runtime and output
    num_workers: int | None = _f(
        None,
        "data-loading workers per process (default: from the CPUs this process may use; "
        "on CPU only the cores torch's compute threads leave idle)",
    )
    output_dir: str | None = _f(
        None, "run directory (default: runs/<dataset>-<backbone>-<algorithm>-<targets>-seed<seed>)"
    )
    overwrite: bool = _f(False, "replace an existing run in --output-dir")
    resume: bool = _f(False, "continue the run in --output-dir from its last checkpoint")
    log_with: str = _f("auto", "Accelerate trackers: auto (TensorBoard when installed), none, or a tracker name")
    push_to_hub: str | None = _f(None, "after training, publish the run to this Hub repo id")
    hub_private: bool = _f(False, "create the Hub repo as private")
    hub_revision: str | None = _f(None, "Hub branch to push to (created if missing); default: main")
    dry_run: bool = _f(
        False,
        "print the resolved plan (data, splits, image size, model, every hyperparameter, schedule, "
        "estimated time from a few timed steps) and exit, training and writing nothing",
    )

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> TrainConfig:
        """Build a config from a mapping, rejecting unknown keys with a suggestion."""
        cfg = cls()
        cfg.update(values, source=source)
        return cfg

    def update(self, values: dict[str, Any], source: str = "config") -> None:
        """Override fields from a mapping (YAML or CLI). ``hparams`` entries are merged key by key."""
        names = {f.name: f for f in fields(self)}
        for key, value in values.items():
            name = str(key).replace("-", "_")
            if name == PROVENANCE_KEY and isinstance(value, dict):
                # What a run recorded about its code and data (train_config.json), not a setting: kept apart so
                # training can say when it will not repeat that run bit for bit (dgzoo.run.provenance).
                self.recorded_provenance = value
                continue
            if name not in names:
                raise DGZooError(
                    f"unknown {source} key '{key}'{suggest(name, names)}; run `dgzoo train --help` for the valid keys"
                )
            if name == "hparams":
                self.hparams = {**self.hparams, **normalize_hparams(value, source)}
            else:
                setattr(self, name, _coerce(names[name], value, source))

    @classmethod
    def from_yaml(cls, path: str | Path) -> TrainConfig:
        """Load a recipe YAML file (a path, or the name of a file in recipes/configs)."""
        cfg = cls()
        cfg.update(load_yaml(path), source=f"config file {path}")
        return cfg

    # ------------------------------------------------------------------ derived values
    def resolved_split_seed(self) -> int:
        return self.seed if self.split_seed is None else self.split_seed

    def resolved_checkpoint_every(self) -> int:
        return self.checkpoint_every or self.eval_every

    def default_output_dir(self, target_domains: list[str] | None = None) -> str:
        targets = target_domains or self.target_domains or ["none"]
        slug = "-".join(
            [
                Path(self.dataset).name,
                self.backbone,
                self.algorithm.replace("+", "_"),
                "_".join(targets),
                f"seed{self.seed}",
            ]
        )
        return str(Path("runs") / re.sub(r"[^A-Za-z0-9._-]+", "_", slug))

    def validate(self) -> None:
        """Check every field that can be checked without loading data or models."""
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise DGZooError(f"--{f.name.replace('_', '-')} is {value}; give a finite number")
        positive = {
            "steps": self.steps,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "eval_every": self.eval_every,
            "eval_batch_size": self.eval_batch_size,
            "keep_checkpoints": self.keep_checkpoints,
        }
        for name, value in positive.items():
            if value <= 0:
                raise DGZooError(f"--{name.replace('_', '-')} must be positive, got {value}")
        if self.warmup_steps < 0 or self.warmup_steps >= self.steps:
            raise DGZooError(f"--warmup-steps must be in [0, --steps), got {self.warmup_steps}")
        if self.grad_accumulation < 1:
            raise DGZooError(f"--grad-accumulation must be at least 1, got {self.grad_accumulation}")
        if self.batch_size % self.grad_accumulation:
            raise DGZooError(
                f"--batch-size {self.batch_size} must be divisible by --grad-accumulation "
                f"{self.grad_accumulation} (each micro-batch holds batch-size / N images per domain)"
            )
        if self.clip_grad_norm is not None and not self.clip_grad_norm > 0:
            raise DGZooError(f"--clip-grad-norm must be positive, got {self.clip_grad_norm}; omit it to not clip")
        if self.checkpoint_every is not None and self.checkpoint_every <= 0:
            raise DGZooError(f"--checkpoint-every must be positive, got {self.checkpoint_every}")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise DGZooError(f"--holdout-fraction must be in (0, 1), got {self.holdout_fraction}")
        for name in (
            "seed",
            "split_seed",
        ):  # numpy and torch seed with 0 .. 2**32-1; refused before anything is written
            value = getattr(self, name)
            if value is not None and not 0 <= value < 2**32:
                raise DGZooError(
                    f"--{name.replace('_', '-')} must be in [0, 2**32), got {value}; use e.g. "
                    f"--{name.replace('_', '-')} {abs(value) % 2**32}"
                )
        if not 0.0 <= self.dropout < 1.0:
            raise DGZooError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.weight_decay < 0:
            raise DGZooError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if self.image_size is not None and self.image_size < 8:
            raise DGZooError(f"--image-size must be at least 8 pixels, got {self.image_size}")
        if self.num_workers is not None and self.num_workers < 0:
            raise DGZooError(f"--num-workers must be >= 0, got {self.num_workers}")
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                value = getattr(self, f.name)
                raise DGZooError(
                    f"--{f.name.replace('_', '-')} '{value}' is not one of {', '.join(choices)}"
                    f"{suggest(str(value), choices)}"
                )
        if self.resume and self.overwrite:
            raise DGZooError("--resume and --overwrite contradict each other; pass only one")
        if not self.algorithm or any(not part for part in self.algorithm.split("+")):
            raise DGZooError(f"--algorithm '{self.algorithm}' is malformed; write NAME or NAME+ADDON, e.g. erm+gga")
        if self.target_domains and self.source_domains:
            both = sorted(set(self.target_domains) & set(self.source_domains))
            if both:
                raise DGZooError(f"domain(s) {', '.join(both)} are both source and target; a domain can only be one")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class UnlearnConfig:
    """Every setting of an unlearning run (``dgzoo unlearn``). ``None`` means: take the source run's value.

    The ``dgzoo unlearn`` flags are generated from these fields (:func:`add_dataclass_arguments`); ``source`` (the
    positional argument) and ``forget`` (a repeated flag) are written by the command itself."""

    source: str
    forget: str
    method: str = _f("sure", "unlearning method; retrain is the gold standard (default: sure)")
    revision: str | None = _f(None, "revision of a Hub source (branch, tag or commit sha)")
    steps: int | None = _f(None, "unlearning steps (default: 10%% of the source run's; retrain: all of them)")
    batch_size: int | None = _f(None, "retain images per source domain per step (default: the source run's)")
    forget_batch_size: int | None = _f(None, "forget (and validation) images per step (default: --batch-size)")
    lr: float | None = _f(None, "learning rate (default: the source run's)")
    optimizer: str | None = _f(None, "optimizer (default: the source run's)", choices=OPTIMIZERS)
    weight_decay: float | None = _f(None, "weight decay (default: the source run's)")
    seed: int | None = _f(None, "seed of the data order and of fractional forget sets (default: the source run's)")
    validation_fraction: float = _f(
        0.5,
        "share of the unseen source images given to the methods as validation; the "
        "rest is the untouched test set (default: 0.5)",
    )
    hparams: dict[str, Any] = _f({}, "method hyperparameters, e.g. lambda=0.5 disc_hidden=0 (see docs/unlearning.md)")
    reference: str | None = _f(
        None, "run directory of `--method retrain` for the same source and forget set: every metric is compared with it"
    )
    output_dir: str | None = _f(None, "run directory (default: runs/<source>-unlearn-<method>-<forget>)")
    overwrite: bool = _f(False, "replace an existing run in --output-dir")
    eval_batch_size: int = _f(128, "evaluation batch size (default: 128)")
    num_workers: int | None = _f(None, "data-loading workers (default: 0 on CPU, 4 on GPU)")
    mixed_precision: str = _f("no", "passed to Accelerate", choices=PRECISIONS)
    push_to_hub: str | None = _f(None, "publish the unlearned run to this Hub repo", metavar="REPO_ID")
    hub_private: bool = _f(False, "create the Hub repo as private")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------- helpers


SEARCH_ORDER = ("lr", "batch_size", "weight_decay", "dropout")  # how sweeps list the training distributions


def training_search_space(small_images: bool = False) -> dict[str, Distribution]:
    """DomainBed's random-search distributions of the recipe fields every algorithm trains with (``lr``,
    ``batch_size``, ``weight_decay``, ``dropout``: its ``resnet_dropout``), for image or small-image datasets."""
    space = {}
    for f in sorted(fields(TrainConfig), key=lambda f: SEARCH_ORDER.index(f.name) if f.name in SEARCH_ORDER else 99):
        dist = f.metadata.get("search")
        if small_images and f.metadata.get("small_search", SAME) is not SAME:
            dist = f.metadata["small_search"]
        if dist is not None:
            space[f.name] = dist
    return space


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a recipe file. A bare name such as ``pacs_resnet50_erm`` is looked up in recipes/configs."""
    candidate = Path(path)
    if not candidate.exists() and candidate.suffix == "" and candidate.parent == Path("."):
        for root in recipe_dirs():
            if (root / f"{path}.yaml").exists():
                candidate = root / f"{path}.yaml"
                break
    if not candidate.exists():
        known = sorted({p.stem for root in recipe_dirs() if root.exists() for p in root.glob("*.yaml")})
        raise DGZooError(
            f"config file '{path}' not found{suggest(str(path), known)}; "
            f"give a YAML path or one of: {', '.join(known) or 'none'}"
        )
    try:
        data = yaml.safe_load(candidate.read_text()) or {}
    except yaml.YAMLError as e:
        raise DGZooError(
            f"config file {candidate} is not valid YAML ({str(e).splitlines()[0]}); fix its syntax"
        ) from None
    if not isinstance(data, dict):
        raise DGZooError(f"config file {candidate} must hold a mapping of keys to values, got {type(data).__name__}")
    return data


def normalize_hparams(value: Any, source: str = "config") -> dict[str, Any]:
    """Accept hparams as ``{'gga': {'rho': 1e-5}}``, ``{'gga.rho': 1e-5}`` or ``['gga.rho=1e-5', ...]``."""
    if value is None:
        return {}
    if isinstance(value, str):
        value = value.split()
    if isinstance(value, (list, tuple)):
        out: dict[str, Any] = {}
        for item in value:
            if "=" not in str(item):
                raise DGZooError(f"hparam '{item}' in {source} is not KEY=VALUE; write e.g. gga.rho=1e-5")
            key, raw = str(item).split("=", 1)
            out[key.strip()] = parse_scalar(raw)
        return out
    if isinstance(value, dict):
        out = {}
        for key, inner in value.items():
            if isinstance(inner, dict):
                out.update({f"{key}.{k}": v for k, v in normalize_hparams(inner, source).items()})
            else:
                out[str(key)] = inner
        return out
    raise DGZooError(f"hparams in {source} must be a mapping or KEY=VALUE list, got {type(value).__name__}")


def _base_type(tp: Any) -> tuple[Any, bool]:
    """Return (inner type, optional?) for annotations such as ``int | None``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


@functools.cache
def _field_types() -> dict[str, Any]:
    """TrainConfig's resolved field annotations (resolving them is slow, and they never change)."""
    return typing.get_type_hints(TrainConfig)


def _coerce(f: dataclasses.Field, value: Any, source: str) -> Any:
    tp, optional = _base_type(_field_types()[f.name])
    flag = f"'{f.name}' in {source}" if "command line" not in source else f"--{f.name.replace('_', '-')}"
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise DGZooError(f"{flag} cannot be empty")
    origin = typing.get_origin(tp)
    try:
        if origin is list:
            items = value if isinstance(value, (list, tuple)) else str(value).replace(",", " ").split()
            return [str(v) for v in items]
        if tp is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "yes", "1"):
                return True
            if str(value).lower() in ("false", "no", "0"):
                return False
            raise ValueError(value)
        if tp in (int, float) and isinstance(value, bool):
            raise ValueError(value)  # YAML's `steps: true` is a typo, not the number 1
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if tp is float:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        name = getattr(tp, "__name__", str(tp))
        raise DGZooError(f"{flag} must be {name}, got {value!r}") from None


# ---------------------------------------------------------------------- command line


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--config`` and one flag per TrainConfig field. Flags default to 'not given' so YAML values survive."""
    parser.add_argument("--config", help="recipe YAML file, or a recipe name from recipes/configs")
    add_dataclass_arguments(parser, TrainConfig, given_only=True)


def add_dataclass_arguments(
    parser: argparse.ArgumentParser,
    cls: type,
    given_only: bool = False,
    skip: tuple[str, ...] = (),
    choices: dict[str, Any] | None = None,
) -> None:
    """Add one flag per field of the dataclass ``cls`` (``--batch-size`` for ``batch_size``), its help from the
    field's metadata (:func:`_f`), so a config class and its command line cannot drift apart.

    ``given_only`` (TrainConfig: flags merged over a YAML file) leaves a flag not given out of the namespace, adds
    ``--no-FLAG`` to booleans, and leaves type checks and choices to the config's own validation. Otherwise
    (UnlearnConfig) a flag not given holds the field's default, booleans are plain switches, and argparse
    converts ints and floats and checks the metadata's ``choices`` (or those given here: a choice list that
    lives in a higher layer, such as the unlearning methods). ``skip``: fields the caller adds itself."""
    hints = _field_types() if cls is TrainConfig else typing.get_type_hints(cls)
    for f in fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        tp, _ = _base_type(hints[f.name])
        help_text = f.metadata.get("help", "")
        default = f.default_factory() if callable(f.default_factory) else f.default  # every field has one of them
        kw: dict[str, Any] = {"dest": f.name, "default": default, "help": help_text}
        if given_only:
            kw.update(
                default=argparse.SUPPRESS,
                help=help_text + (f" (default: {default})" if default not in (None, [], {}) else ""),
            )
        elif (choices or {}).get(f.name) or f.metadata.get("choices"):
            kw["choices"] = (choices or {}).get(f.name) or f.metadata["choices"]
        if "metavar" in f.metadata:
            kw["metavar"] = f.metadata["metavar"]
        if f.name == "hparams":
            if not given_only:
                kw["default"] = []  # what the command reads its KEY=VALUE list from when none is given
            parser.add_argument(flag, nargs="+", metavar="KEY=VALUE", **kw)
        elif tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction if given_only else "store_true", **kw)
        elif typing.get_origin(tp) is list:
            parser.add_argument(flag, nargs="+", metavar="DOMAIN", **kw)
        elif given_only:
            parser.add_argument(flag, metavar=f.name.upper(), **kw)
        else:
            parser.add_argument(flag, **kw, **({"type": tp} if tp in (int, float) else {}))


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Merge defaults, the ``--config`` file and the flags actually given, then validate."""
    cfg = TrainConfig.from_yaml(args.config) if getattr(args, "config", None) else TrainConfig()
    given = {k: v for k, v in vars(args).items() if k in {f.name for f in fields(TrainConfig)}}
    cfg.update(given, source="command line")
    cfg.validate()
    return cfg


def changed_fields(
    saved: dict[str, Any], current: dict[str, Any], ignore: Any = NON_RESULT_FIELDS
) -> tuple[list[str], str]:
    """The recipe fields (outside ``ignore``) whose value in ``current`` differs from a saved run's, and a
    ``field: old -> new, ...`` description of them for an error message."""
    defaults = TrainConfig().to_dict()  # a field added since the run was saved holds its default there
    saved = {**{k: v for k, v in defaults.items() if k not in saved}, **saved}
    # A run records the values it resolved (a commit sha for a branch, the derived held-out domains...) and, in
    # its provenance block, what was given instead: either one is the same recipe.
    recorded = saved.get(PROVENANCE_KEY)
    given = (recorded.get("given") or {}) if isinstance(recorded, dict) else {}
    changed = sorted(
        k
        for k in current
        if k not in ignore and saved.get(k) != current[k] and given.get(k, saved.get(k)) != current[k]
    )
    return changed, ", ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in changed)


def dump_config(
    cfg: TrainConfig, resolved: dict[str, Any] | None = None, provenance: dict[str, Any] | None = None
) -> str:
    """The recipe as JSON (written to the run directory, so a run can be repeated exactly): ``resolved`` (the
    config with what the run resolved written in) when given, plus the ``provenance`` block (code, data, and the
    given value of every field that was resolved)."""
    values = cfg.to_dict()
    out = dict(resolved) if resolved is not None else dict(values)
    if provenance is not None:
        given = {k: v for k, v in values.items() if out.get(k) != v}
        out[PROVENANCE_KEY] = {**provenance, "given": given}
    return json.dumps(out, indent=2, sort_keys=False)
