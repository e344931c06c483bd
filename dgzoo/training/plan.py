"""Planning a training run: every check of a recipe before anything is written.

:func:`plan_run` validates the config, the backbone, the algorithm and its hyperparameters (against the backbone
itself, built on the meta device), the dataset and its images, the domains, the output directory and, for a resume,
that the recipe and the data are the ones the checkpoint was trained with; it returns the :class:`RunPlan` that
:func:`dgzoo.training.engine.train` runs and :mod:`dgzoo.training.dryrun` prints. Moved out of the engine unchanged;
the engine re-exports these names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..algorithms import (
    AddOn,
    Algorithm,
    Recipe,
    Schedule,
    check_algorithm,
    flat_hparams,
    parse_algorithm,
    resolve_hparams,
    schedule_warnings,
)
from ..config import NON_RESULT_FIELDS, TrainConfig, changed_fields, dump_config
from ..data import (
    DGDataset,
    DomainSplits,
    Protocol,
    check_images,
    load_dg_dataset,
    make_splits,
    resolve_protocol,
)
from ..errors import DGZooError
from ..models import check_backbone, meta_backbone
from ..run.hub import check_push_target
from ..run.provenance import provenance_block, resolved_config
from ..run.rundir import check_output_dir, read_json, run_done
from .datachecks import check_classes
from .derived import Derived, derived_values, resolve_image_size
from .fastpath import check_compile
from .initialisation import InitSource, resolve_init
from .resume import check_resume, recorded_data

# Settings a resumed run may change without invalidating its checkpoint: more steps, and what changes no result.
RESUMABLE_CHANGES = {*NON_RESULT_FIELDS, "steps"}


@dataclass
class RunPlan:
    """A validated recipe: the config plus everything resolved from it, before any side effect."""

    config: TrainConfig
    data: DGDataset
    protocol: Protocol
    splits: DomainSplits
    output_dir: Path
    hparams: dict[str, dict[str, Any]]
    host: type[Algorithm]
    addons: list[type[AddOn]]
    augment: str  # the resolved training augmentation
    image_size: int | None  # the resolved input resolution (None: the backbone's own)
    derived: Derived = field(default_factory=dict)  # every value taken without being told, with its source
    warnings: list[str] = field(default_factory=list)  # said right after the first log line (e.g. upsampling)
    init: InitSource | None = None  # the checkpoint ``init_from`` starts the network from


def plan_run(cfg: TrainConfig, remember_checks: bool = True) -> RunPlan:
    """Validate a recipe completely, loading the dataset index but writing nothing. Raises DGZooError.

    ``remember_checks`` False (a dry run) leaves even dgzoo's cache untouched: neither the image check nor the plan
    (class and domain tables, splits) is remembered.
    """
    cfg.validate()
    check_backbone(cfg.backbone)
    host_cls, addon_classes = parse_algorithm(cfg.algorithm)
    resolve_hparams(cfg.algorithm, cfg.hparams)  # names and types fail before a possibly long dataset download
    if cfg.compile:
        check_compile(host_cls, addon_classes)
    if cfg.grad_accumulation > 1 and host_cls.KIND != "loss":
        raise DGZooError(
            f"--grad-accumulation applies to loss hosts; {host_cls.name} takes its own optimizer steps "
            f"(per-domain gradients, meta steps); drop the flag or lower --batch-size"
        )
    if cfg.push_to_hub:
        check_push_target(cfg.push_to_hub, private=cfg.hub_private, revision=cfg.hub_revision)
    if cfg.output_dir:  # fail before a possibly long dataset download when the answer is already known
        check_output_dir(cfg.output_dir, cfg.resume, cfg.overwrite)
    data = load_dg_dataset(
        cfg.dataset, cfg.revision, cfg.image_column, cfg.label_column, cfg.domain_column, remember_checks
    )
    protocol = resolve_protocol(data, cfg.target_domains, cfg.source_domains)
    class_warnings = check_classes(data, protocol)
    used = [*protocol.sources, *protocol.targets]
    # a too-small domain fails here
    splits = make_splits(data, cfg.holdout_fraction, cfg.resolved_split_seed(), used, remember_checks)
    check_images(data, used, remember_checks)  # a corrupt image fails now, not mid-run or at the first evaluation
    augment = resolve_augment(cfg, data)
    image_size, image_size_source, size_warning = resolve_image_size(cfg, data)
    recipe = Recipe(
        num_domains=len(protocol.sources),
        num_classes=data.num_classes,
        augment=augment,
        mixed_precision=cfg.mixed_precision,
        small_images=is_small_images(data),
        network=meta_backbone(cfg.backbone, data.num_classes, image_size, cfg.dropout),
        pretrained=cfg.pretrained,
    )
    hparams = check_algorithm(cfg.algorithm, cfg.hparams, recipe)
    init = resolve_init(cfg.init_from, cfg.backbone, data.class_names, recipe.network) if cfg.init_from else None
    output_dir = Path(cfg.output_dir or cfg.default_output_dir(list(protocol.targets)))
    check_output_dir(output_dir, cfg.resume, cfg.overwrite)
    if cfg.resume:
        _check_resume_config(cfg, output_dir)
        check_resume(cfg, output_dir, data)
    derived = derived_values(
        cfg, data, protocol, augment, image_size, image_size_source, str(output_dir), is_small_images(data)
    )
    steps_per_epoch = max(1, math.ceil(min(len(splits.in_rows[d]) for d in protocol.sources) / cfg.batch_size))
    warnings = [size_warning] if size_warning else []
    warnings += schedule_warnings(cfg.algorithm, hparams, Schedule(cfg.steps, cfg.eval_every, steps_per_epoch))
    return RunPlan(
        cfg,
        data,
        protocol,
        splits,
        output_dir,
        hparams,
        host_cls,
        addon_classes,
        augment,
        image_size,
        derived,
        [*class_warnings, *warnings],
        init,
    )


def is_small_images(data: DGDataset) -> bool:
    """DomainBed's small-image datasets (its MNIST-likes): the ones whose hyperparameters it draws differently."""
    return bool(data.spec and data.spec.small_images)


