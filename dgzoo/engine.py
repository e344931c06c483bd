"""The training loop, on Accelerate.

:func:`train` reads top to bottom like an Accelerate example:

1. :func:`plan_run` checks everything that can be wrong with the recipe *before* anything is written:
   config values, backbone name, algorithm and hyperparameters, dataset, domains, output directory.
2. The Accelerator, model, data and optimizer are set up; the algorithm (with its add-ons) is composed.
3. The loop: one ``update`` per step on one minibatch per source domain; add-on epoch events; every
   ``eval_every`` steps every domain's in/out split is evaluated, the record is written to records.jsonl and
   the model selected by training-domain validation is exported; every ``checkpoint_every`` steps a
   resumable checkpoint is saved.
4. The run directory is finalised: results.json, model card, plots; optionally pushed to the Hub.

The engine knows nothing about any particular algorithm.
"""
from __future__ import annotations

import json
import logging
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

from . import __version__
from .algorithms import AddOn, Algorithm, EpochContext, create_algorithm, parse_algorithm, resolve_hparams
from .cards import plot_run, render_card
from .config import NON_RESULT_FIELDS, TrainConfig, changed_fields, dump_config
from .data import (DGDataset, DomainImages, DomainSplits, Protocol, eval_loader, eval_transform, load_dg_dataset,
                   loader_workers, make_splits, resolve_protocol, train_loader, train_transform)
from .errors import DGZooError
from .evaluation import SELECTION_METHODS, evaluate, select
from .export import (atomic_write_text, check_output_dir, checkpoint_dirs, clear_run_dir, latest_checkpoint,
                     read_json, save_model, write_json)
from .models import check_backbone, create_backbone, data_config, freeze_batchnorm

logger = logging.getLogger("dgzoo")

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


@dataclass
class TrainState:
    """Loop state saved in every checkpoint (plain Python values only, so it loads with ``weights_only``)."""

    step: int = 0
    train_seconds: float = 0.0
    images: int = 0
    best_score: float = -1.0
    best_step: int = -1
    records: list[dict[str, Any]] = field(default_factory=list)
    interval: dict[str, list[float]] = field(default_factory=dict)  # step metrics since the last evaluation

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)


def plan_run(cfg: TrainConfig) -> RunPlan:
    """Validate a recipe completely, loading the dataset index but writing nothing. Raises DGZooError."""
    cfg.validate()
    check_backbone(cfg.backbone)
    hparams = resolve_hparams(cfg.algorithm, cfg.hparams)
    host_cls, addon_classes = parse_algorithm(cfg.algorithm)
    for component in (host_cls, *addon_classes):
        component.check_precision(hparams[component.name], cfg.mixed_precision)
    if cfg.push_to_hub:
        from .hub import check_push_target

        check_push_target(cfg.push_to_hub, private=cfg.hub_private, revision=cfg.hub_revision)
    if cfg.output_dir:  # fail before a possibly long dataset download when the answer is already known
        check_output_dir(cfg.output_dir, cfg.resume, cfg.overwrite)
    data = load_dg_dataset(cfg.dataset, cfg.revision, cfg.image_column, cfg.label_column, cfg.domain_column)
    protocol = resolve_protocol(data, cfg.target_domains, cfg.source_domains)
    splits = make_splits(data, cfg.holdout_fraction, cfg.resolved_split_seed())  # a too-small domain fails here
    augment = resolve_augment(cfg, data)
    host_cls.check_recipe(hparams[host_cls.name], augment, len(protocol.sources))
    output_dir = Path(cfg.output_dir or cfg.default_output_dir(list(protocol.targets)))
    check_output_dir(output_dir, cfg.resume, cfg.overwrite)
    if cfg.resume:
        _check_resume_config(cfg, output_dir)
    return RunPlan(cfg, data, protocol, splits, output_dir, hparams, host_cls, addon_classes, augment)


def resolve_augment(cfg: TrainConfig, data: DGDataset) -> str:
    """The training augmentation: ``--augment``, or for ``auto`` the dataset's default (DomainBed's otherwise)."""
    if cfg.augment != "auto":
        return cfg.augment
    return data.spec.augment if data.spec else "domainbed"


