"""Make a soup: average the ingredients' weights into one network, evaluate it and write it as a run directory.

Methods:

- ``uniform`` (DiWA, Rame et al. 2022): the plain average of every ingredient.
- ``greedy`` (model soups, Wortsman et al. 2022, Algorithm 1): ingredients sorted by their own source-validation
  accuracy, best first; the soup starts as the best one and each next ingredient stays only if the soup's
  source-validation accuracy with it does not fall (``>=``, the paper's rule; the reference code uses ``>``).
- ``top-k``: the uniform average of the ``k`` ingredients with the best source-validation accuracy.

Selection only ever reads the source domains' validation (``out``) splits; held-out accuracy of each ingredient is
measured too, and reported as an extra, never used. The ingredients are collected and checked by
:mod:`dgzoo.experiments.soup_ingredients` before anything is written. BatchNorm statistics of every averaged
network are recomputed on source training batches (SWAD's ``update_bn``,
:func:`dgzoo.algorithms.averaging.recompute_batchnorm`) unless the ingredients kept them frozen (``--freeze-bn``).
The soup is evaluated on every domain split as a run is, and written as a normal run directory (timm weights,
results.json with its ingredients, card, plots), so ``dgzoo push``, ``eval``, ``report`` and the zoo treat it like
any run. See docs/soups.md.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shlex
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .._version import __version__
from ..algorithms.averaging import recompute_batchnorm
from ..config import PLACEMENT_FIELDS, TrainConfig
from ..data import domain_split_images, evaluation_loaders, loader_workers
from ..data.inspect import contact_sheet
from ..errors import DGZooError
from ..models import create_backbone, data_config
from ..run.cards import plot_run, render_card
from ..run.identity import run_identity
from ..run.provenance import code_version
from ..run.results import RunResults
from ..run.rundir import SAMPLES_IMAGE, atomic_write_text, save_model, write_json
from ..run.selection import SELECTION_METHODS, select
from ..training.engine import (
    build_loop_data,
    claim_on_main,
    create_accelerator,
    plan_run,
    run_config_text,
    start_run_dir,
)
from ..training.evaluation import evaluate
from ..training.loop import source_batches
from ..training.session import run_environment
from .soup_ingredients import Ingredient, check_compatible, collect_ingredients, init_key
from .soup_weights import WeightSum

logger = logging.getLogger("dgzoo")

SOUP_METHODS = ("uniform", "greedy", "top-k")
DEFAULT_BN_STEPS = 500  # as +swad's bn_steps (the official SWAD default)
DIWA_CITATION = """@inproceedings{rame2022diwa,
  title={Diverse Weight Averaging for Out-of-Distribution Generalization},
  author={Rame, Alexandre and Kirchmeyer, Matthieu and Rahier, Thibaud and Rakotomamonjy, Alain and Gallinari,
          Patrick and Cord, Matthieu},
  booktitle={Advances in Neural Information Processing Systems (NeurIPS)},
  year={2022}
}"""
SOUPS_CITATION = """@inproceedings{wortsman2022soups,
  title={Model soups: averaging weights of multiple fine-tuned models improves accuracy without increasing
         inference time},
  author={Wortsman, Mitchell and Ilharco, Gabriel and Gadre, Samir Yitzhak and Roelofs, Rebecca and Gontijo-Lopes,
          Raphael and Morcos, Ari S and Namkoong, Hongseok and Farhadi, Ali and Carmon, Yair and Kornblith, Simon and
          Schmidt, Ludwig},
  booktitle={International Conference on Machine Learning (ICML)},
  year={2022}
}"""


# ---------------------------------------------------------------------- the soup


@dataclass
class SoupSettings:
    """How a soup is made (``dgzoo soup`` flags)."""

    method: str = "uniform"
    k: int | None = None  # top-k only
    bn_steps: int = DEFAULT_BN_STEPS
    freeze_bn: bool | None = None  # None: as the ingredients were trained (all with --freeze-bn: keep statistics)
    seed: int = 0  # of the order of the BatchNorm batches
    eval_batch_size: int = 128
    num_workers: int | None = None

    def check(self, n: int) -> None:
        if self.method not in SOUP_METHODS:
            raise DGZooError(f"--method '{self.method}' is not one of {', '.join(SOUP_METHODS)}")
        if self.method == "top-k":
            if self.k is None or isinstance(self.k, bool) or not 1 <= int(self.k) <= n:
                raise DGZooError(f"--method top-k needs --k between 1 and the {n} ingredients, got {self.k}")
        elif self.k is not None:
            raise DGZooError(f"--k applies to --method top-k only; drop it for {self.method}")
        if isinstance(self.bn_steps, bool) or int(self.bn_steps) < 0:
            raise DGZooError(f"--bn-steps must be a whole number >= 0, got {self.bn_steps}")


def soup_command(
    references: Sequence[str], output_dir: str | Path, settings: SoupSettings, cell: str | None = None
) -> str:
    """The ``dgzoo soup`` command line that makes this soup again."""
    parts = [
        "dgzoo soup",
        *map(shlex.quote, map(str, references)),
        "--output-dir",
        shlex.quote(str(output_dir)),
        "--method",
        settings.method,
    ]
    if settings.k is not None:
        parts += ["--k", str(settings.k)]
    if cell:
        parts += ["--cell", shlex.quote(cell)]
    if settings.bn_steps != DEFAULT_BN_STEPS:
        parts += ["--bn-steps", str(settings.bn_steps)]
    if settings.freeze_bn:
        parts.append("--freeze-bn")
    return " ".join(parts)


def soup(
    ingredients: Sequence[str | Path],
    output_dir: str | Path,
    method: str = "uniform",
    k: int | None = None,
    cell: str | None = None,
    bn_steps: int = DEFAULT_BN_STEPS,
    freeze_bn: bool | None = None,
    overwrite: bool = False,
    seed: int = 0,
    eval_batch_size: int = 128,
    num_workers: int | None = None,
    token: str | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Average the weights of ``ingredients`` (run directories, a sweep folder, Hub repos ``REPO@REV``) with
    ``method`` into a run directory ``output_dir``; return its results.json content.

    Every check (ingredients, compatibility, settings, dataset, output directory) runs before anything is written.
    """
    settings = SoupSettings(method, k, bn_steps, freeze_bn, seed, eval_batch_size, num_workers)
    found = collect_ingredients(ingredients, cell, token)
    settings.check(len(found))
    warnings = check_compatible(found)
    cfg = soup_config(found[0], output_dir, overwrite, settings)
    plan = plan_run(cfg)  # the dataset, its splits and the output directory, checked; nothing written
    if settings.freeze_bn is None:
        settings.freeze_bn = all(bool((i.results.hparams or {}).get("freeze_bn")) for i in found)
    command = soup_command([str(r) for r in ingredients], output_dir, settings, cell)
    accelerator = create_accelerator("no")
    with claim_on_main(accelerator, plan.output_dir, f"dgzoo soup {method}"):
        start_run_dir(
            accelerator, plan.output_dir, overwrite, ("train_config.json", soup_config_text(plan, found)), "soup.log"
        )
        say = log or logger.info
        for warning in warnings:
            logger.warning("warning: %s", warning)
        return _make_soup(found, settings, plan, accelerator, warnings, command, say)


