"""Planning an unlearning run: every check before anything is written.

:func:`plan_unlearning` loads the source run (:mod:`~dgzoo.unlearning.source`) and the data it trained on, draws the
forget / retain / validation / test sets, resolves the method's hyperparameters and the optimisation settings (the
source run's values fill whatever the config leaves open), checks the retrained reference and the output directory,
and returns an :class:`UnlearnPlan` that :func:`~dgzoo.unlearning.recipe.unlearn` runs.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..algorithms import Recipe, check_algorithm
from ..config import OPTIMIZERS, PRECISIONS, TrainConfig, UnlearnConfig
from ..data import DGDataset, load_dg_dataset, make_splits
from ..errors import DGZooError
from ..models import meta_backbone
from ..run.rundir import check_output_dir, read_json
from ..training.plan import is_small_images, resolve_augment
from .forget import UnlearningData, parse_forget_spec, split_for_unlearning
from .methods import METHODS, resolve_method_hparams
from .source import Source, load_source

DEFAULT_STEP_FRACTION = 0.1  # unlearning steps, as a fraction of the source run's steps, when --steps is not given
DEFAULT_LR_SCALE = 0.3  # unlearning learning rate, as a multiple of the source run's, when --lr is not given


@dataclass
class UnlearnPlan:
    """A validated unlearning run: config plus everything resolved from it, before any side effect."""

    config: UnlearnConfig
    source: Source
    data: DGDataset
    sets: UnlearningData
    method_hparams: dict[str, Any]
    settings: dict[str, Any]  # resolved steps, batch sizes, optimizer...
    rows: dict[str, np.ndarray]  # the rows of each training set the method draws from
    reference: dict[str, Any] | None
    output_dir: Path
    loop: tuple[str, dict[str, dict[str, Any]], dict[str, np.ndarray]] | None = None  # training-loop methods:
    # (algorithm, its resolved hparams, training rows per domain)


def _check_not_source(out: Path, source: str) -> None:
    """Refuse to write the unlearned run over the run it reads from: ``--overwrite`` would delete the source."""
    local = Path(source.removeprefix("local-dir:")).expanduser()
    if local.is_dir() and out.resolve() == local.resolve():
        raise DGZooError(
            f"--output-dir {out} is the source run itself; writing there would replace the run being "
            f"unlearned; choose another --output-dir (or leave it out for the default)"
        )


def plan_unlearning(cfg: UnlearnConfig) -> UnlearnPlan:
    """Validate an unlearning run completely (loading the source and its data) without writing anything."""
    spec = parse_forget_spec(cfg.forget)
    method_hparams = resolve_method_hparams(cfg.method, cfg.hparams)
    _check_values(cfg)
    out = Path(cfg.output_dir or _default_output_dir(cfg, spec.text))
    _check_not_source(out, cfg.source)
    check_output_dir(out, resume=False, overwrite=cfg.overwrite, can_resume=False)
    source = load_source(cfg.source, cfg.revision)
    tc, res = source.train_config, source.results
    data = load_dg_dataset(
        tc.dataset, res["dataset"].get("revision") or tc.revision, tc.image_column, tc.label_column, tc.domain_column
    )
    if list(data.class_names) != list(res["class_names"]):
        raise DGZooError(
            f"the classes of {tc.dataset} changed since the source run was trained; unlearn with the "
            f"dataset revision it used (--revision of the run's dataset)"
        )
    sources, targets = list(res["source_domains"]), list(res["target_domains"])
    splits = make_splits(data, tc.holdout_fraction, tc.resolved_split_seed())
    seed = tc.seed if cfg.seed is None else cfg.seed
    previously = np.asarray(res.get("unlearning", {}).get("forgotten_rows", []), dtype=np.int64)
    sets = split_for_unlearning(
        spec, data, splits, sources, targets, cfg.validation_fraction, tc.resolved_split_seed(), seed, previously
    )
    hp = res.get("hparams", {})
    image_size = hp.get("image_size", tc.image_size)
    augment = hp.get("augment") or resolve_augment(tc, data)
    if cfg.method in METHODS:
        method_hparams = METHODS[cfg.method].resolve_hparams(method_hparams, spec.scenario)
    settings = _settings(cfg, tc, len(sources), seed)
    settings.update(image_size=image_size, augment=augment)
    rows = {"retain": sets.retain, "forget": sets.forget}
    if cfg.method == "sure":
        rows["validation"] = _sure_validation(sets, method_hparams["validation"])
    reference = _load_reference(cfg.reference, sets) if cfg.reference else None
    loop = _loop_plan(cfg, tc, data, sets, sources, augment, image_size)
    return UnlearnPlan(cfg, source, data, sets, method_hparams, settings, rows, reference, out, loop)


def _loop_plan(
    cfg: UnlearnConfig,
    tc: TrainConfig,
    data: DGDataset,
    sets: UnlearningData,
    sources: list[str],
    augment: str,
    image_size: int | None,
) -> tuple[str, dict[str, dict[str, Any]], dict[str, np.ndarray]] | None:
    """What a method that is plain training runs on the training loop, checked now: retrain repeats the source's
    algorithm on the retained rows of each source domain; a method with a ``training_algorithm`` (finetune: ERM)
    trains it on the retain set as one domain. None for the other methods."""
    if cfg.method == "retrain":
        algorithm, given = tc.algorithm, tc.hparams

        def of_domain(domain: str) -> np.ndarray:
            return sets.retain[data.domain_of_row[sets.retain] == data.domains.index(domain)]

        rows = {d: r for d, r in ((d, of_domain(d)) for d in sources) if len(r)}
    elif training_algorithm := METHODS[cfg.method].training_algorithm:
        algorithm, given, rows = training_algorithm, {}, {"retain": sets.retain}
    else:
        return None
    recipe = Recipe(
        num_domains=len(rows),
        num_classes=data.num_classes,
        augment=augment,
        mixed_precision=cfg.mixed_precision,
        small_images=is_small_images(data),
        network=meta_backbone(tc.backbone, data.num_classes, image_size, tc.dropout),
        pretrained=tc.pretrained,
    )
    return algorithm, check_algorithm(algorithm, given, recipe), rows


def _check_values(cfg: UnlearnConfig) -> None:
    positive = {
        "steps": cfg.steps,
        "batch_size": cfg.batch_size,
        "forget_batch_size": cfg.forget_batch_size,
        "lr": cfg.lr,
        "eval_batch_size": cfg.eval_batch_size,
    }
    for name, value in positive.items():
        if value is not None and value <= 0:
            raise DGZooError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if not 0.0 < cfg.validation_fraction < 1.0:
        raise DGZooError(f"--validation-fraction must be in (0, 1), got {cfg.validation_fraction}")
    if cfg.optimizer is not None and cfg.optimizer not in OPTIMIZERS:
        raise DGZooError(f"--optimizer '{cfg.optimizer}' is not one of {', '.join(OPTIMIZERS)}")
    if cfg.mixed_precision not in PRECISIONS:
        raise DGZooError(f"--mixed-precision '{cfg.mixed_precision}' is not one of {', '.join(PRECISIONS)}")
    if cfg.weight_decay is not None and cfg.weight_decay < 0:
        raise DGZooError(f"--weight-decay must be >= 0, got {cfg.weight_decay}")


def _settings(cfg: UnlearnConfig, tc: TrainConfig, num_sources: int, seed: int) -> dict[str, Any]:
    """Resolved optimisation settings; the source run's values fill whatever the config leaves open."""
    retrain = cfg.method == "retrain"
    steps = cfg.steps or (tc.steps if retrain else max(1, round(DEFAULT_STEP_FRACTION * tc.steps)))
    batch_size = cfg.batch_size or tc.batch_size
    lr = cfg.lr or (tc.lr if retrain else DEFAULT_LR_SCALE * tc.lr)
    settings = {
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "optimizer": cfg.optimizer or tc.optimizer,
        "weight_decay": tc.weight_decay if cfg.weight_decay is None else cfg.weight_decay,
        "momentum": tc.momentum,
        "seed": seed,
        "validation_fraction": cfg.validation_fraction,
        "freeze_bn": tc.freeze_bn,
        "mixed_precision": cfg.mixed_precision,
    }
    if retrain:
        settings.update(algorithm=tc.algorithm, lr_schedule=tc.lr_schedule)
    else:
        settings.update(
            retain_batch_size=batch_size * num_sources, forget_batch_size=cfg.forget_batch_size or batch_size
        )
    return settings


