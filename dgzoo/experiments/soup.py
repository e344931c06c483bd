"""Model soups and DiWA: one network whose weights are the average of several runs' weights (``dgzoo soup``).

Ingredients are finished run directories, a sweep's folder (all finished runs of one cell: dataset, algorithm,
held-out domains and trial seed) or Hub checkpoints (``REPO@REV``, pinned to the commit they resolve to). Methods:

- ``uniform`` (DiWA, Rame et al. 2022): the plain average of every ingredient.
- ``greedy`` (model soups, Wortsman et al. 2022, Algorithm 1): ingredients sorted by their own source-validation
  accuracy, best first; the soup starts as the best one and each next ingredient stays only if the soup's
  source-validation accuracy with it does not fall (``>=``, the paper's rule; the reference code uses ``>``).
- ``top-k``: the uniform average of the ``k`` ingredients with the best source-validation accuracy.

Selection only ever reads the source domains' validation (``out``) splits; held-out accuracy of each ingredient is
measured too, and reported as an extra, never used.

Everything that can make a soup meaningless is checked before anything is written (:func:`check_compatible`): same
architecture, head and preprocessing, same label names, same dataset and revision, split seed, holdout fraction and
held-out domains. Averaging only works between networks fine-tuned from one initialisation (linear mode
connectivity); ingredients that do not share one (same ``init_from`` checkpoint, same pretrained weights, or the same
seed from scratch) get a warning. BatchNorm statistics of every averaged network are recomputed on source training
batches (SWAD's ``update_bn``, :func:`dgzoo.algorithms.averaging.recompute_batchnorm`) unless the ingredients kept
them frozen (``--freeze-bn``). The soup is evaluated on every domain split as a run is, and written as a normal run
directory (timm weights, results.json with its ingredients, card, plots), so ``dgzoo push``, ``eval``, ``report`` and
the zoo treat it like any run. See docs/soups.md.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shlex
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..algorithms.averaging import recompute_batchnorm
from ..config import TrainConfig
from ..data import DomainImages, eval_loader, loader_workers
from ..data.inspect import contact_sheet
from ..errors import DGZooError
from ..models import create_backbone, data_config
from ..run.cards import plot_run, render_card
from ..run.hub import CONFIG, WEIGHTS, hub_error_reason, resolve_checkpoint, resolve_token
from ..run.identity import run_identity
from ..run.provenance import code_version
from ..run.results import RunResults
from ..run.rundir import SAMPLES_IMAGE, atomic_write_text, is_run_dir, read_json, run_done, save_model, write_json
from ..run.selection import SELECTION_METHODS, select
from ..training.engine import (
    build_loop_data,
    claim_on_main,
    create_accelerator,
    device_name,
    plan_run,
    run_config_text,
    start_run_dir,
)
from ..training.evaluation import evaluate
from ..training.loop import source_batches
from .sweep import SweepRun, SweepSpec

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


# ---------------------------------------------------------------------- ingredients


@dataclass
class Ingredient:
    """One network to average: where its timm files are, and what its run recorded."""

    name: str  # how results.json and the card list it: the run directory, or REPO@COMMIT
    folder: Path  # holds config.json + model.safetensors
    results: dict[str, Any]
    train_config: dict[str, Any]
    run_dir: Path | None = None
    repo_id: str | None = None
    revision: str | None = None
    scores: dict[str, Any] = field(default_factory=dict)  # filled by the soup: its own accuracy per domain split

    @property
    def config(self) -> dict[str, Any]:
        return json.loads((self.folder / CONFIG).read_text())

    def state_dict(self) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(str(self.folder / WEIGHTS))

    def reference(self) -> dict[str, Any]:
        """results.json's record of the ingredient: the run directory, or the Hub repo and its commit."""
        if self.repo_id:
            return {"repo_id": self.repo_id, "revision": self.revision}
        return {"run": str(self.run_dir)}


def cell_name(results: dict[str, Any]) -> str:
    """The sweep cell a run belongs to: ``<dataset>/<algorithm>/<held-out domains>/trial<split seed>`` (a sweep's
    trial seed is its runs' split seed)."""
    return "/".join(
        [
            results["dataset"]["name"],
            results["algorithm"],
            "+".join(results["target_domains"]),
            f"trial{results.get('split_seed', results.get('seed'))}",
        ]
    )


def is_soup(results: dict[str, Any]) -> bool:
    return isinstance(results.get("soup"), dict)


def _local_ingredient(path: Path) -> Ingredient:
    missing = [n for n in ("results.json", "train_config.json", CONFIG, WEIGHTS) if not (path / n).is_file()]
    if missing:
        raise DGZooError(
            f"{path} is not a finished dgzoo run (no {', '.join(missing)}); soup finished runs only, or finish it first"
        )
    return Ingredient(
        str(path.resolve()),
        path,
        read_json(path / "results.json"),
        read_json(path / "train_config.json"),
        run_dir=path.resolve(),
    )


