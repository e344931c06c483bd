"""Which runs a report reads and which step of which run each model-selection method picks.

Every finished run (a directory with ``results.json``, read through :class:`dgzoo.run.results.RunResults`) under
the given directories is read with its evaluation records (``records.jsonl``), so each model-selection method is
applied after the fact:

- ``training_domain_validation``: per run, the step with the best accuracy on the source domains' validation
  (``out``) splits; across hyperparameter samples, the run with the best such accuracy.
- ``leave_one_domain_out``: for the run holding out T, the runs of the same hyperparameter sample and trial that
  hold out T plus one more domain v are its validators; a step's score is their mean accuracy on v (which they
  never trained on). Needs sweeps with ``test_domains: single_and_pairs``, as DomainBed.
- ``oracle`` (test-domain validation): the last step of each run; across samples, the best accuracy on the
  held-out domains' ``out`` splits.

Selection happens per (dataset, algorithm, held-out domains, trial seed); the tables over the picks are
:mod:`dgzoo.experiments.report`'s.

Runs of a sweep are grouped by its manifest (``sweep.json``: trial seed and hyperparameter sample of every run).
Other runs are grouped by their settings: trial = (split seed, seed), sample = identical hyperparameters.
DomainBed run directories (``results.jsonl`` + ``done``, :mod:`dgzoo.experiments.domainbed`) are read too, with
their trial seed and hparam sample from their ``args``, so both appear in one table.

A broken run directory (unreadable or incomplete ``results.json`` / ``records.jsonl``) is skipped with one note
naming it; identical runs (same resolved recipe, seeds, data and code, :mod:`dgzoo.run.identity`: a copied
directory, an identical rerun) count once, with a warning, since a second copy is no new trial and would shrink the
standard error.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

from ..errors import DGZooError, suggest
from ..run.identity import identity_key
from ..run.results import RunResults
from ..run.rundir import missing_outputs, read_json, read_records
from ..run.selection import REPORT_SELECTION_METHODS, LeaveOneDomainOut, select
from .domainbed import DomainBedRun, is_finished, load_domainbed_run

SELECTION_METHODS = REPORT_SELECTION_METHODS  # the report's methods, in table order (dgzoo.run.selection)

# ---------------------------------------------------------------------- reading runs


@dataclass(frozen=True)
class Run:
    """A finished run, as the report needs it."""

    path: Path
    dataset: str
    dataset_title: str
    algorithm: str
    backbone: str
    row: str  # the table row: the algorithm, plus the backbone when several backbones are reported
    domains: tuple[str, ...]
    sources: tuple[str, ...]
    targets: tuple[str, ...]
    trial: str
    sample: str  # runs of one hyperparameter sample (and trial) share it, whatever they hold out
    hparams_seed: int | None
    records: tuple[dict[str, Any], ...]
    hparams: dict[str, Any] = field(default_factory=dict, compare=False)  # what --top-hparams lists
    fingerprint: str = field(default="", compare=False)  # equal for identical runs (same settings, seeds, data)


READ_ERRORS = (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError)


def load_runs(paths: Sequence[str | Path]) -> tuple[list[Run], list[str]]:
    """Every finished run under ``paths`` (run directories or folders holding them; dgzoo's or DomainBed's), and
    notes on what was skipped (unfinished, broken, duplicated runs).

    Raises DGZooError when a path does not exist or holds no finished run.
    """
    manifests: dict[Path, tuple[Path, dict[str, Any]]] = {}
    manifest_files: dict[Path, None] = {}
    found: dict[Path, None] = {}
    domainbed: dict[Path, None] = {}
    unfinished = 0
    for raw in paths:
        root = Path(raw)
        if not root.exists():
            raise DGZooError(f"'{raw}' does not exist; pass run directories or the output_dir of a sweep")
        # The sweep manifest sits in the sweep's folder: under ``root``, or above it for a single run directory.
        # `dgzoo report sweep/*` names every run of one sweep: collect its manifest once, read it once below.
        for manifest in [*root.rglob("sweep.json"), *(p / "sweep.json" for p in root.resolve().parents)]:
            if manifest.is_file():
                manifest_files[manifest.resolve()] = None
        for run_dir in finished_run_dirs(root):
            found[run_dir.resolve()] = None
        unfinished += sum(missing_outputs(c.parent) != [] for c in root.rglob("train_config.json"))
        for results in root.rglob("results.jsonl"):  # DomainBed's train.py output
            if is_finished(results.parent):
                domainbed[results.parent.resolve()] = None
            else:
                unfinished += 1
    notes: list[str] = []
    for manifest in manifest_files:
        try:
            for entry in read_json(manifest).get("runs", []):
                manifests[(manifest.parent / entry["run_dir"]).resolve()] = (manifest.parent, entry)
        except READ_ERRORS as e:
            notes.append(
                f"skipped the broken sweep manifest {manifest} ({_reason(e)}); its runs are grouped by their settings"
            )
    if unfinished:
        notes.append(f"{unfinished} unfinished run(s) skipped")
    runs = []
    for path in found:
        run = _read_dgzoo_run(path, manifests.get(path), notes)
        if run is not None:
            runs.append(run)
    for path in domainbed:
        try:
            runs.append(_from_domainbed(load_domainbed_run(path)))
        except READ_ERRORS as e:
            notes.append(f"skipped broken run {path}: results.jsonl: {_reason(e)}")
    runs = _drop_duplicates(sorted(runs, key=lambda r: str(r.path)), notes)
    if not runs:  # say why each candidate was skipped (a half-written results.json names itself there)
        skipped = f"; {'; '.join(notes)}" if notes else ""
        raise DGZooError(
            f"no finished run (a directory with results.json and records.jsonl, or DomainBed's "
            f"results.jsonl and done) under {', '.join(map(str, paths))}{skipped}"
        )
    if len({run.backbone for run in runs}) > 1:  # several backbones: each (algorithm, backbone) is a row
        runs = [replace(run, row=f"{run.row} ({run.backbone})") for run in runs]
    return runs, notes


def finished_run_dirs(root: Path) -> Iterator[Path]:
    """Every finished dgzoo run directory under ``root``, in the filesystem's order: the one scan of the report and
    of a sweep's soups (the sweep's "done", :func:`dgzoo.run.rundir.missing_outputs`: finalising was not cut
    short)."""
    for results in root.rglob("results.json"):
        if missing_outputs(results.parent) == []:
            yield results.parent


def _read_dgzoo_run(path: Path, sweep: tuple[Path, dict[str, Any]] | None, notes: list[str]) -> Run | None:
    """One dgzoo run directory as a Run, or None with a note when it is not a DG run or cannot be read."""
    stage = "results.json"
    try:
        results = read_json(path / "results.json")
        if not isinstance(results, dict):
            raise ValueError("not a JSON object")
        typed = _typed(results, sweep)
        if typed.kind == "unlearning":  # not a DG training run: its own metrics are in results.json
            notes.append(f"{path} is an unlearning run; skipped")
            return None
        stage = "records.jsonl"
        records = tuple(read_records(path))
        if not records:
            notes.append(f"{path} has no evaluation records (records.jsonl); skipped")
            return None
        stage = "results.json"
        run = _run(path, typed, results, records, sweep)
        stage = "records.jsonl"
        _check_records(run)
        return run
    except (*READ_ERRORS, DGZooError) as e:  # DGZooError: a results.json the typed schema cannot read
        notes.append(f"skipped broken run {path}: {stage}: {_reason(e)}")
        return None


def _check_records(run: Run) -> None:
    """Every record has a step and both splits' accuracy for every domain: selection reads them all."""
    for record in run.records:
        int(record["step"])
        for domain in run.domains:
            float(record["acc"][domain]["in"]), float(record["acc"][domain]["out"])


