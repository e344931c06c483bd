"""Model soups and DiWA: one network whose weights are the average of several runs' weights (``dgzoo soup``).

The command's entry points, and the soups a sweep builds of its cells (the spec's ``soup`` section). The work is
done in three modules, each with one job: :mod:`dgzoo.experiments.soup_ingredients` (which runs are averaged, and
whether they can be), :mod:`dgzoo.experiments.soup_weights` (the running weight average) and
:mod:`dgzoo.experiments.soup_run` (the greedy and top-k choice, evaluation and the soup's run directory). See
docs/soups.md.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import DGZooError
from ..run.results import RunResults
from .soup_ingredients import Ingredient, cell_name, check_compatible, collect_ingredients, is_soup
from .soup_run import (
    DEFAULT_BN_STEPS,
    SOUP_METHODS,
    SoupSettings,
    soup,
    soup_command,
    soup_config,
    soup_config_text,
)
from .soup_weights import WeightSum, average_state_dicts
from .sweep import SweepRun, SweepSpec

__all__ = [  # `from dgzoo.experiments.soup import X` for the names users import (tests, launchers, benchmarks)
    "DEFAULT_BN_STEPS",
    "SOUPS_DIR",
    "SOUP_METHODS",
    "Ingredient",
    "SoupSettings",
    "WeightSum",
    "average_state_dicts",
    "build_sweep_soups",
    "cell_name",
    "check_compatible",
    "collect_ingredients",
    "is_soup",
    "soup",
    "soup_command",
    "soup_config",
    "soup_config_text",
    "soup_dir_name",
]


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
                    built = [i["name"] for i in (RunResults.load(existing).soup or {})["ingredients"]]
                except (OSError, ValueError, KeyError, TypeError, DGZooError):  # no soup record: build it again
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