def _check_resume_config(cfg: TrainConfig, output_dir: Path) -> None:
    saved_path = output_dir / "train_config.json"
    if not saved_path.exists():
        raise DGZooError(f"{output_dir} has checkpoints but no train_config.json; it was not written by dgzoo train")
    saved = read_json(saved_path)
    changed, diffs = changed_fields(saved, cfg.to_dict(), RESUMABLE_CHANGES)
    if changed:
        raise DGZooError(f"cannot resume {output_dir} with a different recipe ({diffs}); resume with the original "
                         f"settings, or start a new run in another --output-dir")
    done_step = saved.get("steps")
    if (output_dir / "results.json").exists() and cfg.steps <= int(done_step or 0):
        raise DGZooError(f"the run in {output_dir} already finished its {done_step} steps; pass a larger --steps "
                         f"to train further")


def _trackers(cfg: TrainConfig) -> list[str] | None:
    if cfg.log_with == "none":
        return None
    if cfg.log_with == "auto":
        from accelerate.utils import is_tensorboard_available

        return ["tensorboard"] if is_tensorboard_available() else None
    return [t.strip() for t in cfg.log_with.split(",") if t.strip()]


def multiprocess_cpu() -> bool:
    """Several processes launched (torchrun / accelerate launch) on a machine without an accelerator.

    Accelerate only forms a gloo process group on CPU when asked to, otherwise each process would silently
    train alone; dgzoo asks whenever the launcher started several processes and no GPU is visible.
    """
    has_gpu = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
    return not has_gpu and int(os.environ.get("WORLD_SIZE", "1")) > 1


def create_accelerator(mixed_precision: str, log_with: list[str] | None = None,
                       project_dir: Path | None = None) -> Any:
    """An ``accelerate.Accelerator`` for one run of this process (training or unlearning).

    Accelerate keeps its settings in a process-wide singleton; a previous run in this process (a sweep, a test,
    a notebook) may have used other ones, so they are reset first, keeping the process group (PartialState).
    Tracker logs go to ``project_dir/logs``.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import ProjectConfiguration

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    project = (ProjectConfiguration(project_dir=str(project_dir), logging_dir=str(project_dir / "logs"))
               if project_dir is not None else None)
    return Accelerator(cpu=multiprocess_cpu(), mixed_precision=mixed_precision, log_with=log_with,
                       project_config=project)


def create_optimizer(params: Any, optimizer: str, lr: float, weight_decay: float = 0.0,
                     momentum: float = 0.9) -> torch.optim.Optimizer:
    """Adam, AdamW or SGD (with momentum) over ``params``."""
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    cls = torch.optim.AdamW if optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=lr, weight_decay=weight_decay)


def lr_lambda(schedule: str, steps: int) -> Callable[[int], float]:
    """The learning-rate multiplier at each step: constant, or cosine from 1 to 0 over ``steps``."""
    if schedule == "cosine":
        return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, steps) / steps))
    return lambda step: 1.0


class _ProgressAwareHandler(logging.StreamHandler):
    """A console handler whose lines do not land on the end of a running progress bar: ``tqdm.write`` clears
    the bar, prints the line and redraws the bar below it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm.auto import tqdm

            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:  # logging must never break training; report it the standard way
            self.handleError(record)


def setup_logging(is_main: bool, logfile: Path) -> None:
    """Log to stdout (main process; others only warnings) and, on the main process, to ``logfile``."""
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    console = _ProgressAwareHandler(sys.stdout)
    console.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(console)
    if is_main:
        handler = logging.FileHandler(logfile)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)


def run_timing(seconds: float, images: int, steps: int) -> dict[str, float]:
    """results.json's ``timing``: training time and throughput (training images only, evaluation excluded)."""
    return {"train_seconds": seconds, "images_per_second": images / max(seconds, 1e-9), "train_images": images,
            "steps_per_second": steps / max(seconds, 1e-9)}


