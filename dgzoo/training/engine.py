"""Training one run, on Accelerate.

:func:`train` reads top to bottom like an Accelerate example:

1. :func:`~dgzoo.training.plan.plan_run` checks everything that can be wrong with the recipe *before* anything is
   written: config values, backbone name, algorithm and hyperparameters (against the backbone itself, built on the
   meta device), dataset, domains, output directory.
2. The Accelerator, network and data are set up; the algorithm (with its add-ons) is composed and prepared.
3. The loop (:func:`dgzoo.training.loop.fit`): one ``update`` per step on one minibatch per source domain; every
   ``eval_every`` steps every domain's in/out split is evaluated, the record is written to records.jsonl and the
   model selected by training-domain validation is exported; every ``checkpoint_every`` steps a resumable
   checkpoint is saved (:mod:`~dgzoo.training.checkpoints`).
4. The run directory is finalised: results.json, model card, plots; optionally pushed to the Hub.

The engine knows no particular algorithm: what it evaluates and exports is the composition's
``evaluated_network()`` (the host's timm network, or an add-on's average of it).

Its one job is the run's driver and what the run writes as it goes (records, the selected model, results.json); the
plan (:mod:`~dgzoo.training.plan`), the session (:mod:`~dgzoo.training.session`), checkpoints and the loop are
modules of their own, whose names the engine re-exports where callers import them from here.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
from pathlib import Path
from typing import Any

from torch import nn

from .._version import __version__
from ..algorithms import (
    Composition,
    EvalContext,
)
from ..algorithms.base import with_acts
from ..config import TrainConfig
from ..data import (
    DomainImages,
    domain_split_images,
    eval_transform,
    evaluation_loaders,
    loader_workers,
    train_transform,
)
from ..data.inspect import contact_sheet
from ..errors import DGZooError, Interrupted
from ..models import create_backbone, data_config, freeze_batchnorm
from ..run.cards import plot_run, render_card
from ..run.hub import push_run
from ..run.provenance import code_version, warn_if_not_a_repeat
from ..run.results import RunResults
from ..run.rundir import (
    SAMPLES_IMAGE,
    atomic_write_text,
    latest_checkpoint,
    save_model,
    write_json,
)
from ..run.selection import SELECTION_METHODS, select
from .checkpoints import resume_state
from .checkpoints import save_checkpoint as _save_checkpoint  # the name tests stop a run at its checkpoint through
from .derived import derived_line
from .evaluation import evaluate, source_loss
from .fastpath import apply_memory_format, compile_network, configure_cuda
from .initialisation import load_init
from .loop import (
    LoopData,
    NonFiniteTraining,
    Optimisation,
    TrainState,
    build_algorithm,
    check_finite,
    fit,
    source_batches,
)
from .optimisation import create_scheduler, current_lr
from .peers import peer_failures
from .plan import (  # noqa: F401  (re-exported: dgzoo.training.engine.plan_run and the rest keep working)
    RESUMABLE_CHANGES,
    RunPlan,
    is_small_images,
    plan_run,
    resolve_augment,
    resolved_run_config,
    run_config_text,
)
from .resume import data_record
from .session import (  # noqa: F401
    _ProgressAwareHandler,
    check_process_split,
    claim_on_main,
    cpu_threads,
    create_accelerator,
    device_name,
    multiprocess_cpu,
    run_environment,
    run_timing,
    setup_logging,
    start_run_dir,
)

logger = logging.getLogger("dgzoo")


def _trackers(cfg: TrainConfig) -> list[str] | None:
    if cfg.log_with == "none":
        return None
    if cfg.log_with == "auto":
        from accelerate.utils import is_tensorboard_available

        return ["tensorboard"] if is_tensorboard_available() else None
    return [t.strip() for t in cfg.log_with.split(",") if t.strip()]


def optimisation(cfg: TrainConfig) -> Optimisation:
    """The recipe's optimisation settings."""
    return Optimisation(
        cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.momentum, cfg.grad_accumulation, cfg.clip_grad_norm
    )


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train, evaluate and export one run as described by ``cfg``; return its results.json content.

    The run holds an exclusive claim on its output directory for its whole life (a second writer is refused, a
    killed one does not block its rerun), and Ctrl-C ends it with one line naming the exact resume command.
    """
    if cfg.dry_run:  # the plan is dgzoo.training.dryrun's job, above the engine: never train on a dry run
        raise DGZooError(
            "dry_run is set: call dgzoo.training.dryrun.dry_run(cfg) (or `dgzoo train --dry-run`) to see "
            "the plan, or unset it to train"
        )
    plan = plan_run(cfg)
    accelerator = create_accelerator(
        cfg.mixed_precision, _trackers(cfg), plan.output_dir, plan.host.FIND_UNUSED_PARAMETERS
    )
    check_process_split(cfg.batch_size, cfg.grad_accumulation, accelerator.num_processes)
    if accelerator.is_main_process:
        warn_if_not_a_repeat(
            getattr(cfg, "recorded_provenance", None), plan.data.info(), cpu_threads(accelerator.device)
        )
    with claim_on_main(accelerator, plan.output_dir, f"dgzoo train {cfg.algorithm}"):
        try:
            with peer_failures(accelerator.num_processes, f"continue with: {resume_command(plan)}"):
                return _train(cfg, plan, accelerator)
        except KeyboardInterrupt:
            done = latest_checkpoint(plan.output_dir)
            kept = f"its checkpoint {done.name} is kept" if done else "it had no checkpoint yet (restarts at step 0)"
            raise Interrupted(
                f"interrupted; {plan.output_dir}: {kept}; continue with: {resume_command(plan)}"
            ) from None


def resume_command(plan: RunPlan) -> str:
    """The command line that continues this run: the one that started it, with ``--resume`` and without
    ``--overwrite`` (which would delete what the run has written), naming the output directory explicitly."""
    argv = sys.argv[1:]
    prog = Path(sys.argv[0]).name
    head = ["dgzoo"] if prog in ("dgzoo", "__main__.py") else ["accelerate", "launch", sys.argv[0]]
    args = [a for a in argv if a not in ("--overwrite", "--resume", "--no-resume")]
    if not any(a == "--output-dir" or a.startswith("--output-dir=") for a in args):
        args += ["--output-dir", str(plan.output_dir)]
    return shlex.join([*head, *args, "--resume"])


def build_loop_data(plan: RunPlan, preprocessing: dict[str, Any], workers: int, pin: bool) -> tuple[LoopData, Any]:
    """The training loop's data (source domains' training splits with the training transform, and what post-epoch
    add-ons see) and the evaluation transform, for the backbone's ``preprocessing``."""
    cfg, data, splits, sources = plan.config, plan.data, plan.splits, list(plan.protocol.sources)
    own_tf = plan.host.train_transform(preprocessing, plan.augment, plan.hparams[plan.host.name], len(sources))
    train_tf = own_tf or train_transform(preprocessing, plan.augment)
    eval_tf = eval_transform(preprocessing)
    random_tf = own_tf is not None or plan.augment != "none"
    loop_data = LoopData(
        domains=sources,
        train_sets=[DomainImages(data, splits.in_rows[d], train_tf, d, random=random_tf) for d in sources],
        # What post-epoch add-ons see: the source domains' splits with the evaluation transform.
        epoch_train=[DomainImages(data, splits.in_rows[d], eval_tf, d) for d in sources],
        epoch_val=[DomainImages(data, splits.out_rows[d], eval_tf, d) for d in sources],
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        workers=workers,
        pin_memory=pin,
    )
    return loop_data, eval_tf


