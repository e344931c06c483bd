"""``dgzoo train --dry-run``: the resolved plan of a run, and an estimate of its time, without training or writing.

:func:`dry_run` validates the recipe exactly as :func:`dgzoo.training.engine.train` does (:func:`plan_run`), then
states what the run would do: the data and its splits, the image size and where it came from, the augmentation,
the backbone and its parameter count, the algorithm with every hyperparameter (and which are defaults), the steps
per epoch, the evaluation and checkpoint schedule and the output directory. The fields a finished run records in
``results.json`` carry the same names and, as a test checks, the same values.

The estimate comes from a few training steps timed on this machine, with the run's batch, transforms and
algorithm, and from one timed evaluation batch. Those steps train a throw-away copy of the network (randomly
initialised even for ``--pretrained``, since the weights do not change the cost and so nothing is downloaded),
with no tracker and no project directory: nothing is written and no directory is made.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from .._version import __version__
from ..algorithms import flat_hparams
from ..config import TrainConfig
from ..data import DomainImages, eval_loader, loader_workers
from ..models import create_backbone, data_config, freeze_batchnorm
from .derived import derived_line
from .engine import build_loop_data, optimisation, split_sizes, training_hparams
from .loop import TrainState, build_algorithm, fit
from .optimisation import create_scheduler
from .plan import RunPlan, plan_run
from .session import check_process_split, create_accelerator, device_name

TIMED_STEPS = 3  # after one untimed warm-up step (first-call set-up: allocations, kernel selection)


def planned_results(plan: RunPlan, num_processes: int = 1) -> dict[str, Any]:
    """The fields of ``results.json`` that are known before training, as the finished run will record them."""
    cfg, host, addons = plan.config, plan.host, plan.addons
    info = plan.data.info()
    return {
        "algorithm": cfg.algorithm,
        "host_algorithm": host.name,
        "addons": [a.name for a in addons],
        "algorithm_title": " + ".join([host.title or host.name, *[a.title or a.name for a in addons]]),
        "backbone": cfg.backbone,
        "pretrained": cfg.pretrained,
        "dataset": {k: info[k] for k in ("name", "title", "source", "repo_id", "revision", "path", "fingerprint")},
        "class_names": plan.data.class_names,
        "protocol": plan.protocol.name,
        "source_domains": list(plan.protocol.sources),
        "target_domains": list(plan.protocol.targets),
        "seed": cfg.seed,
        "split_seed": cfg.resolved_split_seed(),
        "steps": cfg.steps,
        "hparams": {**training_hparams(plan), **flat_hparams(plan.hparams, host.name)},
        "derived": plan.derived,
        "splits": split_sizes(plan),
        "num_processes": num_processes,
        "dgzoo_version": __version__,
    }


def hparam_sources(plan: RunPlan) -> dict[str, str]:
    """``given`` or ``default`` for every key of ``results.json``'s ``hparams``."""
    cfg, host = plan.config, plan.host.name
    defaults = TrainConfig()
    out = {}
    for key in training_hparams(plan):
        if key in ("augment", "image_size"):
            out[key] = plan.derived[key]["source"]
        else:
            out[key] = "given" if getattr(cfg, key) != getattr(defaults, key) else "default"
    given = {k if "." in str(k) else f"{host}.{k}" for k in cfg.hparams}
    for name, values in plan.hparams.items():
        for key in values:
            out[key if name == host else f"{name}.{key}"] = "given" if f"{name}.{key}" in given else "default"
    return out


def schedule(cfg: TrainConfig, steps_per_epoch: int) -> dict[str, Any]:
    """When the run evaluates and checkpoints (every N steps, and at the last step)."""
    evals = sorted({*range(cfg.eval_every, cfg.steps + 1, cfg.eval_every), cfg.steps})
    every = cfg.resolved_checkpoint_every()
    checkpoints = sorted({*range(every, cfg.steps + 1, every), cfg.steps})
    return {
        "steps_per_epoch": steps_per_epoch,
        "epochs": cfg.steps / steps_per_epoch,
        "evaluations": {"every": cfg.eval_every, "count": len(evals), "first": evals[0], "last": evals[-1]},
        "checkpoints": {"every": every, "count": len(checkpoints), "keep": cfg.keep_checkpoints},
    }


def _count(module: torch.nn.Module, trainable: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable)


