"""The unlearning recipe on Accelerate: ``dgzoo unlearn SOURCE --forget SPEC --method sure``.

:func:`unlearn` reads top to bottom like an Accelerate example:

1. :func:`plan_unlearning` checks everything before anything is written: the source run (a run directory or a
   Hub repo) and its recipe, the dataset and splits it trained on, the forget set, the method and its
   hyperparameters, the retrained reference and the output directory.
2. The original model is evaluated (forget / retain / validation / test / held-out accuracy, both attacks).
3. The loop: SURE or a baseline for ``steps`` steps on the retain / forget / validation sets; or, for
   ``retrain``, the source run's own DG algorithm from a fresh initialisation on the retain set only.
4. The unlearned model is evaluated the same way and compared with the retrained reference.
5. The run directory is written as any dgzoo run (timm weights, results.json, model card) and optionally
   pushed to the Hub. SURE's domain classifier is dropped: only the timm model is exported.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import __version__
from ..algorithms import ALGORITHMS, Recipe, check_algorithm
from ..config import OPTIMIZERS, PRECISIONS, TrainConfig, UnlearnConfig, dump_config
from ..data import (
    DGDataset,
    DomainImages,
    eval_loader,
    eval_transform,
    load_dg_dataset,
    loader_workers,
    make_splits,
    seed_hash,
    train_loader,
    train_transform,
)
from ..errors import DGZooError, Interrupted
from ..models import create_backbone, data_config, freeze_batchnorm, meta_backbone
from ..run.hub import from_pretrained, push_run, resolve_checkpoint
from ..run.results import RunResults
from ..run.rundir import atomic_write_text, check_output_dir, json_text, read_json, save_model, write_json
from ..run.unlearning_card import HEADLINE, render_unlearn_card
from ..training.engine import (
    claim_on_main,
    create_accelerator,
    device_name,
    is_small_images,
    resolve_augment,
    run_timing,
    start_run_dir,
)
from ..training.loop import (
    LoopData,
    NonFiniteTraining,
    Optimisation,
    TrainState,
    build_algorithm,
    check_finite,
    fit,
    run_steps,
)
from ..training.optimisation import create_optimizer, create_scheduler
from ..training.peers import peer_failures
from .evaluation import ATTACKS, Outputs, accuracy, attacks, collect, per_group_accuracy
from .forget import UnlearningData, parse_forget_spec, split_for_unlearning
from .methods import METHODS, RETRAIN_TITLE, resolve_method_hparams

logger = logging.getLogger("dgzoo.unlearning")

DEFAULT_STEP_FRACTION = 0.1  # unlearning steps, as a fraction of the source run's steps, when --steps is not given
DEFAULT_LR_SCALE = 0.3  # unlearning learning rate, as a multiple of the source run's, when --lr is not given


@dataclass
class Source:
    """The trained run being unlearned: its model, recipe and results."""

    name: str
    model: nn.Module
    train_config: TrainConfig
    results: dict[str, Any]
    repo_id: str | None = None
    revision: str | None = None


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


# ---------------------------------------------------------------------- planning


def load_source(name: str, revision: str | None = None) -> Source:
    """Load a finished dgzoo run (directory or Hub repo id): model through ``dgzoo.from_pretrained``, plus recipe.

    A Hub run is pinned to one commit: weights, recipe and results all come from the commit the revision names.
    """
    local = Path(name.removeprefix("local-dir:")).expanduser()
    if local.is_dir():
        missing = [f for f in ("train_config.json", "results.json") if not (local / f).exists()]
        if missing:
            raise DGZooError(
                f"{local} is not a finished dgzoo run (no {', '.join(missing)}); unlearning needs the "
                f"run's recipe to rebuild the data it trained on"
            )
    folder, repo_id, sha = resolve_checkpoint(name, revision)
    model = from_pretrained(repo_id or folder, revision=sha).model
    if repo_id:
        recipe, results = _hub_json(repo_id, "train_config.json", sha), _hub_json(repo_id, "results.json", sha)
    else:
        recipe, results = _run_json(folder / "train_config.json"), _run_json(folder / "results.json")
    config = TrainConfig.from_dict(recipe, source=f"{repo_id or folder}/train_config.json")
    return Source(repo_id or str(folder), model, config, results, repo_id, sha)


def _run_json(path: Path) -> dict[str, Any]:
    """A JSON file of a source run directory, or one line saying it is unreadable and what to do."""
    try:
        value = read_json(path)
    except (ValueError, UnicodeDecodeError) as e:
        raise DGZooError(
            f"{path} is not valid JSON ({' '.join(str(e).split())[:80]}): the source run was stopped "
            f"while writing it; finish the source run with `dgzoo train ... --resume` (or train it "
            f"again), then unlearn from it"
        ) from None
    if not isinstance(value, dict):
        raise DGZooError(
            f"{path} does not hold a JSON object; it was not written by dgzoo; unlearn from a run "
            f"directory written by `dgzoo train`"
        )
    return value


def _check_not_source(out: Path, source: str) -> None:
    """Refuse to write the unlearned run over the run it reads from: ``--overwrite`` would delete the source."""
    local = Path(source.removeprefix("local-dir:")).expanduser()
    if local.is_dir() and out.resolve() == local.resolve():
        raise DGZooError(
            f"--output-dir {out} is the source run itself; writing there would replace the run being "
            f"unlearned; choose another --output-dir (or leave it out for the default)"
        )


def _hub_json(repo_id: str, filename: str, revision: str | None) -> dict[str, Any]:
    import huggingface_hub
    from huggingface_hub import errors as hf_errors

    try:
        return read_json(huggingface_hub.hf_hub_download(repo_id, filename, revision=revision))
    except hf_errors.EntryNotFoundError:
        raise DGZooError(
            f"Hub repo {repo_id} has no {filename}; only runs published by dgzoo (with their recipe) can be unlearned"
        ) from None
    except hf_errors.HFValidationError:
        raise DGZooError(f"'{repo_id}' is neither a run directory nor a Hub repo id (USER_OR_ORG/NAME)") from None
    except (hf_errors.HfHubHTTPError, OSError, getattr(hf_errors, "HTTPError", OSError)) as e:  # + httpx errors
        raise DGZooError(
            f"cannot download {filename} of {repo_id} from {huggingface_hub.constants.ENDPOINT} "
            f"({type(e).__name__}); check the connection"
        ) from None


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


# ---------------------------------------------------------------------- the recipe


def unlearn(cfg: UnlearnConfig) -> dict[str, Any]:
    """Unlearn ``cfg.forget`` from ``cfg.source`` with ``cfg.method``; write the run directory, return results.

    Like training, the run holds an exclusive claim on its output directory while it writes it.
    """
    plan = plan_unlearning(cfg)
    accelerator = create_accelerator(cfg.mixed_precision)
    for key in ("batch_size", "retain_batch_size", "forget_batch_size"):
        if key in plan.settings and plan.settings[key] % accelerator.num_processes:
            raise DGZooError(
                f"--{key.replace('_', '-')} {plan.settings[key]} must be divisible by the "
                f"{accelerator.num_processes} processes"
            )
    with claim_on_main(accelerator, plan.output_dir, f"dgzoo unlearn {cfg.method}"):
        try:
            with peer_failures(
                accelerator.num_processes, f"rerun the same command with --overwrite to start {plan.output_dir} again"
            ):
                return _run_unlearning(cfg, plan, accelerator)
        except KeyboardInterrupt:
            raise Interrupted(
                f"interrupted; unlearning has no checkpoints: rerun the same command with --overwrite "
                f"to start {plan.output_dir} again"
            ) from None


def _run_unlearning(cfg: UnlearnConfig, plan: UnlearnPlan, accelerator: Any) -> dict[str, Any]:
    from accelerate.utils import set_seed

    out, settings, data = plan.output_dir, plan.settings, plan.data
    start_run_dir(accelerator, out, cfg.overwrite, ("unlearn_config.json", json_text(cfg.to_dict())), "unlearn.log")
    logger.info(
        "dgzoo %s | unlearn %s from %s with %s (%s)",
        __version__,
        plan.sets.description,
        plan.source.name,
        cfg.method,
        plan.sets.spec.scenario,
    )

    source_model = plan.source.model
    preprocessing = data_config(source_model, settings["image_size"])
    eval_tf = eval_transform(preprocessing)
    workers, pin = loader_workers(cfg.num_workers, accelerator.device)

    def make_eval_loader(rows: np.ndarray) -> Any:
        return accelerator.prepare_data_loader(
            eval_loader(DomainImages(data, rows, eval_tf), cfg.eval_batch_size, workers, pin)
        )

    def evaluate_now(model: nn.Module) -> dict[str, Any]:
        with accelerator.autocast():
            return evaluate_model(
                model.to(accelerator.device),
                data,
                plan.sets,
                make_eval_loader,
                accelerator.device,
                accelerator.gather_for_metrics,
                settings["seed"],
            )

    original = evaluate_now(source_model)
    set_seed(settings["seed"])
    try:
        if plan.loop is not None:
            model, timing, diagnostics = _train_loop(plan, accelerator, preprocessing, workers, pin)
        else:
            model, timing, diagnostics = _unlearn(plan, accelerator, preprocessing, workers, pin)
        check_finite(model, settings["steps"])  # a diverged model is never evaluated (the attacks refuse NaN)
    except NonFiniteTraining as e:
        raise DGZooError(
            f"unlearning diverged: {e}; nothing was exported; lower --lr (or --steps) and run again with --overwrite"
        ) from None
    unlearned = evaluate_now(model)
    results = _results(plan, unlearned, original, timing, diagnostics, accelerator)
    if accelerator.is_main_process:
        metadata = {
            "algorithm": cfg.method,
            "unlearned_from": plan.source.repo_id or str(plan.source.name),
            "forget": plan.sets.spec.text,
            "dataset": results["dataset"]["name"],
            "dataset_repo_id": data.repo_id,
            "dataset_revision": data.revision,
            "source_domains": results["source_domains"],
            "target_domains": results["target_domains"],
            "dgzoo_version": __version__,
        }
        save_model(model, out, data.class_names, preprocessing, metadata)
        write_json(out / "results.json", results)
        atomic_write_text(out / "train_config.json", dump_config(plan.source.train_config))
        atomic_write_text(out / "README.md", render_unlearn_card(results, run_dir=out))
        _log_summary(results)
    accelerator.wait_for_everyone()
    if cfg.push_to_hub and accelerator.is_main_process:
        logger.info("published to %s", push_run(out, cfg.push_to_hub, private=cfg.hub_private))
    return results


def _unlearn(
    plan: UnlearnPlan, accelerator: Any, preprocessing: dict[str, Any], workers: int, pin: bool
) -> tuple[nn.Module, dict[str, float], dict[str, Any]]:
    """SURE or a baseline: ``steps`` joint steps on the method's named minibatches, on the training loop's
    :func:`~dgzoo.training.loop.run_steps`."""
    cfg, settings = plan.config, plan.settings
    model = plan.source.model
    model.train()
    if settings["freeze_bn"]:
        freeze_batchnorm(model)
    method = METHODS[cfg.method](model, plan.data.num_classes, plan.method_hparams)
    optimizer = _optimizer(settings, method.param_groups(settings["lr"]))
    network, optimizer = accelerator.prepare(method, optimizer)
    augment = settings["augment"]
    train_tf = train_transform(preprocessing, augment)
    steps, seed = settings["steps"], settings["seed"]
    sizes = {
        "retain": settings["retain_batch_size"],
        "forget": settings["forget_batch_size"],
        "validation": settings["forget_batch_size"],
    }
    streams = {
        name: train_loader(
            [DomainImages(plan.data, plan.rows[name], train_tf, name, random=augment != "none")],
            sizes[name],
            seed_hash(seed, name),
            steps,
            0,
            accelerator.process_index,
            accelerator.num_processes,
            workers,
            pin,
        )
        for name in method.batches()
    }
    device = accelerator.device

    def unlearning_step(named: dict[str, Any], step: int) -> dict[str, float]:
        batches = {
            name: tuple(t.to(device, non_blocking=True) for t in minibatches[0]) for name, minibatches in named.items()
        }
        loss, metrics = network(batches, step / steps)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        return {k: float(v) for k, v in metrics.items()}

    state, history = TrainState(), []
    run_steps(
        unlearning_step,
        (dict(zip(streams, minibatches)) for minibatches in zip(*streams.values())),
        accelerator,
        state,
        steps,
        sum(sizes[name] for name in streams),
        lambda _, metrics: history.append(metrics),
        desc=cfg.method,
    )
    timing = run_timing(state.train_seconds, state.images, steps)
    return accelerator.unwrap_model(network).model, timing, _summarise(history, accelerator)


def _train_loop(
    plan: UnlearnPlan, accelerator: Any, preprocessing: dict[str, Any], workers: int, pin: bool
) -> tuple[nn.Module, dict[str, float], dict[str, Any]]:
    """Retrain or fine-tune on dgzoo's training loop (the engine's own, add-ons included).

    Retraining is the gold standard: the source run's DG algorithm and recipe, from a fresh initialisation (made
    right after seeding, as the engine does, so it is the source run's own initialisation or the same pretrained
    weights), on the retained rows of each source domain. Fine-tuning continues the source model with the
    method's training algorithm on the retain set. The last step is kept (no model selection).
    """
    tc, settings, data = plan.source.train_config, plan.settings, plan.data
    assert plan.loop is not None  # called for the training-loop methods, whose plan has one
    algorithm_name, hparams, rows = plan.loop
    retrain = plan.config.method == "retrain"
    if retrain:
        network = create_backbone(tc.backbone, data.num_classes, tc.pretrained, settings["image_size"], tc.dropout)
        batch_size, seed = settings["batch_size"], settings["seed"]
    else:
        network = plan.source.model
        network.train()
        batch_size, seed = settings["retain_batch_size"], seed_hash(settings["seed"], "retain")
    if settings["freeze_bn"]:
        freeze_batchnorm(network)
    domains = list(rows)
    host_cls = ALGORITHMS[algorithm_name.split("+")[0]]
    augment = settings["augment"]
    own_tf = host_cls.train_transform(preprocessing, augment, hparams[host_cls.name], len(domains))
    train_tf = own_tf or train_transform(preprocessing, augment)
    random_tf = own_tf is not None or augment != "none"  # as the engine: seed per sample only when it matters
    eval_tf = eval_transform(preprocessing)
    # What the source run's add-ons saw at the end of an epoch: its training rows (now the retain set) and every
    # unseen row of the source domains, with the evaluation transform.
    unseen = np.union1d(plan.sets.validation, plan.sets.test)
    loop_data = LoopData(
        domains=domains,
        train_sets=[DomainImages(data, rows[d], train_tf, d, random=random_tf) for d in domains],
        epoch_train=[DomainImages(data, rows[d], eval_tf, d) for d in domains],
        epoch_val=[
            DomainImages(
                data,
                unseen[data.domain_of_row[unseen] == data.domains.index(d)] if d in data.domains else unseen,
                eval_tf,
                d,
            )
            for d in domains
        ],
        batch_size=batch_size,
        seed=seed,
        workers=workers,
        pin_memory=pin,
    )
    settings_opt = Optimisation(
        settings["optimizer"], settings["lr"], settings["weight_decay"], settings.get("momentum", 0.9)
    )
    algorithm = build_algorithm(
        algorithm_name, network, data.num_classes, len(domains), hparams, accelerator, settings_opt
    )
    steps = settings["steps"]
    scheduler = create_scheduler(
        algorithm.host.optimizer, settings.get("lr_schedule", "constant"), steps, tc.warmup_steps if retrain else 0
    )
    state, history = TrainState(), []
    fit(
        algorithm,
        loop_data,
        accelerator,
        scheduler,
        state,
        steps,
        lambda _, metrics: history.append(metrics),
        desc=plan.config.method,
    )
    diagnostics = _summarise(history, accelerator)
    diagnostics["algorithm"] = algorithm.summary()
    return algorithm.evaluated_network(), run_timing(state.train_seconds, state.images, steps), diagnostics


def _optimizer(settings: dict[str, Any], groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    return create_optimizer(
        groups, settings["optimizer"], settings["lr"], settings["weight_decay"], settings.get("momentum", 0.9)
    )


def _summarise(history: list[dict[str, float]], accelerator: Any) -> dict[str, Any]:
    """Step metrics averaged over the first and the last tenth of the run (all processes), plus a short curve."""
    if not history:
        return {}
    keys = sorted({k for h in history for k in h})
    window = max(1, len(history) // 10)

    def mean(rows: list[dict[str, float]]) -> list[float]:
        return [float(np.mean([r[k] for r in rows if k in r])) for k in keys]

    values = torch.tensor([mean(history[:window]), mean(history[-window:])], device=accelerator.device)
    if accelerator.num_processes > 1:
        values = accelerator.reduce(values, reduction="mean")
    first, last = values.tolist()
    every = max(1, len(history) // 20)
    curve = [
        {"step": i + 1, **{k: round(v, 5) for k, v in h.items()}} for i, h in enumerate(history) if (i + 1) % every == 0
    ]
    return {"first_steps": dict(zip(keys, first)), "last_steps": dict(zip(keys, last)), "curve": curve}


# ---------------------------------------------------------------------- evaluation and results


def evaluate_model(
    model: nn.Module,
    data: DGDataset,
    sets: UnlearningData,
    make_loader: Any,
    device: torch.device,
    gather: Any,
    seed: int,
) -> dict[str, Any]:
    """Accuracy on every set, per-domain test and held-out accuracy, and both attacks (see ``evaluation``)."""
    outputs = {
        name: collect(model, make_loader(getattr(sets, name)), device, gather)
        for name in ("forget", "retain", "matched_validation", "test")
    }
    # The matched test rows are a subset of the test rows, in order: read them off instead of a second pass.
    matched = torch.from_numpy(np.isin(sets.test, sets.matched_test))
    test = outputs["test"]
    outputs["matched_test"] = Outputs(test.logits[matched], test.labels[matched], test.features[matched])
    for name, out in outputs.items():  # gathering keeps the loaders' order; the labels prove it
        expected = data.labels[getattr(sets, name)]
        if not np.array_equal(out.labels.numpy(), expected):
            raise RuntimeError(f"evaluation of the {name} set returned images out of order")
    held_out = {d: accuracy(collect(model, make_loader(rows), device, gather)) for d, rows in sets.held_out.items()}
    test_domains = per_group_accuracy(outputs["test"], np.asarray(data.domains)[data.domain_of_row[sets.test]])
    return {
        "accuracy": {
            "forget": accuracy(outputs["forget"]),
            "retain": accuracy(outputs["retain"]),
            "validation": accuracy(outputs["matched_validation"]),
            "test": accuracy(outputs["test"]),
            "matched_test": accuracy(outputs["matched_test"]),
            "held_out": float(np.mean(list(held_out.values()))) if held_out else None,
        },
        "test_domains": test_domains,
        "held_out_domains": held_out,
        "mean_loss": {
            "forget": float(outputs["forget"].losses.mean()),
            "matched_test": float(outputs["matched_test"].losses.mean())
            if len(outputs["matched_test"].labels)
            else None,
        },
        "attacks": attacks(outputs["forget"], outputs["matched_test"], seed),
    }


def headline(evaluation: dict[str, Any] | None) -> dict[str, float | None]:
    """The :data:`HEADLINE` numbers of one evaluation (attack entries reduced to their accuracy)."""
    if not evaluation:
        return {key: None for key in HEADLINE}
    out = {}
    for key, (_, (group, name)) in HEADLINE.items():
        value = evaluation[group][name]
        out[key] = value["accuracy"] if isinstance(value, dict) else value
    return out


def _results(
    plan: UnlearnPlan,
    unlearned: dict[str, Any],
    original: dict[str, Any],
    timing: dict[str, float],
    diagnostics: dict[str, Any],
    accelerator: Any,
) -> dict[str, Any]:
    import timm

    cfg, source, data, sets = plan.config, plan.source, plan.data, plan.sets
    res = source.results
    reference = (
        plan.reference["unlearning"]["evaluation"]["unlearned"]
        if plan.reference
        else (unlearned if cfg.method == "retrain" else None)
    )
    retrain_seconds = (
        plan.reference["timing"]["train_seconds"]
        if plan.reference
        else (timing["train_seconds"] if cfg.method == "retrain" else None)
    )
    mine, retrained, before = headline(unlearned), headline(reference), headline(original)
    comparison = {
        key: {
            "unlearned": mine[key],
            "original": before[key],
            "retrain": retrained[key],
            "gap_to_retrain": None if mine[key] is None or retrained[key] is None else mine[key] - retrained[key],  # type: ignore[operator]  # None: checked
        }
        for key in HEADLINE
    }
    title = RETRAIN_TITLE if cfg.method == "retrain" else METHODS[cfg.method].title
    citation = None if cfg.method == "retrain" else METHODS[cfg.method].citation
    per_domain = {**unlearned["test_domains"], **unlearned["held_out_domains"]}
    previously = res.get("unlearning", {}).get("forgotten_rows", [])
    sources, targets = list(res["source_domains"]), list(res["target_domains"])
    held_out = unlearned["accuracy"]["held_out"]
    return RunResults.create(
        {
            "kind": "unlearning",
            "algorithm": cfg.method,
            "host_algorithm": cfg.method,
            "addons": [],
            "algorithm_title": title,
            "backbone": res["backbone"],
            "pretrained": res.get("pretrained", False),
            "base_model": res.get("base_model"),
            "dataset": res["dataset"],
            "class_names": data.class_names,
            "protocol": res["protocol"],
            "source_domains": sources,
            "target_domains": targets,
            "seed": plan.settings["seed"],
            "split_seed": res.get("split_seed"),
            "steps": plan.settings["steps"],
            "selection": {"method": "last", "step": plan.settings["steps"], "score": unlearned["accuracy"]["test"]},
            "selections": {
                "last": {
                    "method": "last",
                    "step": plan.settings["steps"],
                    "score": unlearned["accuracy"]["test"],
                    "accuracy": per_domain,
                    "target_accuracy": held_out,
                }
            },
            "accuracy": per_domain,
            "target_accuracy": held_out,
            "hparams": {**plan.settings, **plan.method_hparams},
            "diagnostics": diagnostics,
            "citations": [(title, citation)] if citation else [],
            "timing": timing,
            "unlearning": {
                "method": cfg.method,
                "method_title": title,
                "forget_spec": sets.spec.text,
                "scenario": sets.spec.scenario,
                "description": sets.description,
                "forget_classes": [data.class_names[c] for c in sets.classes],
                "forget_domains": list(sets.domains),
                "sizes": sets.sizes(),
                "fingerprint": fingerprint(sets),
                "forgotten_rows": sorted(set(map(int, previously)) | set(map(int, sets.forget))),
                "source": {
                    "name": source.name,
                    "repo_id": source.repo_id,
                    "revision": source.revision,
                    "algorithm": res["algorithm"],
                    "steps": res["steps"],
                    "train_seconds": res.get("timing", {}).get("train_seconds"),
                },
                "reference": None if not plan.reference else cfg.reference,
                "evaluation": {"unlearned": unlearned, "original": original, "retrain": reference},
                "comparison": comparison,
                "attacks": ATTACKS,
                "time_fraction_of_retrain": None if not retrain_seconds else timing["train_seconds"] / retrain_seconds,
            },
            "num_processes": accelerator.num_processes,
            "device": device_name(accelerator.device),
            "dgzoo_version": __version__,
            "timm_version": timm.__version__,
            "torch_version": torch.__version__,
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
    ).to_json()


def _log_summary(results: dict[str, Any]) -> None:
    rows = results["unlearning"]["comparison"]
    fmt = lambda v: "  n/a" if v is None else f"{100 * v:5.1f}"  # noqa: E731
    logger.info("%-44s %9s %9s %9s", "", "unlearned", "original", "retrain")
    for key, (label, _) in HEADLINE.items():
        logger.info(
            "%-44s %9s %9s %9s",
            label,
            fmt(rows[key]["unlearned"]),
            fmt(rows[key]["original"]),
            fmt(rows[key]["retrain"]),
        )
    fraction = results["unlearning"]["time_fraction_of_retrain"]
    logger.info(
        "unlearning took %.1f s%s",
        results["timing"]["train_seconds"],
        f" ({100 * fraction:.1f}% of retraining)" if fraction else "",
    )