def _reason(error: Exception) -> str:
    if isinstance(error, KeyError):
        return f"missing {error}"
    if isinstance(error, json.JSONDecodeError):
        return f"invalid JSON ({error})"
    return f"{type(error).__name__}: {error}" if not isinstance(error, (ValueError, OSError)) else str(error)


def _drop_duplicates(runs: list[Run], notes: list[str]) -> list[Run]:
    """Keep the first of runs with one fingerprint: a copy or an identical rerun is the same trial, not another."""
    kept: dict[str, Run] = {}
    for run in runs:
        first = kept.setdefault(run.fingerprint, run) if run.fingerprint else run
        if first is not run:
            notes.append(
                f"warning: {run.path} is identical to {first.path} (same recipe, seeds, data and code); counted once"
            )
    return [r for r in runs if not r.fingerprint or kept[r.fingerprint] is r]


def _from_domainbed(run: DomainBedRun) -> Run:
    return Run(
        path=run.path,
        dataset=run.dataset,
        dataset_title=run.dataset_title,
        algorithm=run.algorithm,
        backbone=run.backbone,
        row=run.algorithm,
        domains=run.domains,
        sources=run.sources,
        targets=run.targets,
        trial=str(run.trial_seed),
        sample=f"{run.path.parent}:hp{run.hparams_seed}",
        hparams_seed=run.hparams_seed,
        records=run.records,
        hparams=run.hparams,
        fingerprint=run.fingerprint,
    )