def time_run(plan: RunPlan, steps: int = TIMED_STEPS) -> dict[str, Any]:
    """Train a throw-away copy for ``1 + steps`` steps and evaluate one batch, timing both; return the estimate
    of the whole run and the model's parameter counts. Writes nothing."""
    from accelerate.utils import set_seed

    cfg, data = plan.config, plan.data
    accelerator = create_accelerator(cfg.mixed_precision, None, None, plan.host.FIND_UNUSED_PARAMETERS)
    check_process_split(cfg.batch_size, cfg.grad_accumulation, accelerator.num_processes)
    set_seed(cfg.seed)
    network = create_backbone(cfg.backbone, data.num_classes, False, plan.image_size, cfg.dropout)
    if cfg.freeze_bn:
        freeze_batchnorm(network)
    parameters = {"backbone": _count(network)}
    preprocessing = data_config(network, plan.image_size)
    workers, pin = loader_workers(cfg.num_workers, accelerator.device)
    loop_data, eval_tf = build_loop_data(plan, preprocessing, workers, pin)
    algorithm = build_algorithm(
        cfg.algorithm,
        network,
        data.num_classes,
        len(plan.protocol.sources),
        plan.hparams,
        accelerator,
        optimisation(cfg),
    )
    parameters["trainable"] = _count(algorithm.host, trainable=True)  # with the modules the host adds
    scheduler = create_scheduler(algorithm.host.optimizer, cfg.lr_schedule, cfg.steps, cfg.warmup_steps)
    state = TrainState()
    fit(algorithm, loop_data, accelerator, scheduler, state, 1, desc="warm-up")
    warm = state.train_seconds
    fit(algorithm, loop_data, accelerator, scheduler, state, 1 + steps, desc="timing")
    per_step = (state.train_seconds - warm) / steps

    domain = plan.protocol.sources[0]
    loader = eval_loader(
        DomainImages(data, plan.splits.in_rows[domain], eval_tf, domain), cfg.eval_batch_size, workers, pin
    )
    x, _ = next(iter(loader))
    model = algorithm.evaluated_network()
    model.eval()
    with torch.no_grad(), accelerator.autocast():
        model(x.to(accelerator.device))  # warm-up: the first eval-mode call sets up what later ones reuse
        if accelerator.device.type == "cuda":
            torch.cuda.synchronize(accelerator.device)
        tick = time.perf_counter()
        model(x.to(accelerator.device))
        if accelerator.device.type == "cuda":
            torch.cuda.synchronize(accelerator.device)
        per_image = (time.perf_counter() - tick) / len(x)
    evaluated = sum(n["in"] + n["out"] for n in split_sizes(plan).values())
    evaluations = schedule(cfg, loop_data.steps_per_epoch)["evaluations"]["count"]
    eval_seconds = per_image * math.ceil(evaluated / accelerator.num_processes) * evaluations
    estimate = {
        "timed_steps": steps,
        "seconds_per_step": per_step,
        "train_seconds": per_step * cfg.steps,
        "eval_seconds_per_image": per_image,
        "eval_seconds": eval_seconds,
        "total_seconds": per_step * cfg.steps + eval_seconds,
        "device": device_name(accelerator.device),
    }
    return {
        "parameters": parameters,
        "steps_per_epoch": loop_data.steps_per_epoch,
        "num_processes": accelerator.num_processes,
        "is_main_process": accelerator.is_main_process,
        "estimate": estimate,
    }