def _finished_runs_under(root: Path) -> list[Path]:
    """Finished training runs under a folder (a sweep): not soups, not unlearning runs, not partial ones."""
    found = []
    for results_path in sorted(root.rglob("results.json")):
        path = results_path.parent
        if not run_done(path) or not all((path / n).is_file() for n in ("train_config.json", CONFIG, WEIGHTS)):
            continue  # cut short while finalising: not an ingredient until a rerun finishes it
        try:
            results = read_json(results_path)
        except (OSError, ValueError):
            continue
        if isinstance(results, dict) and not is_soup(results) and results.get("kind") != "unlearning":
            found.append(path)
    return found


def _sweep_ingredients(root: Path, cell: str | None) -> list[Ingredient]:
    runs = [_local_ingredient(p) for p in _finished_runs_under(root)]
    if not runs:
        raise DGZooError(
            f"{root} holds no finished dgzoo run; pass run directories, a sweep's output_dir or Hub repos REPO@REV"
        )
    cells: dict[str, list[Ingredient]] = defaultdict(list)
    for run in runs:
        cells[cell_name(run.results)].append(run)
    if cell is not None:
        if cell not in cells:
            raise DGZooError(f"{root} has no cell '{cell}'; its cells: {', '.join(sorted(cells))}")
        return cells[cell]
    if len(cells) > 1:
        raise DGZooError(
            f"{root} holds runs of {len(cells)} cells ({', '.join(sorted(cells))}); pass --cell with one of them"
        )
    return runs


def _hub_ingredient(reference: str, token: str | None) -> Ingredient:
    import huggingface_hub

    folder, repo_id, revision = resolve_checkpoint(reference, None, token)
    assert repo_id is not None  # a reference that is not a local directory is a Hub repo
    try:
        files = {
            name: Path(huggingface_hub.hf_hub_download(repo_id, name, revision=revision, token=token))
            for name in ("results.json", "train_config.json")
        }
    except Exception as e:
        raise DGZooError(
            f"{reference} has no dgzoo results.json/train_config.json at {revision} "
            f"({hub_error_reason(e, token)}); soup dgzoo checkpoints only"
        ) from None
    return Ingredient(
        f"{repo_id}@{revision}",
        folder,
        read_json(files["results.json"]),
        read_json(files["train_config.json"]),
        repo_id=repo_id,
        revision=revision,
    )


def collect_ingredients(
    references: Sequence[str | Path], cell: str | None = None, token: str | None = None
) -> list[Ingredient]:
    """Resolve ``references`` (run directories, sweep folders, Hub repos ``REPO@REV``) into ingredients.

    A folder that is not itself a run is a sweep: its finished runs of one cell (``cell``, required when it holds
    several) are the ingredients. Hub checkpoints are pinned to the commit their revision resolves to. The same
    ingredient named twice is refused (it would count double in the average).
    """
    if not references:
        raise DGZooError("dgzoo soup needs ingredients: run directories, a sweep's output_dir or Hub repos REPO@REV")
    token = resolve_token(token)
    found: list[Ingredient] = []
    for reference in references:
        path = Path(str(reference).removeprefix("local-dir:")).expanduser()
        if path.is_dir():
            found += [_local_ingredient(path)] if is_run_dir(path) else _sweep_ingredients(path, cell)
        else:
            found.append(_hub_ingredient(str(reference), token))
    seen: dict[str, str] = {}
    for ingredient in found:
        if ingredient.name in seen:
            raise DGZooError(f"{ingredient.name} is named twice; an ingredient counts once in a soup")
        seen[ingredient.name] = ingredient.name
    return found


# ---------------------------------------------------------------------- compatibility


def _init_key(results: dict[str, Any]) -> tuple[str, str]:
    """What a run started from: its ``init_from`` checkpoint, its pretrained weights, or its seed."""
    init = results.get("init_from")
    if init:
        where = f"{init['repo_id']}@{init['revision']}" if init.get("repo_id") else Path(str(init.get("run"))).name
        return "init_from", where
    if results.get("pretrained"):
        return "pretrained", str(results.get("base_model") or results["backbone"])
    return "seed", str(results.get("seed"))


