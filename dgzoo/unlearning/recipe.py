"""The unlearning recipe on Accelerate: ``dgzoo unlearn SOURCE --forget SPEC --method sure``.

:func:`unlearn` reads top to bottom like an Accelerate example:

1. :func:`~dgzoo.unlearning.plan.plan_unlearning` checks everything before anything is written: the source run (a
   run directory or a Hub repo, :mod:`~dgzoo.unlearning.source`) and its recipe, the dataset and splits it trained
   on, the forget set, the method and its hyperparameters, the retrained reference and the output directory.
2. The original model is evaluated (forget / retain / validation / test / held-out accuracy, both attacks).
3. The loop, the training loop's own (:func:`dgzoo.training.loop.run_steps`, with its stop at a non-finite loss):
   SURE or a baseline for ``steps`` steps on the retain / forget / validation sets; or, for ``finetune`` and
   ``retrain``, :func:`~dgzoo.training.loop.fit` with a DG algorithm (retrain: the source run's own, from a fresh
   initialisation) on the retain set only.
4. The unlearned model is evaluated the same way and compared with the retrained reference
   (:mod:`~dgzoo.unlearning.results`).
5. The run directory is written as any dgzoo run (timm weights, results.json, model card) and optionally
   pushed to the Hub. SURE's domain classifier is dropped: only the timm model is exported.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch import nn

from .._version import __version__
from ..algorithms import ALGORITHMS
from ..config import UnlearnConfig, dump_config
from ..data import (
    DomainImages,
    eval_transform,
    evaluation_loaders,
    loader_workers,
    seed_hash,
    train_loader,
    train_transform,
)
from ..errors import DGZooError, Interrupted
from ..models import create_backbone, data_config, freeze_batchnorm
from ..run.hub import push_run
from ..run.rundir import atomic_write_text, json_text, save_model, write_json
from ..run.unlearning_card import render_unlearn_card
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
from ..training.session import claim_on_main, create_accelerator, run_timing, start_run_dir
from .evaluation import evaluate_model, evaluated_rows
from .methods import METHODS
from .plan import UnlearnPlan, plan_unlearning
from .results import log_summary, unlearning_results

logger = logging.getLogger("dgzoo.unlearning")


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

    eval_loaders = evaluation_loaders(  # built once: the original and the unlearned model are read with them
        {
            group: {name: DomainImages(data, rows, eval_tf) for name, rows in named.items()}
            for group, named in evaluated_rows(plan.sets).items()
        },
        cfg.eval_batch_size,
        workers,
        pin,
        prepare=accelerator.prepare_data_loader,
    )

    def evaluate_now(model: nn.Module) -> dict[str, Any]:
        with accelerator.autocast():
            return evaluate_model(
                model.to(accelerator.device),
                data,
                plan.sets,
                eval_loaders,
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
    typed = unlearning_results(plan, unlearned, original, timing, diagnostics, accelerator)
    results = typed.to_json()
    if accelerator.is_main_process:
        assert typed.dataset is not None  # copied from the source run, which must name it
        metadata = {
            "algorithm": cfg.method,
            "unlearned_from": plan.source.repo_id or str(plan.source.name),
            "forget": plan.sets.spec.text,
            "dataset": typed.dataset.name,
            "dataset_repo_id": data.repo_id,
            "dataset_revision": data.revision,
            "source_domains": typed.source_domains,
            "target_domains": typed.target_domains,
            "dgzoo_version": __version__,
        }
        save_model(model, out, data.class_names, preprocessing, metadata)
        write_json(out / "results.json", results)
        atomic_write_text(out / "train_config.json", dump_config(plan.source.train_config))
        atomic_write_text(out / "README.md", render_unlearn_card(results, run_dir=out))
        log_summary(typed)
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
