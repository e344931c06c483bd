"""Sweeps: datasets x algorithms x held-out domains x hyperparameter samples x trial seeds, DomainBed's way.

A sweep spec (YAML, :mod:`dgzoo.experiments.spec`) names the grid; :func:`expand` turns it into runs, each a complete
:class:`~dgzoo.config.TrainConfig` with its own run directory. Launching them (one after another, a pool over local
GPUs, a Slurm job array, or printed commands) is :mod:`dgzoo.experiments.launchers`; this module plans, and says
what each run directory holds.

DomainBed's semantics (``domainbed/scripts/sweep.py`` and ``train.py``), kept exactly:

- **hparam sample 0 is the recipe's defaults**; sample ``k > 0`` draws every searched value from its distribution
  with ``RandomState(seed_hash(seed_hash(k, trial_seed), key))``: one independent stream per key, so adding a key
  to a search space never changes the draws of the others, and every algorithm of a sweep gets the same training
  hyperparameters for the same ``(k, trial)`` (a paired comparison).
- **the trial seed** fixes the data splits (``split_seed``) and, with the sample, the draws; the run's ``seed``
  (initialisation, data order, augmentation) is ``seed_hash(dataset, algorithm, test_domains, k, trial)``.
- **held-out domains**: ``single`` holds out each domain alone; ``single_and_pairs`` adds every pair, which is what
  leave-one-domain-out model selection needs (``dgzoo report`` uses the pairs only for that).

Runs are resumable: a finished run (``results.json``, written last, and every other file present) is skipped; an
interrupted one resumes from its last checkpoint, or restarts when it has none; one that a live process holds (its
claim, :mod:`dgzoo.run.claim`) is "running elsewhere" and left alone. A run directory that holds a run trained with
other settings is an error, never silently reused. ``sweep.json`` (the manifest) records the spec and every run's
settings.

``--more-trials N`` adds, for every (dataset, algorithm, held-out set), the selected hyperparameter sample trained
on N new trial seeds; the choice is written to ``more_trials.json`` once, so later invocations extend it.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from .._version import __version__
from ..algorithms import parse_algorithm, resolve_hparams
from ..commandline import command_line, flag_groups
from ..config import TrainConfig, changed_fields
from ..data import get_spec, load_dg_dataset, seed_hash
from ..errors import DGZooError, suggest
from ..hparams import Distribution
from ..hparams import Uniform as Uniform  # re-exported: callers import it from here
from ..hparams import parse_distribution as parse_distribution  # re-exported
from ..models import check_backbone
from ..run.claim import CLAIM_FILE, claim_holder, describe_holder
from ..run.rundir import latest_checkpoint, missing_outputs, read_json, write_json
from .spec import SLURM_KEYS as SLURM_KEYS  # re-exported, as the spec's other names callers import from here
from .spec import SweepSpec, search_space
from .spec import check_slurm_options as check_slurm_options
from .spec import unsearched_hparams as unsearched_hparams

MANIFEST = "sweep.json"
MORE_TRIALS = "more_trials.json"
CLAIMS_DIR = ".claims"  # the sweep-level claims: which sweep invocation is launching which run
DEFAULT_LAUNCH_PREFIX = "accelerate launch recipes/train.py"

# Fields every printed command states, even at their defaults, so a command says what it trains on its own.
ALWAYS_IN_COMMANDS = ("dataset", "algorithm", "target_domains", "seed", "split_seed", "output_dir")


# ---------------------------------------------------------------------- expansion


@dataclass
class SweepRun:
    """One run of a sweep: where it sits in the grid and its complete recipe."""

    dataset: str
    algorithm: str
    test_domains: tuple[str, ...]
    hparams_seed: int
    trial_seed: int
    config: TrainConfig
    sampled: dict[str, Any]
    status: str = "new"  # new | done | resume | restart | running (a live process holds it)
    kind: str = "grid"  # grid: a run of the spec; more_trials: a selected sample on an added trial seed

    @property
    def output_dir(self) -> Path:
        assert self.config.output_dir is not None  # the sweep names every run's directory
        return Path(self.config.output_dir)

    def describe(self) -> str:
        return (
            f"{self.dataset} {self.algorithm} held-out {'+'.join(self.test_domains)} "
            f"hp{self.hparams_seed} trial{self.trial_seed}"
        )


def sample_hparams(space: dict[str, Distribution], hparams_seed: int, trial_seed: int) -> dict[str, Any]:
    """Hyperparameter sample ``hparams_seed`` of trial ``trial_seed``: {} for sample 0 (the defaults)."""
    if hparams_seed == 0:
        return {}
    sample_seed = seed_hash(hparams_seed, trial_seed)
    return {key: dist.sample(np.random.RandomState(seed_hash(sample_seed, key))) for key, dist in space.items()}


def dataset_domains(name: str, train: dict[str, Any]) -> tuple[str, list[str], Callable[[str], str | None]]:
    """(name, domains in the dataset's order, name -> canonical domain); registry entries need no loading."""
    spec = get_spec(name)
    if spec is not None and spec.kind != "imagefolder":
        return spec.name, list(spec.domains), spec.canonical_domain
    data = load_dg_dataset(
        name, train.get("revision"), train.get("image_column"), train.get("label_column"), train.get("domain_column")
    )
    return (spec.name if spec else name), list(data.domains), data.canonical_domain


def held_out_sets(
    mode: str | list[Any], domains: list[str], canonical: Callable[[str], str | None], dataset: str
) -> list[tuple[str, ...]]:
    """The held-out sets: each domain (``single``), plus every pair (``single_and_pairs``, DomainBed's order),
    or an explicit list whose items are a domain (held out alone) or a list of domains (held out together)."""
    if mode == "single":
        return [(d,) for d in domains]
    if mode == "single_and_pairs":
        if len(domains) < 3:
            raise DGZooError(f"test_domains: single_and_pairs needs at least 3 domains; {dataset} has {len(domains)}")
        return [s for i, d in enumerate(domains) for s in [(d,), *((d, e) for e in domains[i + 1 :])]]
    sets = []
    for item in mode:
        names = item if isinstance(item, (list, tuple)) else [item]
        resolved = []
        for name in names:
            domain = canonical(str(name))
            if domain is None:
                raise DGZooError(
                    f"test_domains names '{name}', not a domain of {dataset}"
                    f"{suggest(str(name), domains)}; domains: {', '.join(domains)}"
                )
            resolved.append(domain)
        if len(resolved) >= len(domains):
            raise DGZooError(f"test_domains {resolved} leaves no source domain of {dataset} to train on")
        sets.append(tuple(sorted(set(resolved), key=domains.index)))
    return list(dict.fromkeys(sets))


def run_name(dataset: str, algorithm: str, test_domains: Sequence[str], hparams_seed: int, trial_seed: int) -> str:
    """The run directory name: ``<dataset>-<algorithm>-<held-out>-hp<k>-trial<t>``, filesystem-safe."""
    slug = "-".join(
        [
            Path(dataset).name,
            algorithm.replace("+", "_"),
            "_".join(test_domains),
            f"hp{hparams_seed}",
            f"trial{trial_seed}",
        ]
    )
    return re.sub(r"[^A-Za-z0-9._-]+", "_", slug)


def expand(spec: SweepSpec) -> list[SweepRun]:
    """Every run of the sweep, in DomainBed's order (trial, dataset, algorithm, held-out set, hparam sample).

    Each run's config is complete and validated (backbone, algorithm, hyperparameters, domains) before anything
    trains, so a typo in a spec fails in a second, not after the first few runs.
    """
    base = TrainConfig.from_dict(spec.train, source="the sweep's train section")
    check_backbone(base.backbone)
    _check_namespaced_keys(spec, base.hparams)
    root = Path(spec.output_dir)
    runs: list[SweepRun] = []
    grids = {}
    for dataset in spec.datasets:
        name, domains, canonical = dataset_domains(dataset, spec.train)
        grids[dataset] = (name, held_out_sets(spec.test_domains, domains, canonical, dataset))
    for trial, dataset, algorithm in itertools.product(range(spec.n_trials), spec.datasets, spec.algorithms):
        name, test_sets = grids[dataset]
        space = search_space(algorithm, name, spec.search)
        # Namespaced recipe hparams (gga.rho=...) apply to the algorithms that have that component only.
        components = _component_names(algorithm)
        fixed = {k: v for k, v in base.hparams.items() if "." not in k or k.rpartition(".")[0] in components}
        # A sample depends on (search space, k, trial) only, not on the held-out set: draw each once.
        samples = [sample_hparams(space, k, trial) for k in range(spec.n_hparams)]
        for test_domains in test_sets:
            for k, sampled in enumerate(samples):
                cfg = dataclasses.replace(
                    base,
                    dataset=dataset,
                    algorithm=algorithm,
                    target_domains=list(test_domains),
                    seed=seed_hash(name, algorithm, list(test_domains), k, trial),
                    split_seed=trial,
                    output_dir=str(root / run_name(name, algorithm, test_domains, k, trial)),
                    hparams=dict(fixed),
                )
                cfg.update({key: value for key, value in sampled.items() if "." not in key}, source="the search")
                cfg.hparams.update({key: value for key, value in sampled.items() if "." in key})
                cfg.validate()
                resolve_hparams(cfg.algorithm, cfg.hparams)
                runs.append(SweepRun(name, algorithm, test_domains, k, trial, cfg, sampled))
    seen: set[Path] = set()
    for run in runs:
        if run.output_dir in seen:
            raise DGZooError(
                f"two runs of the sweep would share the run directory {run.output_dir}; give datasets distinct names"
            )
        seen.add(run.output_dir)
    return runs


def _component_names(algorithm: str) -> set[str]:
    host, addons = parse_algorithm(algorithm)
    return {host.name, *(a.name for a in addons)}


def _check_namespaced_keys(spec: SweepSpec, fixed: dict[str, Any]) -> None:
    """Namespaced keys (search, or the recipe's hparams) must name a hyperparameter of a component of one of the
    sweep's algorithms: a typo would otherwise be silently ignored by every run."""
    components: dict[str, Any] = {}
    for algorithm in spec.algorithms:
        host, addons = parse_algorithm(algorithm)
        components.update({c.name: c for c in (host, *addons)})
    for where, keys in (("search key", spec.search), ("hparam", fixed)):
        for key in keys:
            namespace, _, name = key.rpartition(".")
            if not namespace:
                continue
            if namespace not in components:
                raise DGZooError(
                    f"{where} '{key}': '{namespace}' is not part of any algorithm of the sweep"
                    f"{suggest(namespace, components)}; algorithms: {', '.join(spec.algorithms)}"
                )
            declared = components[namespace].HPARAMS
            if name not in declared:
                raise DGZooError(
                    f"{where} '{key}': {namespace} has no hyperparameter '{name}'"
                    f"{suggest(name, declared)}; valid: {', '.join(sorted(declared)) or 'none'}"
                )


# ---------------------------------------------------------------------- status and resumption


def sweep_claim_dir(run: SweepRun) -> Path:
    """Where a sweep invocation claims ``run`` while it launches and waits on it (beside, not inside, the run
    directory: the run's own claim is the training process's)."""
    return run.output_dir.parent / CLAIMS_DIR / run.output_dir.name


def holder_of(run: SweepRun) -> dict[str, Any] | None:
    """The live process other than this one holding ``run``: its training process, else a sweep invocation
    launching it; or None. This process's own claims do not count (it is about to launch the run itself)."""
    for path in (run.output_dir, sweep_claim_dir(run)):
        holder = claim_holder(path)
        if holder is not None and (holder.get("pid"), holder.get("host")) != (os.getpid(), socket.gethostname()):
            return holder
    return None


def run_status(run: SweepRun) -> str:
    """``done`` (finished with these settings), ``running`` (a live process holds it), ``resume`` (interrupted, or
    finished with fewer steps, and has a checkpoint), ``restart`` (started, no usable checkpoint) or ``new``. Raises
    DGZooError when the directory holds a run trained with other settings."""
    out = run.output_dir
    saved_path = out / "train_config.json"
    missing = missing_outputs(out)  # None: no results.json; []: done; else finalising was cut short
    if missing != [] and holder_of(run) is not None:
        return "running"
    if not out.exists() or not any(p.name != CLAIM_FILE for p in out.iterdir()):
        return "new"
    if not saved_path.exists():
        return "restart"
    saved = read_json(saved_path)
    changed, diffs = changed_fields(saved, run.config.to_dict())
    finished, checkpoint = missing is not None, latest_checkpoint(out)
    if changed == ["steps"] and int(saved["steps"]) < run.config.steps and checkpoint:
        return "resume"  # the spec asks for more steps: train further from the last checkpoint
    if changed and (finished or checkpoint):
        raise DGZooError(
            f"{out} holds a run trained with other settings than this sweep ({diffs}); write the "
            f"changed sweep to a new output_dir, or delete that run directory"
        )
    if changed:
        return "restart"
    if missing == []:
        return "done"
    return "resume" if checkpoint else "restart"  # a finished run missing files resumes at its last step to finish


def prepare(run: SweepRun) -> str:
    """Read ``run``'s status and set the matching ``resume`` / ``overwrite`` flag of its config."""
    run.status = run_status(run)
    run.config.resume = run.status == "resume"
    run.config.overwrite = run.status == "restart"
    return run.status


def plan(runs: list[SweepRun]) -> list[SweepRun]:
    """Set every run's status and the matching ``resume`` / ``overwrite`` flag of its config."""
    for run in runs:
        prepare(run)
    return runs


def status_line(runs: Sequence[SweepRun]) -> str:
    counts = {s: sum(r.status == s for r in runs) for s in ("done", "running", "resume", "restart", "new")}
    running = f"{counts['running']} running elsewhere, " if counts["running"] else ""
    return (
        f"{len(runs)} runs: {counts['done']} done, {running}{counts['resume']} to resume, {counts['restart']} to "
        f"restart, {counts['new']} to start"
    )


def describe_running(run: SweepRun) -> str:
    """One line for a run that another live process holds: skipped, not failed."""
    holder = holder_of(run)
    return f"running elsewhere: {run.describe()}" + (f", held by {describe_holder(holder)}" if holder else "")


# ---------------------------------------------------------------------- commands and the manifest


def train_command(cfg: TrainConfig, prefix: str = DEFAULT_LAUNCH_PREFIX) -> str:
    """The shell command that trains ``cfg``: ``prefix`` plus a flag for every setting that is not the default."""
    return command_line(prefix, flag_groups(cfg.to_dict(), TrainConfig().to_dict(), always=ALWAYS_IN_COMMANDS))


def write_manifest(spec: SweepSpec, runs: Sequence[SweepRun], prefix: str = DEFAULT_LAUNCH_PREFIX) -> Path:
    """Write ``sweep.json``: the spec, and for every run its grid position, sampled values, seeds and command."""
    root = Path(spec.output_dir)
    manifest = {
        "dgzoo_version": __version__,
        "written": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "spec": spec.to_dict(),
        "runs": [
            {
                "run_dir": r.output_dir.name,
                "dataset": r.dataset,
                "algorithm": r.algorithm,
                "test_domains": list(r.test_domains),
                "hparams_seed": r.hparams_seed,
                "trial_seed": r.trial_seed,
                "kind": r.kind,
                "seed": r.config.seed,
                "sampled": r.sampled,
                "command": train_command(dataclasses.replace(r.config, resume=False, overwrite=False), prefix),
            }
            for r in runs
        ],
    }
    write_json(root / MANIFEST, manifest)
    return root / MANIFEST


# ---------------------------------------------------------------------- more trials of the selected samples


def expand_all(spec: SweepSpec) -> list[SweepRun]:
    """The spec's grid, plus the runs ``--more-trials`` added to it (recorded in ``more_trials.json``)."""
    runs = expand(spec)
    path = Path(spec.output_dir) / MORE_TRIALS
    if path.exists():
        runs += more_trial_runs(spec, runs, read_json(path))
    return runs


def more_trial_runs(spec: SweepSpec, grid: Sequence[SweepRun], record: dict[str, Any]) -> list[SweepRun]:
    """The chosen grid runs of ``record`` retrained on trial seeds ``n_trials .. n_trials + n - 1``.

    Each keeps the chosen run's hyperparameter values (its sample as drawn for its own trial) and takes the new
    trial's data split and DomainBed's run seed for (k, new trial); the directory name ends in ``-more`` so it can
    never be mistaken for sample k of a grid that later grows to that trial.
    """
    by_name = {r.output_dir.name: r for r in grid}
    runs = []
    for name in record["chosen"]:
        chosen = by_name.get(name)
        if chosen is None:
            raise DGZooError(
                f"{Path(spec.output_dir) / MORE_TRIALS} names {name}, which is not a run of this spec "
                f"any more; move that file away to select again"
            )
        k, test_domains = chosen.hparams_seed, chosen.test_domains
        for trial in range(spec.n_trials, spec.n_trials + int(record["n"])):
            cfg = dataclasses.replace(
                chosen.config,
                seed=seed_hash(chosen.dataset, chosen.algorithm, list(test_domains), k, trial),
                split_seed=trial,
                resume=False,
                overwrite=False,
                hparams=dict(chosen.config.hparams),
                target_domains=list(test_domains),
                output_dir=str(
                    Path(spec.output_dir)
                    / (run_name(chosen.dataset, chosen.algorithm, test_domains, k, trial) + "-more")
                ),
            )
            runs.append(
                SweepRun(
                    chosen.dataset,
                    chosen.algorithm,
                    test_domains,
                    k,
                    trial,
                    cfg,
                    dict(chosen.sampled),
                    kind="more_trials",
                )
            )
    return runs


def choose_samples(spec: SweepSpec, grid: Sequence[SweepRun], method: str) -> list[str]:
    """Per (dataset, algorithm, held-out set): the grid run whose sample ``method`` selected with the best
    validation score over the spec's trial seeds (ties: the earlier trial). Returns their directory names."""
    from .report import load_runs, select_groups

    names = {r.output_dir.resolve(): r.output_dir.name for r in grid}
    runs, _ = load_runs([spec.output_dir])
    picks = select_groups([r for r in runs if r.path in names], method)
    best: dict[tuple, Any] = {}
    for (dataset, row, targets, _trial), pick in sorted(picks.items(), key=lambda kv: int(kv[0][3])):
        key = (dataset, row, targets)
        if key not in best or pick.val > best[key].val:
            best[key] = pick
    return [names[pick.run.path] for pick in best.values()]


def add_more_trials(spec: SweepSpec, n: int, method: str = "training_domain_validation") -> list[SweepRun]:
    """Record ``n`` more trial seeds for the selected samples (choosing them on the first call) and return every
    run of the sweep, grid and added ones. Repeating the call with the same ``n`` changes nothing; a larger ``n``
    adds trials to the same choice."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise DGZooError(f"--more-trials takes a positive number of trial seeds, got {n!r}")
    grid = plan(expand(spec))
    path = Path(spec.output_dir) / MORE_TRIALS
    record = read_json(path) if path.exists() else None
    if record is not None and record["selection"] != method:
        raise DGZooError(
            f"{path} chose its samples by {record['selection']}; pass --selection {record['selection']}, "
            f"or move that file away to choose again by {method}"
        )
    if record is None:
        unfinished = [r for r in grid if r.status != "done"]
        if unfinished:
            raise DGZooError(
                f"--more-trials selects among finished runs, and {len(unfinished)} of {len(grid)} runs of "
                f"{spec.output_dir} are not done; finish the sweep first (the same command without "
                f"--more-trials)"
            )
        record = {"selection": method, "n": n, "chosen": choose_samples(spec, grid, method)}
    record["n"] = max(int(record["n"]), n)
    write_json(path, record)
    return grid + more_trial_runs(spec, grid, record)