def _train(cfg: TrainConfig, plan: RunPlan, accelerator: Any) -> dict[str, Any]:
    from accelerate.utils import set_seed

    out = plan.output_dir
    sources, targets = list(plan.protocol.sources), list(plan.protocol.targets)
    restart = cfg.resume and latest_checkpoint(out) is None  # killed before its first checkpoint: nothing to keep
    recipe = ("train_config.json", run_config_text(plan, cpu_threads(accelerator.device)))
    resuming = cfg.resume and not restart  # its recipe is rewritten only once a checkpoint has loaded
    start_run_dir(accelerator, out, cfg.overwrite or restart, None if resuming else recipe, "train.log")
    if accelerator.is_main_process:  # the first log line: what was chosen on the user's behalf, and why
        logger.info(derived_line(plan.derived))
        for warning in plan.warnings:
            logger.warning("warning: %s", warning)
    set_seed(cfg.seed)

    # -- network and data
    data = plan.data
    network = create_backbone(cfg.backbone, data.num_classes, cfg.pretrained, plan.image_size, cfg.dropout)
    if plan.init is not None:
        load_init(network, plan.init)
    if cfg.freeze_bn:
        freeze_batchnorm(network)
    configure_cuda(accelerator.device)
    apply_memory_format(network, cfg.channels_last)
    preprocessing = data_config(network, plan.image_size)
    splits = plan.splits
    workers, pin = loader_workers(cfg.num_workers, accelerator.device)
    loop_data, eval_tf = build_loop_data(plan, preprocessing, workers, pin)
    loop_data.channels_last = cfg.channels_last
    eval_loaders = evaluation_loaders(  # one loader, one set of workers, for every domain split
        domain_split_images(data, splits, eval_tf),
        cfg.eval_batch_size,
        workers,
        pin,
        prepare=accelerator.prepare_data_loader,
    )

    # -- the algorithm and its optimisation
    algorithm = build_algorithm(
        cfg.algorithm, network, data.num_classes, len(sources), plan.hparams, accelerator, optimisation(cfg)
    )
    if cfg.compile:  # once the algorithm has added its modules and hooks to the network
        compile_network(network)
    scheduler = create_scheduler(algorithm.host.optimizer, cfg.lr_schedule, cfg.steps, cfg.warmup_steps)
    state = TrainState()
    accelerator.register_for_checkpointing(scheduler, algorithm, state)
    if restart:
        logger.info("%s holds no checkpoint (the run stopped before its first one): starting again from step 0", out)
    elif cfg.resume:
        checkpoint = resume_state(accelerator, out)
        if accelerator.is_main_process:
            atomic_write_text(out / recipe[0], recipe[1])
        logger.info("resumed from %s at step %d", checkpoint, state.step)
    metadata = {
        "algorithm": cfg.algorithm,
        "dataset": data.info()["name"],
        "dataset_repo_id": data.repo_id,
        "dataset_revision": data.revision,
        "dataset_fingerprint": data.fingerprint,
        "source_domains": sources,
        "target_domains": targets,
        "protocol": plan.protocol.name,
        "dgzoo_version": __version__,
        "code": code_version(),
    }
    if accelerator.is_main_process:
        logger.info(
            "dgzoo %s | %s on %s | sources %s -> held-out %s | %s, %d classes, %d process(es) on %s",
            __version__,
            cfg.algorithm,
            data.name,
            sources,
            targets,
            cfg.backbone,
            data.num_classes,
            accelerator.num_processes,
            accelerator.device,
        )
        accelerator.init_trackers("dgzoo", config=_tracker_config(cfg))

    def source_val_loss(network: nn.Module) -> float:
        with accelerator.autocast():
            return source_loss(network, eval_loaders, sources, accelerator.device, accelerator.gather_for_metrics)

    def evaluate_and_checkpoint(state: TrainState, metrics: dict[str, float]) -> None:
        if state.step % cfg.eval_every == 0 or state.step == cfg.steps:
            # Add-ons act first (SWAD reads the online model's source-validation loss to move its window).
            eval_metrics = algorithm.on_evaluate(
                EvalContext(
                    state.step,
                    state.step == cfg.steps,
                    source_val_loss,
                    source_batches(loop_data, accelerator, cfg.seed + state.step),
                )
            )
            network = algorithm.evaluated_network()
            algorithm.host.runtime.sync_buffers(network)
            check_finite(network, state.step)  # a diverged network is never evaluated, selected or exported
            with accelerator.autocast():
                acc = evaluate(network, eval_loaders, accelerator.device, accelerator.gather_for_metrics)
            record = _make_record(
                state, acc, sources, targets, loop_data.steps_per_epoch, current_lr(algorithm.host.optimizer)
            )
            record.update(eval_metrics)
            state.interval = {}
            state.records.append(record)
            score = record["source_val_acc"]
            new_best = score > state.best_score
            if new_best:
                state.best_score, state.best_step = score, state.step
            if accelerator.is_main_process:
                atomic_write_text(out / "records.jsonl", "".join(json.dumps(r) + "\n" for r in state.records))
                if new_best and cfg.selection == "training_domain_validation":
                    save_model(network, out, data.class_names, preprocessing, metadata)
                logger.info(
                    "step %d: source val %.3f | held-out %.3f%s",
                    state.step,
                    score,
                    record["target_acc"],
                    " (best)" if new_best else "",
                )
            accelerator.log({"eval/source_val_acc": score, "eval/target_acc": record["target_acc"]}, step=state.step)
        if state.step % cfg.resolved_checkpoint_every() == 0 or state.step == cfg.steps:
            _save_checkpoint(accelerator, out, state.step, cfg.keep_checkpoints, data_record(data))

    try:
        fit(algorithm, loop_data, accelerator, scheduler, state, cfg.steps, evaluate_and_checkpoint)
    except NonFiniteTraining as e:
        done = latest_checkpoint(out)
        kept = f"checkpoints up to {done.name} are finite" if done else "no checkpoint was written"
        raise DGZooError(
            f"{e}; {kept}; lower --lr or set --clip-grad-norm and train again with --overwrite or another --output-dir"
        ) from None

    # -- finalise the run directory
    if cfg.selection != "training_domain_validation" and accelerator.is_main_process:
        save_model(algorithm.evaluated_network(), out, data.class_names, preprocessing, metadata)
    results = _results(cfg, plan, state, algorithm, accelerator, network)
    if accelerator.is_main_process:
        plot_run(results, state.records, out)
        roles = {d: "held-out" if d in targets else "source" for d in [*sources, *targets]}
        contact_sheet(data, out / SAMPLES_IMAGE, roles=roles, domains=list(roles))  # the domains check_images read
        atomic_write_text(out / "README.md", render_card(results, resolved_run_config(plan), run_dir=out))
        write_json(out / "results.json", results)  # last: a run killed before this line is resumed, not done
        logger.info(
            "held-out accuracy %.3f (%s, step %d) | run directory: %s",
            results["target_accuracy"],
            cfg.selection,
            results["selection"]["step"],
            out,
        )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if cfg.push_to_hub and accelerator.is_main_process:
        url = push_run(out, cfg.push_to_hub, private=cfg.hub_private, revision=cfg.hub_revision)
        logger.info("published to %s", url)
    return results