def dry_run(cfg: TrainConfig, timed_steps: int = TIMED_STEPS) -> dict[str, Any]:
    """The resolved plan of ``cfg`` with a time estimate (``timed_steps`` 0: no timing); trains and writes nothing.

    Raises DGZooError for a bad recipe, exactly as ``train(cfg)`` would before writing anything.
    """
    plan = plan_run(cfg, remember_checks=False)  # writes nothing anywhere, not even into dgzoo's cache
    timing = time_run(plan, timed_steps) if timed_steps > 0 else None
    num_processes = timing["num_processes"] if timing else 1
    sources = plan.protocol.sources
    sizes = split_sizes(plan)
    steps_per_epoch = (
        timing["steps_per_epoch"]
        if timing
        else max(1, math.ceil(min(sizes[d]["in"] for d in sources) / cfg.batch_size))
    )
    out = plan.output_dir
    return {
        **planned_results(plan, num_processes),
        "hparam_sources": hparam_sources(plan),
        "batch": {
            "per_domain": cfg.batch_size,
            "per_step": cfg.batch_size * len(sources),
            "per_process_per_domain": cfg.batch_size // num_processes,
            "micro_batches": cfg.grad_accumulation,
        },
        "parameters": timing["parameters"] if timing else None,
        **schedule(cfg, steps_per_epoch),
        "output_dir": str(out),
        "output_dir_state": (
            "resumed" if cfg.resume else "replaced (--overwrite)" if cfg.overwrite and out.exists() else "new"
        ),
        "push_to_hub": cfg.push_to_hub,
        "warnings": plan.warnings,
        "estimate": timing["estimate"] if timing else None,
        "is_main_process": timing["is_main_process"] if timing else True,
    }


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def format_plan(plan: dict[str, Any]) -> str:
    """The plan as ``dgzoo train --dry-run`` prints it."""
    d, derived = plan["dataset"], plan["derived"]
    origin = {"hub": f"Hub {d['repo_id']} @ {(d['revision'] or 'main')[:12]}", "builtin": "embedded"}.get(
        d["source"], f"{d['source']} {d['path']}"
    )
    lines = [
        "dry run: nothing was trained or written",
        derived_line(derived),
        *[f"warning: {w}" for w in plan["warnings"]],
        "",
        f"data       {d['title']} ({origin}), {len(plan['class_names'])} classes; {plan['protocol']}: "
        f"sources {', '.join(plan['source_domains'])} -> held-out {', '.join(plan['target_domains'])}",
    ]
    roles = {**{s: "source" for s in plan["source_domains"]}, **{t: "held-out" for t in plan["target_domains"]}}
    for domain, n in plan["splits"].items():
        use = "trains on in, validates on out" if roles.get(domain) == "source" else "tested on in; out: oracle"
        lines.append(f"  {domain:<14} {roles.get(domain, 'unused'):<9} in {n['in']:>6}  out {n['out']:>6}  ({use})")
    image_size = derived["image_size"]
    lines.append(
        f"images     size {image_size['value'] or 'the backbone default'} ({image_size['source']}); "
        f"augment {derived['augment']['value']} ({derived['augment']['source']})"
    )
    params = plan["parameters"]
    counted = (
        (
            f", {params['backbone'] / 1e6:.2f} M parameters ({params['trainable'] / 1e6:.2f} M trainable with the "
            f"algorithm's modules)"
        )
        if params
        else ""
    )
    lines.append(f"backbone   {plan['backbone']} ({'pretrained' if plan['pretrained'] else 'from scratch'}){counted}")
    lines.append(f"algorithm  {plan['algorithm']} ({plan['algorithm_title']})")
    sources = plan["hparam_sources"]
    width = max(len(k) for k in plan["hparams"])
    for key, value in plan["hparams"].items():
        lines.append(f"  {key:<{width}} {value!s:<12} {sources[key]}")
    batch = plan["batch"]
    lines.append(
        f"schedule   {plan['steps']} steps of {batch['per_domain']} images per source domain "
        f"({batch['per_step']} per step, {plan['num_processes']} process(es)); "
        f"{plan['steps_per_epoch']} steps per epoch ({plan['epochs']:.1f} epochs)"
    )
    ev, ck = plan["evaluations"], plan["checkpoints"]
    lines.append(
        f"           evaluate every {ev['every']} steps ({ev['count']} evaluations, steps {ev['first']} .. "
        f"{ev['last']}); checkpoint every {ck['every']} steps ({ck['count']}, keeping {ck['keep']}); "
        f"selection {derived['selection']['value']}"
    )
    lines.append(
        f"output     {plan['output_dir']} ({plan['output_dir_state']})"
        + (f"; then pushed to {plan['push_to_hub']}" if plan["push_to_hub"] else "")
    )
    est = plan["estimate"]
    if est:
        lines.append(
            f"estimate   about {_duration(est['total_seconds'])} on {est['device']}: "
            f"{est['seconds_per_step']:.3f} s per step x {plan['steps']} (timed over {est['timed_steps']} "
            f"steps) + {_duration(est['eval_seconds'])} of evaluation"
        )
        if plan["addons"]:
            lines.append(
                f"           the timed steps are steps 2-{1 + est['timed_steps']}: add-on work at other steps "
                f"(an annealing window, epoch ends) is not in the estimate; see docs/gga.md, docs/iu.md"
            )
    return "\n".join(lines)