def _typed(results: dict[str, Any], sweep: tuple[Path, dict[str, Any]] | None) -> RunResults:
    """The run's typed results, or a KeyError naming the first field the report needs that the file lacks."""
    needed = ["dataset", *(["seed"] if sweep is None else []), "algorithm"]
    missing = next((name for name in needed if name not in results), None)
    if missing is None and isinstance(results["dataset"], dict) and "name" not in results["dataset"]:
        missing = "name"
    if missing is not None:
        raise KeyError(missing)
    return RunResults.from_json(results).require("backbone", "accuracy", "source_domains", "target_domains")


def _run(
    path: Path,
    results: RunResults,
    raw: dict[str, Any],
    records: tuple[dict[str, Any], ...],
    sweep: tuple[Path, dict[str, Any]] | None,
) -> Run:
    dataset = results.dataset
    assert dataset is not None  # _typed required it
    if sweep is not None:
        folder, entry = sweep
        trial, hparams_seed = str(entry["trial_seed"]), int(entry["hparams_seed"])
        sample = f"{folder}:hp{hparams_seed}"  # sample k of two different sweeps are different samples
    else:
        split_seed, seed = results.data_split_seed, results.seed
        trial = str(seed) if split_seed == seed else f"{split_seed}/{seed}"
        hparams_seed = None
        sample = json.dumps(
            {k: raw.get(k) for k in ("backbone", "pretrained", "steps", "hparams")}, sort_keys=True, default=str
        )
    row = results.algorithm
    soup = results.soup
    if results.is_soup:  # a weight average (dgzoo soup): its own row, one run per trial (its split seed)
        assert soup is not None
        method = f"top-{soup['k']}" if soup["method"] == "top-k" and soup.get("k") else soup["method"]
        row = f"{results.algorithm} ({method} soup of {soup['candidates']})"
        trial, hparams_seed, sample = str(results.data_split_seed), None, f"soup:{path}"
    return Run(
        path=path,
        dataset=dataset.name,
        dataset_title=dataset.title or dataset.name,
        algorithm=results.algorithm,
        backbone=cast(str, results.backbone),  # _typed required it
        row=row,
        domains=tuple(results.accuracy),
        sources=tuple(results.source_domains),
        targets=tuple(results.target_domains),
        trial=trial,
        sample=sample,
        hparams_seed=hparams_seed,
        records=records,
        hparams=dict(results.hparams or {}),
        fingerprint=identity_key(raw),
    )  # the one rule of dgzoo.run.identity, shared with the zoo