def _make_record(
    state: TrainState,
    acc: dict[str, dict[str, float]],
    sources: list[str],
    targets: list[str],
    steps_per_epoch: int,
    lr: float,
) -> dict[str, Any]:
    record: dict[str, Any] = {
        "step": state.step,
        "epoch": state.step / steps_per_epoch,
        "acc": acc,
        "source_val_acc": sum(acc[d]["out"] for d in sources) / len(sources),
        "target_acc": sum(acc[d]["in"] for d in targets) / len(targets),
        "lr": lr,
        "train_seconds": state.train_seconds,
        "images_per_second": state.images / max(state.train_seconds, 1e-9),
    }
    # Step metrics are already averaged over processes (fit): here over the steps since the last evaluation.
    record.update({k: sum(v) / len(v) for k, v in sorted(state.interval.items())})
    return record


def _tracker_config(cfg: TrainConfig) -> dict[str, Any]:
    """Recipe values as scalars (TensorBoard's hparams accept no lists or None)."""
    flat: dict[str, Any] = {}
    for key, value in cfg.to_dict().items():
        if key == "hparams":
            flat.update(
                {f"hparams.{k}": v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in value.items()}
            )
        elif isinstance(value, list):
            flat[key] = ",".join(map(str, value))
        elif value is None:
            flat[key] = "none"
        else:
            flat[key] = value
    return flat