def check_compatible(ingredients: Sequence[Ingredient]) -> list[str]:
    """Refuse ingredients that cannot be averaged into one meaningful network (one line naming the first
    mismatch and the ingredient); return warnings (no shared initialisation)."""
    if len(ingredients) < 2:
        raise DGZooError(
            f"a soup needs at least two ingredients, got {len(ingredients)}; pass more runs (or a sweep "
            f"folder with several finished runs of one cell)"
        )
    first = ingredients[0]

    def facts(i: Ingredient) -> dict[str, tuple[str, Any]]:
        config, results = i.config, i.results
        dataset = results["dataset"]
        pre = config.get("pretrained_cfg") or {}
        return {
            "architecture": ("architecture", config.get("architecture")),
            "head": ("head (number of classes)", config.get("num_classes")),
            "preprocessing": ("input preprocessing", [pre.get(k) for k in ("input_size", "mean", "std")]),
            "labels": ("label names", config.get("label_names")),
            "dataset": ("dataset", [dataset.get("name"), dataset.get("repo_id"), dataset.get("path")]),
            "revision": ("dataset revision", dataset.get("revision")),
            "split_seed": ("split seed", results.get("split_seed", results.get("seed"))),
            "holdout": ("holdout fraction", (results.get("hparams") or {}).get("holdout_fraction", 0.2)),
            "targets": ("held-out domains", list(results["target_domains"])),
            "sources": ("source domains", list(results["source_domains"])),
        }

    reference = facts(first)
    shapes = _shapes(first)
    for ingredient in ingredients[1:]:
        for key, (label, value) in facts(ingredient).items():
            if value != reference[key][1]:
                raise DGZooError(
                    f"{ingredient.name} has {label} {_show(value)}, {first.name} has "
                    f"{_show(reference[key][1])}; soup runs of one dataset, split and held-out set with "
                    f"the same network"
                )
        theirs = _shapes(ingredient)
        if theirs != shapes:
            key = next(iter(sorted(set(theirs) ^ set(shapes)) or [k for k in shapes if shapes[k] != theirs[k]]))
            raise DGZooError(
                f"{ingredient.name} and {first.name} differ in tensor {key}; soup runs of the same "
                f"network (backbone, image size)"
            )
    inits = {_init_key(i.results) for i in ingredients}
    if len(inits) > 1:
        listed = ", ".join(sorted(f"{kind} {value}" for kind, value in inits)[:4])
        return [
            f"the ingredients do not share an initialisation ({listed}{' ...' if len(inits) > 4 else ''}): "
            f"averaging networks trained from unrelated starts usually fails (their weights are not linearly "
            f"connected); train them from one checkpoint with init_from, or from the same pretrained weights"
        ]
    return []


def _show(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, str) else value