def resolve_augment(cfg: TrainConfig, data: DGDataset) -> str:
    """The training augmentation: ``--augment``, or for ``auto`` the dataset's default (DomainBed's otherwise)."""
    if cfg.augment != "auto":
        return cfg.augment
    return data.spec.augment if data.spec else "domainbed"


def resolved_run_config(plan: RunPlan) -> dict[str, Any]:
    """The recipe with everything the run resolved written in (:func:`dgzoo.run.provenance.resolved_config`): the
    Hub dataset's commit, the derived held-out domains, split seed, augmentation and image size, every hparam."""
    return resolved_config(
        plan.config.to_dict(), plan.data.info(), plan.derived, flat_hparams(plan.hparams, plan.host.name)
    )


def run_config_text(plan: RunPlan, cpu_threads: int | None = None) -> str:
    """``train_config.json``: the resolved recipe (``dgzoo train --config`` repeats the run on the same commit with
    the same settings) and its provenance block (code version, data, the values given before resolution, and a CPU
    run's compute threads, ``cpu_threads``)."""
    return dump_config(plan.config, resolved_run_config(plan), provenance_block(plan.data.info(), cpu_threads))


def _check_resume_config(cfg: TrainConfig, output_dir: Path) -> None:
    saved_path = output_dir / "train_config.json"
    if not saved_path.exists():
        raise DGZooError(f"{output_dir} has checkpoints but no train_config.json; it was not written by dgzoo train")
    saved = read_json(saved_path)
    changed, diffs = changed_fields(saved, cfg.to_dict(), RESUMABLE_CHANGES)
    if changed == ["revision"] and cfg.revision == (recorded_data(output_dir) or {}).get("revision"):
        changed = []  # pinning the commit the run trained on (what check_resume asks for) changes nothing
    if changed:
        raise DGZooError(
            f"cannot resume {output_dir} with a different recipe ({diffs}); resume with the original "
            f"settings, or start a new run in another --output-dir"
        )
    done_step = saved.get("steps")
    if run_done(output_dir) and cfg.steps <= int(done_step or 0):  # a run missing files is finished by a resume
        raise DGZooError(
            f"the run in {output_dir} already finished its {done_step} steps; pass a larger --steps to train further"
        )