# ---------------------------------------------------------------------- model selection


@dataclass(frozen=True)
class Pick:
    """The step a selection method chose in a run, its validation score and its held-out accuracy."""

    run: Run
    step: int
    val: float
    test: float


def select_in_run(run: Run, method: str) -> Pick:
    """Training-domain validation or oracle selection inside one run (:func:`dgzoo.training.evaluation.select`)."""
    chosen = select(run.records, method, run.sources, run.targets)
    return Pick(run, chosen["step"], chosen["score"], chosen["target_accuracy"])


def leave_one_domain_out(run: Run, validators: dict[str, Run]) -> Pick | None:
    """DomainBed's leave-one-domain-out cross-validation of ``run`` (held-out set T): ``validators[v]`` is the run
    of the same hyperparameter sample and trial holding out T plus ``v`` (:meth:`LeaveOneDomainOut.validated_step`).
    None when a validator is missing."""
    others = [d for d in run.domains if d not in run.targets]
    found = LeaveOneDomainOut.validated_step(
        run.records, run.targets, others, {v: r.records for v, r in validators.items()}
    )
    return None if found is None else Pick(run, *found)


GroupKey = tuple[str, str, tuple[str, ...], str]  # dataset, row, held-out domains, trial


def column_sets(runs: Iterable[Run]) -> dict[str, list[tuple[str, ...]]]:
    """Per dataset, the held-out sets that form the table's columns: the smallest ones present, in domain order."""
    sets: dict[str, set[tuple[str, ...]]] = defaultdict(set)
    order: dict[str, tuple[str, ...]] = {}
    for run in runs:
        sets[run.dataset].add(run.targets)
        order.setdefault(run.dataset, run.domains)
    columns = {}
    for dataset, found in sets.items():
        size = min(len(s) for s in found)
        domains = order[dataset]
        columns[dataset] = sorted(
            (s for s in found if len(s) == size),
            key=lambda s: [domains.index(d) if d in domains else len(domains) for d in s],
        )
    return columns


def select_groups(runs: Sequence[Run], method: str) -> dict[GroupKey, Pick]:
    """Apply ``method`` to every (dataset, row, held-out set, trial) group; the best hyperparameter sample wins.

    Ties between samples go to the lower hparam sample (sweep runs), else to the run directory listed first.
    """
    if method not in SELECTION_METHODS:
        raise DGZooError(
            f"unknown selection method '{method}'{suggest(method, SELECTION_METHODS)}; "
            f"use one of {', '.join(SELECTION_METHODS)}"
        )
    columns = column_sets(runs)
    by_sample = {(r.dataset, r.row, r.trial, r.sample, frozenset(r.targets)): r for r in runs}
    groups: dict[GroupKey, list[Run]] = defaultdict(list)
    for run in runs:
        if run.targets in columns[run.dataset]:
            groups[(run.dataset, run.row, run.targets, run.trial)].append(run)
    chosen = {}
    for key, candidates in groups.items():
        candidates.sort(key=lambda r: (r.hparams_seed if r.hparams_seed is not None else math.inf, str(r.path)))
        picks = []
        for run in candidates:
            if method == "leave_one_domain_out":
                validators = {
                    v: by_sample.get((run.dataset, run.row, run.trial, run.sample, frozenset((*run.targets, v))))
                    for v in run.domains
                    if v not in run.targets
                }
                pick = leave_one_domain_out(run, {v: r for v, r in validators.items() if r is not None})
            else:
                pick = select_in_run(run, method)
            if pick is not None:
                picks.append(pick)
        if picks:
            chosen[key] = max(picks, key=lambda p: p.val)  # max keeps the first of equal scores
    return chosen