def training_hparams(plan: RunPlan) -> dict[str, Any]:
    """The recipe's training settings as results.json's ``hparams`` lists them (before the algorithm's own)."""
    cfg = plan.config
    training = {
        "lr": cfg.lr,
        "batch_size": cfg.batch_size,
        "optimizer": cfg.optimizer,
        "weight_decay": cfg.weight_decay,
        "lr_schedule": cfg.lr_schedule,
        "dropout": cfg.dropout,
        "freeze_bn": cfg.freeze_bn,
        "augment": plan.augment,
        "image_size": plan.image_size,
        "holdout_fraction": cfg.holdout_fraction,
        "mixed_precision": cfg.mixed_precision,
    }
    if cfg.optimizer == "sgd":
        training["momentum"] = cfg.momentum
    for key in ("warmup_steps", "grad_accumulation", "clip_grad_norm"):  # listed when they change the recipe
        if getattr(cfg, key) != getattr(TrainConfig, key):
            training[key] = getattr(cfg, key)
    return training


def split_sizes(plan: RunPlan) -> dict[str, dict[str, int]]:
    """Images in the in and out split of every domain the run uses."""
    return {d: {"in": len(plan.splits.in_rows[d]), "out": len(plan.splits.out_rows[d])} for d in plan.splits.in_rows}