def start_run_dir(accelerator: Any, out: Path, overwrite: bool, recipe: tuple[str, str], logfile: str) -> None:
    """The first write of a run, once every check has passed: on the main process empty a replaced run's files
    (``overwrite``), make ``out`` and write the recipe file ``(name, text)``; then every process logs to
    ``out/logfile`` (the main one) and the console."""
    if accelerator.is_main_process:
        if overwrite:
            clear_run_dir(out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / recipe[0], recipe[1])
    accelerator.wait_for_everyone()
    setup_logging(accelerator.is_main_process, out / logfile)


def device_name(device: torch.device) -> str:
    """A readable name of the device a run used (for results.json and the card)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU ({os.cpu_count()} cores)"


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train, evaluate and export one run as described by ``cfg``; return its results.json content."""
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    plan = plan_run(cfg)
    out = plan.output_dir
    sources, targets = list(plan.protocol.sources), list(plan.protocol.targets)

    accelerator = create_accelerator(cfg.mixed_precision, _trackers(cfg), out)
    if cfg.batch_size % accelerator.num_processes:
        raise DGZooError(f"--batch-size {cfg.batch_size} (per domain, global) must be divisible by the "
                         f"{accelerator.num_processes} processes; use a multiple of {accelerator.num_processes}")
    start_run_dir(accelerator, out, cfg.overwrite, ("train_config.json", dump_config(cfg)), "train.log")
    from .runtime import AccelerateRuntime

    runtime = AccelerateRuntime(accelerator)
    set_seed(cfg.seed)

    # -- model and data
    data = plan.data
    image_size = cfg.image_size or (data.spec.image_size if data.spec else None)
    model = create_backbone(cfg.backbone, data.num_classes, cfg.pretrained, image_size, cfg.dropout)
    if cfg.freeze_bn:
        freeze_batchnorm(model)
    preprocessing = data_config(model, image_size)
    augment = plan.augment
    splits = plan.splits
    own_tf = plan.host.train_transform(preprocessing, augment, plan.hparams[plan.host.name], len(sources))
    train_tf = own_tf or train_transform(preprocessing, augment)
    eval_tf = eval_transform(preprocessing)
    random_tf = own_tf is not None or augment != "none"
    train_sets = [DomainImages(data, splits.in_rows[d], train_tf, d, random=random_tf) for d in sources]
    workers, pin = loader_workers(cfg.num_workers, accelerator.device)
    eval_loaders = {d: {split: accelerator.prepare_data_loader(eval_loader(
        DomainImages(data, rows[d], eval_tf, d), cfg.eval_batch_size, workers, pin))
        for split, rows in (("in", splits.in_rows), ("out", splits.out_rows))} for d in data.domains}

    # -- optimisation
    optimizer = create_optimizer([p for p in model.parameters() if p.requires_grad], cfg.optimizer, cfg.lr,
                                 cfg.weight_decay, cfg.momentum)
    model, optimizer = accelerator.prepare(model, optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg.lr_schedule, cfg.steps))
    algorithm = create_algorithm(cfg.algorithm, model, optimizer, len(sources), cfg.hparams, runtime)
    state = TrainState()
    accelerator.register_for_checkpointing(scheduler, algorithm, state)

    if cfg.resume:
        checkpoint = latest_checkpoint(out)
        accelerator.load_state(str(checkpoint))
        logger.info("resumed from %s at step %d", checkpoint, state.step)
    steps_per_epoch = max(1, math.ceil(min(len(s) for s in train_sets) / cfg.batch_size))
    metadata = {"algorithm": cfg.algorithm, "dataset": data.info()["name"], "dataset_repo_id": data.repo_id,
                "dataset_revision": data.revision, "source_domains": sources, "target_domains": targets,
                "protocol": plan.protocol.name, "dgzoo_version": __version__}
    unwrapped = runtime.unwrap(model)
    if accelerator.is_main_process:
        logger.info("dgzoo %s | %s on %s | sources %s -> held-out %s | %s, %d classes, %d process(es) on %s",
                    __version__, cfg.algorithm, data.name, sources, targets, cfg.backbone, data.num_classes,
                    accelerator.num_processes, accelerator.device)
        accelerator.init_trackers("dgzoo", config=_tracker_config(cfg))

    # What post-epoch add-ons see: the source domains' splits with the evaluation transform.
    epoch_train = [DomainImages(data, splits.in_rows[d], eval_tf, d) for d in sources]
    epoch_val = [DomainImages(data, splits.out_rows[d], eval_tf, d) for d in sources]

    # -- the loop
    loader = train_loader(train_sets, cfg.batch_size, cfg.seed, cfg.steps, state.step, accelerator.process_index,
                          accelerator.num_processes, workers, pin)
    images_per_step = cfg.batch_size * len(sources)
    progress = tqdm(total=cfg.steps, initial=state.step, disable=not accelerator.is_main_process, desc="train",
                    dynamic_ncols=True)
    tick = time.perf_counter()
    for minibatches in loader:
        minibatches = [(x.to(accelerator.device, non_blocking=True), y.to(accelerator.device, non_blocking=True))
                       for x, y in minibatches]
        metrics = algorithm.update(minibatches, state.step)
        scheduler.step()
        state.step += 1
        state.images += images_per_step
        if state.step % steps_per_epoch == 0:
            context = EpochContext(epoch=state.step // steps_per_epoch, step=state.step,
                                   steps_per_epoch=steps_per_epoch, source_domains=sources, source_train=epoch_train,
                                   source_val=epoch_val, make_loader=lambda ds, bs: eval_loader(ds, bs, workers, pin),
                                   batch_size=cfg.batch_size)
            metrics.update(algorithm.on_epoch_end(context))
        state.train_seconds += time.perf_counter() - tick
        for key, value in metrics.items():
            state.interval.setdefault(key, []).append(float(value))
        accelerator.log(metrics, step=state.step)
        progress.update(1)
        if "loss" in metrics:
            progress.set_postfix(loss=f"{metrics['loss']:.3f}", refresh=False)

        if state.step % cfg.eval_every == 0 or state.step == cfg.steps:
            runtime.sync_buffers(unwrapped)
            acc = evaluate(model, eval_loaders, accelerator.device, accelerator.gather_for_metrics)
            record = _make_record(state, acc, sources, targets, steps_per_epoch, scheduler, runtime)
            state.interval = {}
            state.records.append(record)
            score = record["source_val_acc"]
            new_best = score > state.best_score
            if new_best:
                state.best_score, state.best_step = score, state.step
            if accelerator.is_main_process:
                atomic_write_text(out / "records.jsonl", "".join(json.dumps(r) + "\n" for r in state.records))
                if new_best and cfg.selection == "training_domain_validation":
                    save_model(unwrapped, out, data.class_names, preprocessing, metadata)
                logger.info("step %d: source val %.3f | held-out %.3f%s", state.step, score, record["target_acc"],
                            " (best)" if new_best else "")
            accelerator.log({"eval/source_val_acc": score, "eval/target_acc": record["target_acc"]},
                            step=state.step)
        if state.step % cfg.resolved_checkpoint_every() == 0 or state.step == cfg.steps:
            _save_checkpoint(accelerator, out, state.step, cfg.keep_checkpoints)
        tick = time.perf_counter()
    progress.close()

    # -- finalise the run directory
    if cfg.selection != "training_domain_validation" and accelerator.is_main_process:
        save_model(unwrapped, out, data.class_names, preprocessing, metadata)
    results = _results(cfg, plan, state, algorithm, accelerator, unwrapped, image_size)
    if accelerator.is_main_process:
        write_json(out / "results.json", results)
        plot_run(results, state.records, out)
        atomic_write_text(out / "README.md", render_card(results, cfg.to_dict(), run_dir=out))
        logger.info("held-out accuracy %.3f (%s, step %d) | run directory: %s", results["target_accuracy"],
                    cfg.selection, results["selection"]["step"], out)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if cfg.push_to_hub and accelerator.is_main_process:
        from .hub import push_run

        url = push_run(out, cfg.push_to_hub, private=cfg.hub_private, revision=cfg.hub_revision)
        logger.info("published to %s", url)
    return results


