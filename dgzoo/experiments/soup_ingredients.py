"""The ingredients of a soup (``dgzoo soup``) and whether they can be averaged.

Ingredients are finished run directories, a sweep's folder (all finished runs of one cell: dataset, algorithm,
held-out domains and trial seed) or Hub checkpoints (``REPO@REV``, pinned to the commit they resolve to).

Everything that can make a soup meaningless is checked before anything is written (:func:`check_compatible`): same
architecture, head and preprocessing, same label names, same dataset and revision, split seed, holdout fraction and
held-out domains. Averaging only works between networks fine-tuned from one initialisation (linear mode
connectivity); ingredients that do not share one (same ``init_from`` checkpoint, same pretrained weights, or the same
seed from scratch) get a warning. The soup itself is made in :mod:`dgzoo.experiments.soup_run`.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import DGZooError
from ..run.hub import CONFIG, WEIGHTS, hub_error_reason, resolve_checkpoint, resolve_token
from ..run.results import RunResults
from ..run.rundir import is_run_dir, read_json
from .collect import finished_run_dirs

# ---------------------------------------------------------------------- ingredients


@dataclass
class Ingredient:
    """One network to average: where its timm files are, and what its run recorded."""

    name: str  # how results.json and the card list it: the run directory, or REPO@COMMIT
    folder: Path  # holds config.json + model.safetensors
    results: RunResults
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


def cell_name(results: RunResults) -> str:
    """The sweep cell a run belongs to: ``<dataset>/<algorithm>/<held-out domains>/trial<split seed>`` (a sweep's
    trial seed is its runs' split seed)."""
    assert results.dataset is not None, "a run's results.json names its dataset"
    return "/".join(
        [
            results.dataset.name,
            results.algorithm,
            "+".join(results.target_domains),
            f"trial{results.data_split_seed}",
        ]
    )


def is_soup(results: RunResults) -> bool:
    """Whether the run is itself a soup (never an ingredient of a sweep's soup)."""
    return results.is_soup


def _local_ingredient(path: Path) -> Ingredient:
    missing = [n for n in ("results.json", "train_config.json", CONFIG, WEIGHTS) if not (path / n).is_file()]
    if missing:
        raise DGZooError(
            f"{path} is not a finished dgzoo run (no {', '.join(missing)}); soup finished runs only, or finish it first"
        )
    return Ingredient(
        str(path.resolve()),
        path,
        RunResults.load(path / "results.json"),
        read_json(path / "train_config.json"),
        run_dir=path.resolve(),
    )


def _finished_runs_under(root: Path) -> list[Path]:
    """Finished training runs under a folder (a sweep): not soups, not unlearning runs, not partial ones."""
    found = []
    for path in sorted(finished_run_dirs(root), key=lambda p: p / "results.json"):
        if not all((path / n).is_file() for n in ("train_config.json", CONFIG, WEIGHTS)):
            continue  # cut short while finalising: not an ingredient until a rerun finishes it
        try:
            results = RunResults.load(path / "results.json")
        except (OSError, ValueError, DGZooError):
            continue
        if not is_soup(results) and results.kind != "unlearning":
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
        RunResults.load(files["results.json"]),
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


def init_key(results: RunResults) -> tuple[str, str]:
    """What a run started from: its ``init_from`` checkpoint, its pretrained weights, or its seed."""
    init = results.init_from
    if init:
        where = f"{init['repo_id']}@{init['revision']}" if init.get("repo_id") else Path(str(init.get("run"))).name
        return "init_from", where
    if results.pretrained:
        return "pretrained", str(results.base_model or results.require("backbone").backbone)
    return "seed", str(results.seed)


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
        config, results = i.config, i.results.require("dataset")
        dataset = results.dataset
        assert dataset is not None
        pre = config.get("pretrained_cfg") or {}
        return {
            "architecture": ("architecture", config.get("architecture")),
            "head": ("head (number of classes)", config.get("num_classes")),
            "preprocessing": ("input preprocessing", [pre.get(k) for k in ("input_size", "mean", "std")]),
            "labels": ("label names", config.get("label_names")),
            "dataset": ("dataset", [dataset.name, dataset.repo_id, dataset.path]),
            "revision": ("dataset revision", dataset.revision),
            "split_seed": ("split seed", results.data_split_seed),
            "holdout": ("holdout fraction", (results.hparams or {}).get("holdout_fraction", 0.2)),
            "targets": ("held-out domains", list(results.require("target_domains").target_domains)),
            "sources": ("source domains", list(results.require("source_domains").source_domains)),
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
    inits = {init_key(i.results) for i in ingredients}
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