def _results(
    cfg: TrainConfig, plan: RunPlan, state: TrainState, algorithm: Composition, accelerator: Any, model: nn.Module
) -> dict[str, Any]:

    sources, targets = list(plan.protocol.sources), list(plan.protocol.targets)
    selections = {m: select(state.records, m, sources, targets) for m in SELECTION_METHODS}
    chosen = selections[cfg.selection]
    host, addons = plan.host, plan.addons
    training = training_hparams(plan)
    data_info = plan.data.info()
    return RunResults.create(
        {
            "algorithm": cfg.algorithm,
            "host_algorithm": host.name,
            "addons": [a.name for a in addons],
            "algorithm_title": " + ".join([host.title or host.name, *[a.title or a.name for a in addons]]),
            "backbone": cfg.backbone,
            "pretrained": cfg.pretrained,
            "base_model": model.pretrained_cfg.get("hf_hub_id") if cfg.pretrained else None,
            "dataset": {
                k: data_info[k] for k in ("name", "title", "source", "repo_id", "revision", "path", "fingerprint")
            },
            "class_names": plan.data.class_names,
            "protocol": plan.protocol.name,
            "source_domains": sources,
            "target_domains": targets,
            "seed": cfg.seed,
            "split_seed": cfg.resolved_split_seed(),
            "steps": cfg.steps,
            "init_from": plan.init.provenance() if plan.init else None,
            "selection": {"method": chosen["method"], "step": chosen["step"], "score": chosen["score"]},
            "accuracy": chosen["accuracy"],
            "target_accuracy": chosen["target_accuracy"],
            "accuracy_splits": next(r["acc"] for r in state.records if r["step"] == chosen["step"]),
            "selections": selections,
            "hparams": {**training, **algorithm.hparams},
            "derived": plan.derived,
            "splits": split_sizes(plan),
            "diagnostics": with_acts(algorithm.summary(), [algorithm.host, *algorithm.addons]),
            "citations": algorithm.citations(),
            "timing": run_timing(state.train_seconds, state.images, state.step),
            **run_environment(accelerator.device, accelerator.num_processes),
        }
    ).to_json()