def _make_record(state: TrainState, acc: dict[str, dict[str, float]], sources: list[str], targets: list[str],
                 steps_per_epoch: int, scheduler: Any, runtime: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "step": state.step, "epoch": state.step / steps_per_epoch, "acc": acc,
        "source_val_acc": sum(acc[d]["out"] for d in sources) / len(sources),
        "target_acc": sum(acc[d]["in"] for d in targets) / len(targets),
        "lr": scheduler.get_last_lr()[0], "train_seconds": state.train_seconds,
        "images_per_second": state.images / max(state.train_seconds, 1e-9)}
    # Step metrics (e.g. the loss) are measured on each process's share of the batch: average them globally.
    keys = sorted(state.interval)
    if keys:
        means = torch.tensor([sum(state.interval[k]) / len(state.interval[k]) for k in keys], device=runtime.device)
        record.update(zip(keys, runtime.all_reduce_mean(means).tolist()))
    return record


def _save_checkpoint(accelerator: Any, out: Path, step: int, keep: int) -> None:
    """Save a resumable checkpoint to checkpoints/step_N, atomically (written under a temporary name first)."""
    root = out / "checkpoints"
    tmp = root / f".tmp_step_{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = root / f"step_{step}"
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoint_dirs(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def _tracker_config(cfg: TrainConfig) -> dict[str, Any]:
    """Recipe values as scalars (TensorBoard's hparams accept no lists or None)."""
    flat: dict[str, Any] = {}
    for key, value in cfg.to_dict().items():
        if key == "hparams":
            flat.update({f"hparams.{k}": v if isinstance(v, (int, float, str, bool)) else str(v)
                         for k, v in value.items()})
        elif isinstance(value, list):
            flat[key] = ",".join(map(str, value))
        elif value is None:
            flat[key] = "none"
        else:
            flat[key] = value
    return flat


def _results(cfg: TrainConfig, plan: RunPlan, state: TrainState, algorithm: Any, accelerator: Any,
             model: torch.nn.Module, image_size: int | None) -> dict[str, Any]:
    import timm

    sources, targets = list(plan.protocol.sources), list(plan.protocol.targets)
    selections = {m: select(state.records, m, sources, targets) for m in SELECTION_METHODS}
    chosen = selections[cfg.selection]
    host, addons = plan.host, plan.addons
    training = {"lr": cfg.lr, "batch_size": cfg.batch_size, "optimizer": cfg.optimizer,
                "weight_decay": cfg.weight_decay, "lr_schedule": cfg.lr_schedule, "dropout": cfg.dropout,
                "freeze_bn": cfg.freeze_bn, "augment": plan.augment, "image_size": image_size,
                "holdout_fraction": cfg.holdout_fraction, "mixed_precision": cfg.mixed_precision}
    if cfg.optimizer == "sgd":
        training["momentum"] = cfg.momentum
    data_info = plan.data.info()
    return {
        "algorithm": cfg.algorithm, "host_algorithm": host.name, "addons": [a.name for a in addons],
        "algorithm_title": " + ".join([host.title or host.name, *[a.title or a.name for a in addons]]),
        "backbone": cfg.backbone, "pretrained": cfg.pretrained,
        "base_model": model.pretrained_cfg.get("hf_hub_id") if cfg.pretrained else None,
        "dataset": {k: data_info[k] for k in ("name", "title", "source", "repo_id", "revision", "path")},
        "class_names": plan.data.class_names, "protocol": plan.protocol.name,
        "source_domains": sources, "target_domains": targets,
        "seed": cfg.seed, "split_seed": cfg.resolved_split_seed(), "steps": cfg.steps,
        "selection": {"method": chosen["method"], "step": chosen["step"], "score": chosen["score"]},
        "accuracy": chosen["accuracy"], "target_accuracy": chosen["target_accuracy"],
        "accuracy_splits": next(r["acc"] for r in state.records if r["step"] == chosen["step"]),
        "selections": selections,
        "hparams": {**training, **algorithm.hparams},
        "diagnostics": algorithm.summary(),
        "citations": algorithm.citations(),
        "timing": run_timing(state.train_seconds, state.images, state.step),
        "num_processes": accelerator.num_processes, "device": device_name(accelerator.device),
        "dgzoo_version": __version__, "timm_version": timm.__version__, "torch_version": torch.__version__,
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