def soup_config_text(plan: Any, found: Sequence[Ingredient]) -> str:
    """The soup's ``train_config.json``: the shared recipe with what it resolved and the provenance block a trained
    run writes (:func:`dgzoo.training.engine.run_config_text`), plus each ingredient's identity
    (:func:`dgzoo.run.identity.run_identity`): a soup is its method and the runs it averaged."""
    text = json.loads(run_config_text(plan))
    text["provenance"]["ingredients"] = [run_identity(i.results) for i in found]
    return json.dumps(text, indent=2)


def soup_config(first: Ingredient, output_dir: str | Path, overwrite: bool, settings: SoupSettings) -> TrainConfig:
    """The recipe the soup is evaluated under: its first ingredient's (dataset, domains, split, backbone, batch
    size), writing to ``output_dir``; written as the soup's train_config.json so tools that read a run's recipe
    find the shared settings."""
    values = {
        k: v
        for k, v in first.train_config.items()
        if k not in (*PLACEMENT_FIELDS, "init_from", "dry_run", "pretrained")
    }
    cfg = TrainConfig.from_dict(values, source=f"train_config.json of {first.name}")
    return dataclasses.replace(
        cfg,
        output_dir=str(output_dir),
        overwrite=overwrite,
        resume=False,
        log_with="none",
        eval_batch_size=settings.eval_batch_size,
        num_workers=settings.num_workers,
    )