def _shapes(ingredient: Ingredient) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(str(ingredient.folder / WEIGHTS), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


# ---------------------------------------------------------------------- averaging


class WeightSum:
    """A running sum of state dicts (float64), so a soup of many large networks holds two in memory, not all.

    Floating-point tensors are averaged; integer buffers (BatchNorm's ``num_batches_tracked``) are the first
    ingredient's (BatchNorm recomputation resets them).
    """

    def __init__(self) -> None:
        self.total: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, state: dict[str, torch.Tensor]) -> None:
        for key, value in state.items():
            if not value.is_floating_point():
                self.total.setdefault(key, value.clone())
            elif key in self.total:
                self.total[key] += value.double()
            else:
                self.total[key] = value.double().clone()
        self.count += 1

    def plus(self, state: dict[str, torch.Tensor]) -> WeightSum:
        copy = WeightSum()
        copy.total = {k: v.clone() for k, v in self.total.items()}
        copy.count = self.count
        copy.add(state)
        return copy

    def average(self, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The mean, in the dtypes of ``like`` (a network's state dict)."""
        return {k: (v / self.count if v.is_floating_point() else v).to(like[k].dtype) for k, v in self.total.items()}


def average_state_dicts(states: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The uniform average of ``states`` (floating-point tensors; integer buffers from the first)."""
    total = WeightSum()
    for state in states:
        total.add(state)
    return total.average(states[0])


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
        settings.freeze_bn = all(bool(i.results.get("hparams", {}).get("freeze_bn")) for i in found)
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
        if k
        not in (
            "output_dir",
            "overwrite",
            "resume",
            "push_to_hub",
            "hub_private",
            "hub_revision",
            "init_from",
            "dry_run",
            "pretrained",
        )
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
    eval_loaders: dict[str, dict[str, Iterable[Any]]] = {
        d: {
            split: eval_loader(DomainImages(data, rows[d], eval_tf, d), settings.eval_batch_size, workers, pin)
            for split, rows in (("in", plan.splits.in_rows), ("out", plan.splits.out_rows))
        }
        for d in data.domains
    }
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
    steps = max(int(i.results.get("steps") or 0) for i in found)
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
        "algorithm": first["algorithm"],
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
    import timm

    cfg = plan.config
    sources, targets = list(plan.protocol.sources), list(plan.protocol.targets)
    first = found[0].results
    selections = {m: select(records, m, sources, targets) for m in SELECTION_METHODS}
    chosen_selection = selections["training_domain_validation"]
    title = first.get("algorithm_title") or first["algorithm"]
    label = f"{settings.method} soup of {len(found)}"
    citations = [(t, b) for t, b in (first.get("citations") or [])]
    citations += [("DiWA", DIWA_CITATION), ("Model soups", SOUPS_CITATION)]
    chosen_names = {i.name for i in chosen}
    inits = sorted({"{} {}".format(*_init_key(i.results)) for i in found})
    ingredients = [
        {
            **i.reference(),
            "name": i.name,
            "algorithm": i.results["algorithm"],
            "seed": i.results.get("seed"),
            "steps": i.results.get("steps"),
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
            "algorithm": first["algorithm"],
            "host_algorithm": first.get("host_algorithm", first["algorithm"]),
            "addons": list(first.get("addons") or []),
            "algorithm_title": f"{title} ({label})",
            "backbone": first["backbone"],
            "pretrained": first.get("pretrained", False),
            "base_model": first.get("base_model"),
            "dataset": {
                k: data_info[k] for k in ("name", "title", "source", "repo_id", "revision", "path", "fingerprint")
            },
            "class_names": plan.data.class_names,
            "protocol": plan.protocol.name,
            "source_domains": sources,
            "target_domains": targets,
            "seed": first.get("seed"),
            "split_seed": cfg.resolved_split_seed(),
            "steps": record["step"],
            "init_from": first.get("init_from"),
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
            "num_processes": 1,
            "device": device_name(accelerator.device),
            "dgzoo_version": __version__,
            "timm_version": timm.__version__,
            "torch_version": torch.__version__,
            "code": code_version(),
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
    ).to_json()


# ---------------------------------------------------------------------- soups of a sweep


SOUPS_DIR = "soups"  # under a sweep's output_dir: one run directory per cell and method


def soup_dir_name(dataset: str, algorithm: str, test_domains: Sequence[str], trial: int, method: str) -> str:
    """``<dataset>-<algorithm>-<held-out>-<method>_soup-trial<t>``, filesystem-safe (as a sweep's run names)."""
    slug = "-".join(
        [
            Path(dataset).name,
            algorithm.replace("+", "_"),
            "_".join(test_domains),
            f"{method.replace('-', '')}_soup",
            f"trial{trial}",
        ]
    )
    return re.sub(r"[^A-Za-z0-9._-]+", "_", slug)


def build_sweep_soups(
    spec: SweepSpec, runs: Sequence[SweepRun], log: Callable[[str], None] = print
) -> list[tuple[Path, str]]:
    """The spec's ``soup`` section: for every cell (dataset, algorithm, held-out set, trial seed) whose grid runs are
    all finished, build each method's soup into ``<output_dir>/soups/``. A soup already built from the same
    ingredients is kept; one whose cell has changed (more samples) is rebuilt. Returns (soup dir, outcome) pairs;
    a soup that fails is logged with its reason and the sweep goes on."""
    settings = spec.soup
    cells: dict[tuple[str, str, tuple[str, ...], int], list[SweepRun]] = defaultdict(list)
    for run in runs:
        if run.kind == "grid":
            cells[(run.dataset, run.algorithm, run.test_domains, run.trial_seed)].append(run)
    done: list[tuple[Path, str]] = []
    for (dataset, algorithm, test_domains, trial), members in cells.items():
        if any(r.status != "done" for r in members):
            continue
        ingredients = [str(r.output_dir.resolve()) for r in sorted(members, key=lambda r: r.hparams_seed)]
        for method in settings["methods"]:
            out = Path(spec.output_dir) / SOUPS_DIR / soup_dir_name(dataset, algorithm, test_domains, trial, method)
            existing = out / "results.json"
            if existing.is_file():
                try:
                    built = [i["name"] for i in read_json(existing)["soup"]["ingredients"]]
                except (OSError, ValueError, KeyError, TypeError):
                    built = []
                if sorted(built) == sorted(ingredients):
                    done.append((out, "done"))
                    continue
            try:
                result = soup(
                    ingredients,
                    out,
                    method=method,
                    k=settings.get("k") if method == "top-k" else None,
                    bn_steps=settings.get("bn_steps", DEFAULT_BN_STEPS),
                    freeze_bn=settings.get("freeze_bn"),
                    overwrite=out.exists(),
                )
            except DGZooError as e:
                log(f"soup {out.name} failed: {e}")
                done.append((out, "failed"))
                continue
            log(
                f"soup {out.name}: {result['soup']['used']}/{len(ingredients)} ingredients, held-out "
                f"{100 * result['target_accuracy']:.1f}% ({result['soup']['seconds']['total']:.0f} s)"
            )
            done.append((out, "built"))
    return done