def _sure_validation(sets: UnlearningData, choice: str) -> np.ndarray:
    if choice == "retained" and not sets.classes:
        raise DGZooError(
            f"sure.validation=retained keeps the classes not forgotten, but --forget {sets.spec.text} "
            f"names no class; use matched or all"
        )
    rows = {"matched": sets.matched_validation, "retained": sets.retained_validation, "all": sets.validation}[choice]
    if len(rows) == 0:
        raise DGZooError(
            f"SURE's validation set ({choice} unseen images for --forget {sets.spec.text}) is empty; "
            f"raise --validation-fraction or pass --hparams validation=all"
        )
    return rows


def fingerprint(sets: UnlearningData) -> str:
    """A hash of the forget, test and matched-test rows: runs with equal fingerprints are comparable."""
    digest = hashlib.sha256()
    for rows in (sets.forget, sets.test, sets.matched_test):
        digest.update(np.asarray(rows, dtype=np.int64).tobytes())
        digest.update(b"|")
    return digest.hexdigest()[:16]


def _load_reference(name: str, sets: UnlearningData) -> dict[str, Any]:
    path = Path(name).expanduser() / "results.json"
    if not path.is_file():
        raise DGZooError(
            f"--reference {name} is not a finished run directory (no results.json); give the output "
            f"of `dgzoo unlearn SOURCE --forget ... --method retrain`"
        )
    results = read_json(path)
    info = results.get("unlearning") or {}
    if info.get("method") != "retrain":
        raise DGZooError(
            f"--reference {name} is not a retrained model (method: {info.get('method', 'none')}); "
            f"give the output of `dgzoo unlearn SOURCE --forget ... --method retrain`"
        )
    if info.get("fingerprint") != fingerprint(sets):
        raise DGZooError(
            f"--reference {name} forgot a different set or was evaluated on different data "
            f"(forget '{info.get('forget_spec')}'); retrain with the same source and --forget"
        )
    return results


def _default_output_dir(cfg: UnlearnConfig, spec_text: str) -> str:
    base = Path(cfg.source.rstrip("/")).name
    slug = f"{base}-unlearn-{cfg.method}-{spec_text}"
    return str(Path("runs") / re.sub(r"[^A-Za-z0-9._-]+", "_", slug))