def _make_soup(
    found: Sequence[Ingredient],
    settings: SoupSettings,
    plan: Any,
    accelerator: Any,
    warnings: list[str],
    command: str,
    say: Callable[[str], None],
) -> dict[str, Any]:
    cfg, data, out = plan.config, plan.data, plan.output_dir
    sources, targets = list(plan.protocol.sources), list(plan.protocol.targets)
    device = accelerator.device
    network = create_backbone(cfg.backbone, data.num_classes, False, plan.image_size, cfg.dropout).to(device).eval()
    preprocessing = data_config(network, plan.image_size)
    workers, pin = loader_workers(settings.num_workers, device)
    loop_data, eval_tf = build_loop_data(plan, preprocessing, workers, pin)
    eval_loaders = evaluation_loaders(  # one loader, one set of workers, for every evaluation of every candidate
        domain_split_images(data, plan.splits, eval_tf),
        settings.eval_batch_size,
        workers,
        pin,
    )
    source_loaders: dict[str, dict[str, Iterable[Any]]] = {d: {"out": eval_loaders[d]["out"]} for d in sources}
    batches = source_batches(loop_data, accelerator, settings.seed)
    like = {k: v.detach().cpu() for k, v in network.state_dict().items()}
    timing = {"evaluate_ingredients": 0.0, "batchnorm": 0.0, "evaluate_candidates": 0.0, "evaluate_soup": 0.0}
    bn_images = 0

    def load(state: dict[str, torch.Tensor], recompute: bool) -> None:
        nonlocal bn_images
        network.load_state_dict(state)
        if recompute and not settings.freeze_bn and settings.bn_steps:
            tick = time.perf_counter()
            seen = recompute_batchnorm(network, batches(settings.bn_steps))
            bn_images += seen * cfg.batch_size * len(sources)
            timing["batchnorm"] += time.perf_counter() - tick
            network.eval()

    def source_val(acc: dict[str, dict[str, float]]) -> float:
        return sum(acc[d]["out"] for d in sources) / len(sources)

    started = time.perf_counter()
    # Each ingredient as trained (its own BatchNorm statistics): the greedy order and the card's table.
    for ingredient in found:
        tick = time.perf_counter()
        load(ingredient.state_dict(), recompute=False)
        acc = evaluate(network, eval_loaders, device)
        ingredient.scores = {
            "acc": acc,
            "source_val_acc": source_val(acc),
            "target_acc": sum(acc[d]["in"] for d in targets) / len(targets),
        }
        timing["evaluate_ingredients"] += time.perf_counter() - tick
        say(f"ingredient {ingredient.name}: source val {ingredient.scores['source_val_acc']:.3f}")
    ranked = sorted(found, key=lambda i: -i.scores["source_val_acc"])  # stable: ties keep the given order
    trace: list[dict[str, Any]] = []
    if settings.method == "uniform":
        chosen = list(found)
    elif settings.method == "top-k":
        chosen = ranked[: int(settings.k or 0)]
    else:
        chosen, total = [ranked[0]], WeightSum()
        total.add(ranked[0].state_dict())
        # The soup of the best ingredient alone, scored as every candidate is (its BatchNorm statistics recomputed
        # too), so an addition is judged by the averaging, not by the recomputation.
        load(total.average(like), recompute=True)
        best = source_val(evaluate(network, source_loaders, device))
        trace.append({"ingredient": ranked[0].name, "source_val_acc": best, "kept": True})
        for ingredient in ranked[1:]:
            candidate = total.plus(ingredient.state_dict())
            load(candidate.average(like), recompute=True)
            tick = time.perf_counter()
            score = source_val(evaluate(network, source_loaders, device))
            timing["evaluate_candidates"] += time.perf_counter() - tick
            kept = score >= best
            trace.append({"ingredient": ingredient.name, "source_val_acc": score, "kept": kept})
            say(
                f"greedy: with {ingredient.name} source val {score:.3f} vs {best:.3f}: {'kept' if kept else 'left out'}"
            )
            if kept:
                chosen.append(ingredient)
                total, best = candidate, score

    total = WeightSum()
    for ingredient in chosen:
        total.add(ingredient.state_dict())
    load(total.average(like), recompute=True)
    tick = time.perf_counter()
    acc = evaluate(network, eval_loaders, device)
    timing["evaluate_soup"] += time.perf_counter() - tick
    seconds = time.perf_counter() - started
    steps = max(int(i.results.steps or 0) for i in found)
    record = {
        "step": steps,
        "epoch": 0.0,
        "acc": acc,
        "source_val_acc": source_val(acc),
        "target_acc": sum(acc[d]["in"] for d in targets) / len(targets),
        "train_seconds": seconds,
    }

    first = found[0].results
    metadata = {
        "algorithm": first.algorithm,
        "dataset": data.info()["name"],
        "dataset_repo_id": data.repo_id,
        "dataset_revision": data.revision,
        "source_domains": sources,
        "target_domains": targets,
        "dataset_fingerprint": data.fingerprint,
        "protocol": plan.protocol.name,
        "dgzoo_version": __version__,
        "code": code_version(),
        "soup": {"method": settings.method, "ingredients": len(chosen)},
    }
    save_model(network, out, data.class_names, preprocessing, metadata)
    records = [record]
    atomic_write_text(out / "records.jsonl", json.dumps(record) + "\n")
    results = _soup_results(
        found,
        chosen,
        settings,
        plan,
        record,
        records,
        trace,
        warnings,
        command,
        timing,
        seconds,
        bn_images,
        accelerator,
    )
    plot_run(results, records, out)
    roles = {d: "held-out" if d in targets else "source" for d in [*sources, *targets]}
    contact_sheet(data, out / SAMPLES_IMAGE, roles=roles, domains=list(roles))
    atomic_write_text(out / "README.md", render_card(results, cfg.to_dict(), run_dir=out))
    write_json(out / "results.json", results)  # last: a directory with results.json is a finished run
    say(
        f"{settings.method} soup of {len(chosen)}/{len(found)}: source val {record['source_val_acc']:.3f} | held-out "
        f"{record['target_acc']:.3f} | made in {seconds:.1f} s | run directory: {out}"
    )
    return results


def _soup_results(
    found: Sequence[Ingredient],
    chosen: Sequence[Ingredient],
    settings: SoupSettings,
    plan: Any,
    record: dict[str, Any],
    records: list[dict[str, Any]],
    trace: list[dict[str, Any]],
    warnings: list[str],
    command: str,
    timing: dict[str, float],
    seconds: float,
    bn_images: int,
    accelerator: Any,
) -> dict[str, Any]:
    """results.json of a soup: a run's fields (so every tool reads it as a run) plus ``soup``."""

    cfg = plan.config
    sources, targets = list(plan.protocol.sources), list(plan.protocol.targets)
    first = found[0].results
    selections = {m: select(records, m, sources, targets) for m in SELECTION_METHODS}
    chosen_selection = selections["training_domain_validation"]
    title = first.algorithm_title or first.algorithm
    label = f"{settings.method} soup of {len(found)}"
    citations = [(t, b) for t, b in (first.citations or [])]
    citations += [("DiWA", DIWA_CITATION), ("Model soups", SOUPS_CITATION)]
    chosen_names = {i.name for i in chosen}
    inits = sorted({"{} {}".format(*init_key(i.results)) for i in found})
    ingredients = [
        {
            **i.reference(),
            "name": i.name,
            "algorithm": i.results.algorithm,
            "seed": i.results.seed,
            "steps": i.results.steps,
            "source_val_acc": i.scores["source_val_acc"],
            "target_acc": i.scores["target_acc"],
            "used": i.name in chosen_names,
            "identity": run_identity(i.results),
        }
        for i in found
    ]
    data_info = plan.data.info()
    return RunResults.create(
        {
            "algorithm": first.algorithm,
            "host_algorithm": first.algorithm if first.host_algorithm is None else first.host_algorithm,
            "addons": list(first.addons or []),
            "algorithm_title": f"{title} ({label})",
            "backbone": first.require("backbone").backbone,
            "pretrained": False if first.pretrained is None else first.pretrained,
            "base_model": first.base_model,
            "dataset": {
                k: data_info[k] for k in ("name", "title", "source", "repo_id", "revision", "path", "fingerprint")
            },
            "class_names": plan.data.class_names,
            "protocol": plan.protocol.name,
            "source_domains": sources,
            "target_domains": targets,
            "seed": first.seed,
            "split_seed": cfg.resolved_split_seed(),
            "steps": record["step"],
            "init_from": first.init_from,
            "selection": {k: chosen_selection[k] for k in ("method", "step", "score")},
            "accuracy": chosen_selection["accuracy"],
            "target_accuracy": chosen_selection["target_accuracy"],
            "accuracy_splits": record["acc"],
            "selections": selections,
            "hparams": {
                "soup.method": settings.method,
                **({"soup.k": settings.k} if settings.k is not None else {}),
                "soup.bn_steps": 0 if settings.freeze_bn else settings.bn_steps,
                "freeze_bn": settings.freeze_bn,
                "holdout_fraction": cfg.holdout_fraction,
                "batch_size": cfg.batch_size,
            },
            "soup": {
                "method": settings.method,
                "k": settings.k,
                "candidates": len(found),
                "used": len(chosen),
                "label": label,
                "ingredients": ingredients,
                "greedy": trace,
                "initialisation": inits,
                "shared_init": len(inits) == 1,
                "warnings": warnings,
                "batchnorm": "averaged (the ingredients kept them frozen)"
                if settings.freeze_bn
                else "averaged (--bn-steps 0)"
                if not settings.bn_steps
                else f"recomputed on {settings.bn_steps} source training batches",
                "bn_seed": settings.seed,
                "command": command,
                "seconds": {"total": seconds, **timing},
                "bn_images": bn_images,
            },
            "derived": {},
            "splits": {
                d: {"in": len(plan.splits.in_rows[d]), "out": len(plan.splits.out_rows[d])} for d in plan.splits.in_rows
            },
            "diagnostics": {},
            "citations": citations,
            "timing": {
                "train_seconds": seconds,
                "images_per_second": bn_images / max(seconds, 1e-9),
                "train_images": bn_images,
                "steps_per_second": 0.0,
            },
            **run_environment(accelerator.device, 1),
        }
    ).to_json()
