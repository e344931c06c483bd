"""DomainBed-style result tables over run directories: ``dgzoo report DIR...``.

Every finished run (a directory with ``results.json``) under the given directories is read with its evaluation
records (``records.jsonl``), so each model-selection method is applied after the fact:

- ``training_domain_validation``: per run, the step with the best accuracy on the source domains' validation
  (``out``) splits; across hyperparameter samples, the run with the best such accuracy.
- ``leave_one_domain_out``: for the run holding out T, the runs of the same hyperparameter sample and trial that
  hold out T plus one more domain v are its validators; a step's score is their mean accuracy on v (which they
  never trained on). Needs sweeps with ``test_domains: single_and_pairs``, as DomainBed.
- ``oracle`` (test-domain validation): the last step of each run; across samples, the best accuracy on the
  held-out domains' ``out`` splits.

The reported number is the accuracy on the held-out domains' ``in`` splits at the selected step. Selection happens
per (dataset, algorithm, held-out domains, trial seed); a cell is the mean over trial seeds **± the standard error**
(population standard deviation / sqrt(n), DomainBed's ``format_mean``). Tables: one per dataset and method (rows:
algorithms; columns: held-out domains and their average), plus the averages across datasets. Columns are the
smallest held-out sets present (single domains in a DomainBed sweep; the pairs only serve leave-one-domain-out).

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

import csv
import io
import json
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DGZooError, suggest
from ..run.identity import identity_key
from ..run.rundir import atomic_write_text, missing_outputs, read_json, read_records
from ..run.selection import REPORT_SELECTION_METHODS, SELECTION_TITLES, LeaveOneDomainOut, select
from .domainbed import DomainBedRun, is_finished, load_domainbed_run

SELECTION_METHODS = REPORT_SELECTION_METHODS  # the report's methods, in table order (dgzoo.run.selection)
FORMATS = ("markdown", "latex", "csv")
MISSING = "X"  # DomainBed's mark for a cell without a finished run
PM_LATEX = "$\\pm$"
SE_NOTE = (
    "± is the standard error of the mean over trial seeds (population standard deviation / √n, as DomainBed reports it)"
)


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
        for results in root.rglob("results.json"):
            if missing_outputs(results.parent) == []:  # the sweep's "done": finalising was not cut short
                found[results.parent.resolve()] = None
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


def _read_dgzoo_run(path: Path, sweep: tuple[Path, dict[str, Any]] | None, notes: list[str]) -> Run | None:
    """One dgzoo run directory as a Run, or None with a note when it is not a DG run or cannot be read."""
    stage = "results.json"
    try:
        results = read_json(path / "results.json")
        if not isinstance(results, dict):
            raise ValueError("not a JSON object")
        if results.get("kind") == "unlearning":  # not a DG training run: its own metrics are in results.json
            notes.append(f"{path} is an unlearning run; skipped")
            return None
        stage = "records.jsonl"
        records = tuple(read_records(path))
        if not records:
            notes.append(f"{path} has no evaluation records (records.jsonl); skipped")
            return None
        stage = "results.json"
        run = _run(path, results, records, sweep)
        stage = "records.jsonl"
        _check_records(run)
        return run
    except READ_ERRORS as e:
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


def _run(
    path: Path, results: dict[str, Any], records: tuple[dict[str, Any], ...], sweep: tuple[Path, dict[str, Any]] | None
) -> Run:
    dataset = results["dataset"]
    if sweep is not None:
        folder, entry = sweep
        trial, hparams_seed = str(entry["trial_seed"]), int(entry["hparams_seed"])
        sample = f"{folder}:hp{hparams_seed}"  # sample k of two different sweeps are different samples
    else:
        split_seed, seed = results.get("split_seed", results["seed"]), results["seed"]
        trial = str(seed) if split_seed == seed else f"{split_seed}/{seed}"
        hparams_seed = None
        sample = json.dumps(
            {k: results.get(k) for k in ("backbone", "pretrained", "steps", "hparams")}, sort_keys=True, default=str
        )
    row = results["algorithm"]
    soup = results.get("soup")
    if isinstance(soup, dict):  # a weight average (dgzoo soup): its own row, one run per trial (its split seed)
        method = f"top-{soup['k']}" if soup["method"] == "top-k" and soup.get("k") else soup["method"]
        row = f"{results['algorithm']} ({method} soup of {soup['candidates']})"
        trial, hparams_seed, sample = str(results.get("split_seed", results["seed"])), None, f"soup:{path}"
    return Run(
        path=path,
        dataset=dataset["name"],
        dataset_title=dataset.get("title") or dataset["name"],
        algorithm=results["algorithm"],
        backbone=results["backbone"],
        row=row,
        domains=tuple(results["accuracy"]),
        sources=tuple(results["source_domains"]),
        targets=tuple(results["target_domains"]),
        trial=trial,
        sample=sample,
        hparams_seed=hparams_seed,
        records=records,
        hparams=dict(results.get("hparams") or {}),
        fingerprint=identity_key(results),
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


# ---------------------------------------------------------------------- tables


def mean_and_standard_error(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error over trial seeds: population standard deviation (ddof=0) / sqrt(n), as DomainBed."""
    x = np.asarray(values, dtype=float)
    return float(x.mean()), float(x.std() / np.sqrt(len(x)))


@dataclass(frozen=True)
class Cell:
    """A table cell in percent: mean ± standard error over ``n`` trial seeds (no error for the across-dataset Avg)."""

    mean: float
    se: float | None
    n: int

    @classmethod
    def over_trials(cls, accuracies: Sequence[float]) -> Cell:
        mean, se = mean_and_standard_error([100 * a for a in accuracies])
        return cls(mean, se, len(accuracies))


@dataclass
class Table:
    """One table: rows (algorithms) x columns; ``None`` cells are missing."""

    method: str
    title: str
    columns: list[str]
    rows: dict[str, list[Cell | None]]
    dataset: str | None = None  # None: the averages across datasets

    def trial_counts(self) -> set[int]:
        return {c.n for cells in self.rows.values() for c in cells if c is not None and c.se is not None}


@dataclass
class Report:
    """Every table of a set of runs, the run chosen for each cell and trial, and notes on what is missing."""

    tables: list[Table]
    picks: dict[str, dict[GroupKey, Pick]]
    notes: list[str] = field(default_factory=list)
    run_count: int = 0

    def markdown(self) -> str:
        """All tables as Markdown, each captioned with its dataset, selection method and trial count."""
        lines = [
            f"{self.run_count} finished runs. Accuracy (%) on held-out domains. {SE_NOTE}. Avg: the mean over "
            "held-out domains within each trial seed, then mean ± standard error; in the averages table the last "
            f"column is the mean over datasets. {MISSING}: no finished run.",
            "",
        ]
        for table in self.tables:
            lines += [
                f"### {table.title} ({_trials_label(table)})",
                "",
                "| Algorithm | " + " | ".join(table.columns) + " |",
                "|:--|" + "--:|" * len(table.columns),
            ]
            lines += [
                "| " + " | ".join([row, *(_format(c) for c in cells)]) + " |" for row, cells in table.rows.items()
            ]
            lines.append("")
        lines += [f"- {note}" for note in self.notes]
        return "\n".join(lines).rstrip() + "\n"

    def latex(self) -> str:
        """All tables as LaTeX (booktabs + adjustbox, ``$\\pm$``), as DomainBed's ``results.tex``."""
        out = [
            "% dgzoo report. Requires \\usepackage{booktabs} and \\usepackage{adjustbox}.",
            f"% {SE_NOTE.replace('√', 'sqrt ')}.",
            "",
        ]
        for table in self.tables:
            caption = (
                f"{_tex(table.title)}: accuracy (\\%) on held-out domains, mean $\\pm$ standard error over "
                f"trial seeds ({_tex(_trials_label(table))})."
            )
            out += [
                "\\begin{table}[t]",
                "\\centering",
                f"\\caption{{{caption}}}",
                "\\adjustbox{max width=\\textwidth}{%",
                f"\\begin{{tabular}}{{l{'c' * len(table.columns)}}}",
                "\\toprule",
                " & ".join(f"\\textbf{{{_tex(c)}}}" for c in ["Algorithm", *table.columns]) + " \\\\",
                "\\midrule",
            ]
            out += [
                " & ".join([_tex(row), *(_format(c, latex=True) for c in cells)]) + " \\\\"
                for row, cells in table.rows.items()
            ]
            out += ["\\bottomrule", "\\end{tabular}}", "\\end{table}", ""]
        return "\n".join(out)

    def csv(self) -> str:
        """Every cell as one row: selection, dataset, algorithm, column, mean, standard_error, n_trials (percent)."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["selection", "dataset", "algorithm", "column", "mean", "standard_error", "n_trials"])
        for table in self.tables:
            for row, cells in table.rows.items():
                for column, cell in zip(table.columns, cells):
                    writer.writerow(
                        [
                            table.method,
                            table.dataset or "averages",
                            row,
                            column,
                            *(
                                ("", "", "")
                                if cell is None
                                else (_round(cell.mean), "" if cell.se is None else _round(cell.se), cell.n)
                            ),
                        ]
                    )
        return buffer.getvalue()

    def selected_runs_csv(self) -> str:
        """Which run and step each method selected for each cell and trial seed: the audit trail of the tables."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(
            [
                "selection",
                "dataset",
                "algorithm",
                "test_domains",
                "trial",
                "hparams_seed",
                "run_dir",
                "step",
                "validation_accuracy",
                "test_accuracy",
            ]
        )
        for method, picks in self.picks.items():
            for (dataset, row, targets, trial), pick in sorted(picks.items(), key=lambda kv: kv[0]):
                writer.writerow(
                    [
                        method,
                        dataset,
                        row,
                        "+".join(targets),
                        trial,
                        "" if pick.run.hparams_seed is None else pick.run.hparams_seed,
                        pick.run.path,
                        pick.step,
                        _round(100 * pick.val),
                        _round(100 * pick.test),
                    ]
                )
        return buffer.getvalue()

    def render(self, fmt: str) -> str:
        if fmt not in FORMATS:
            raise DGZooError(f"--format '{fmt}' is not one of {', '.join(FORMATS)}{suggest(fmt, FORMATS)}")
        return {"markdown": self.markdown, "latex": self.latex, "csv": self.csv}[fmt]()

    def plot(self, out_dir: str | Path) -> list[Path]:
        """One figure per dataset: per-domain accuracy with standard-error bars, one panel per selection method."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        paths = []
        by_dataset: dict[str, list[Table]] = defaultdict(list)
        for table in self.tables:
            if table.dataset is not None:
                by_dataset[table.dataset].append(table)
        for dataset, tables in by_dataset.items():
            fig, axes = plt.subplots(
                1,
                len(tables),
                figsize=(max(4.5, 1.0 * len(tables[0].columns) + 2) * len(tables), 3.4),
                squeeze=False,
                sharey=True,
            )
            for ax, table in zip(axes[0], tables):
                rows = list(table.rows)
                width = 0.8 / max(len(rows), 1)
                x = np.arange(len(table.columns))
                for i, row in enumerate(rows):
                    cells = table.rows[row]
                    ax.bar(
                        x + (i - (len(rows) - 1) / 2) * width,
                        [c.mean if c else np.nan for c in cells],
                        width,
                        yerr=[c.se if c and c.se is not None else 0.0 for c in cells],
                        capsize=3,
                        label=row,
                    )
                ax.set_xticks(x, table.columns)
                ax.set_xlabel("held-out domain")
                ax.set_title(SELECTION_TITLES[table.method], fontsize=9)
                ax.set_ylim(0, 100)
            axes[0][0].set_ylabel("held-out accuracy (%), ± standard error")
            # The legend goes under the panels, where it can cover no bar whatever the accuracies.
            handles, labels = axes[0][0].get_legend_handles_labels()
            columns = min(len(labels), 4)
            fig.legend(handles, labels, loc="lower center", ncols=columns, fontsize=8, frameon=False)
            fig.suptitle(tables[0].title.rpartition(" — ")[0], fontsize=10)
            fig.tight_layout(rect=(0, 0.02 + 0.06 * math.ceil(len(labels) / columns), 1, 1))
            path = out_dir / f"accuracy_{_slug(dataset)}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            paths.append(path)
        return paths

    def write(self, out_dir: str | Path) -> list[Path]:
        """Write report.md, report.tex, report.csv, selected_runs.csv and the plots into ``out_dir``."""
        out_dir = Path(out_dir)
        written = []
        for name, text in (
            ("report.md", self.markdown()),
            ("report.tex", self.latex()),
            ("report.csv", self.csv()),
            ("selected_runs.csv", self.selected_runs_csv()),
        ):
            atomic_write_text(out_dir / name, text)
            written.append(out_dir / name)
        return written + self.plot(out_dir)


def build_report(runs: Sequence[Run], methods: Sequence[str] = SELECTION_METHODS, notes: Sequence[str] = ()) -> Report:
    """Select, aggregate over trial seeds and lay out the tables of ``runs`` for each selection method.

    Leave-one-domain-out is left out (with a note) when no run has the validators it needs.
    """
    columns = column_sets(runs)
    datasets = sorted(columns, key=lambda d: (_dataset_rank(d), d))
    titles = {r.dataset: r.dataset_title for r in runs}
    row_algorithm = {r.row: r.algorithm for r in runs}
    rows = sorted(row_algorithm, key=lambda row: (_row_rank(row_algorithm[row]), row))
    report = Report(tables=[], picks={}, notes=list(notes), run_count=len(runs))
    for method in methods:
        picks = select_groups(runs, method)
        if not picks:
            if method == "leave_one_domain_out":
                report.notes.append(
                    "leave-one-domain-out needs runs that hold out each pair of domains "
                    "(sweep spec: test_domains: single_and_pairs); none found, table left out"
                )
            continue
        report.picks[method] = picks
        # (dataset, row, held-out set) -> {trial: the pick's test accuracy}, built once instead of per cell.
        cell_trials: dict[tuple, dict[str, float]] = defaultdict(dict)
        for (d, row, targets, trial), pick in picks.items():
            cell_trials[(d, row, targets)][trial] = pick.test
        averages: dict[str, list[Cell | None]] = {row: [] for row in rows}
        for dataset in datasets:
            labels = ["+".join(s) for s in columns[dataset]]
            table = Table(method, f"{titles[dataset]} — {SELECTION_TITLES[method]}", [*labels, "Avg"], {}, dataset)
            for row in rows:
                per_column = [cell_trials.get((dataset, row, s), {}) for s in columns[dataset]]
                cells = [Cell.over_trials(list(trials.values())) if trials else None for trials in per_column]
                complete = set.intersection(*(set(t) for t in per_column))
                avg = (
                    Cell.over_trials([_mean(t[trial] for t in per_column) for trial in sorted(complete)])
                    if complete
                    else None
                )
                table.rows[row] = [*cells, avg]
                averages[row].append(avg)
                _note_incomplete(report, method, dataset, row, labels, per_column)
            report.tables.append(table)
        overall = Table(method, f"Averages — {SELECTION_TITLES[method]}", [*(titles[d] for d in datasets), "Avg"], {})
        for row, cells in averages.items():
            means = [c.mean for c in cells if c is not None]
            last = Cell(float(np.mean(means)), None, len(means)) if len(means) == len(cells) else None
            overall.rows[row] = [*cells, last]
        report.tables.append(overall)
    return report


def report_dirs(paths: Sequence[str | Path], methods: Sequence[str] = SELECTION_METHODS) -> Report:
    """Load the runs under ``paths`` and build their report."""
    runs, notes = load_runs(paths)
    return build_report(runs, methods, notes)


def _note_incomplete(
    report: Report, method: str, dataset: str, row: str, labels: list[str], per_column: list[dict[str, float]]
) -> None:
    trials = set().union(*per_column)
    for label, found in zip(labels, per_column):
        if found and set(found) != trials:
            report.notes.append(
                f"{SELECTION_TITLES[method]}: {row} on {dataset} held-out {label} has "
                f"{len(found)} of {len(trials)} trial seeds"
            )


def _trials_label(table: Table) -> str:
    counts = sorted(table.trial_counts())
    if not counts:
        return "no complete cell"
    if len(counts) == 1:
        return f"n = {counts[0]} trial seed{'s' if counts[0] > 1 else ''}"
    return f"n = {counts[0]}–{counts[-1]} trial seeds per cell; the CSV lists n"


def _format(cell: Cell | None, latex: bool = False) -> str:
    if cell is None:
        return MISSING
    if cell.se is None:
        return f"{cell.mean:.1f}"
    return f"{cell.mean:.1f} {PM_LATEX if latex else '±'} {cell.se:.1f}"


def _tex(text: str) -> str:
    for char, escaped in (
        ("\\", "\\textbackslash{}"),
        ("&", "\\&"),
        ("%", "\\%"),
        ("$", "\\$"),
        ("#", "\\#"),
        ("_", "\\_"),
        ("{", "\\{"),
        ("}", "\\}"),
        ("~", "\\textasciitilde{}"),
        ("^", "\\textasciicircum{}"),
        ("—", "---"),
        ("–", "--"),
    ):
        text = text.replace(char, escaped)
    return text


def _round(value: float) -> float:
    return round(value, 4)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "_" for c in text)


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values)


def _dataset_rank(dataset: str) -> int:
    """Registry order first (as DomainBed lists its datasets), other datasets after."""
    from ..data import REGISTRY

    names = list(REGISTRY)
    return names.index(dataset) if dataset in names else len(names)


def _row_rank(algorithm: str) -> int:
    """Algorithms in registration order (erm first, as DomainBed's ALGORITHMS), unknown ones after."""
    from ..algorithms import ALGORITHMS

    names = list(ALGORITHMS)
    host = algorithm.split("+")[0].lower()  # DomainBed's names (ERM, CORAL) sort with dgzoo's
    return names.index(host) if host in names else len(names)


def top_hparams(paths: Sequence[str | Path], methods: Sequence[str] = SELECTION_METHODS) -> str:
    """The selected hyperparameters, DomainBed's ``list_top_hparams``: for every selection method, dataset,
    algorithm, held-out set and trial seed, the sample chosen, its validation and test accuracy (%), its
    hyperparameters and its run directory."""
    runs, notes = load_runs(paths)
    lines: list[str] = []
    for method in methods:
        picks = select_groups(runs, method)
        lines.append(f"# {SELECTION_TITLES[method]}")
        if not picks:
            lines.append(
                "  no run can be selected by this method (leave-one-domain-out needs the pair runs of "
                "test_domains: single_and_pairs)"
            )
        group = None
        for (dataset, row, targets, trial), pick in sorted(
            picks.items(), key=lambda kv: (*kv[0][:3], _trial_key(kv[0][3]))
        ):
            if (dataset, row, targets) != group:
                group = (dataset, row, targets)
                lines.append(f"{dataset} {row} held-out {'+'.join(targets)}")
            sample = "" if pick.run.hparams_seed is None else f"hp{pick.run.hparams_seed} "
            lines.append(
                f"  trial {trial}: {sample}val {100 * pick.val:.1f} test {100 * pick.test:.1f} step "
                f"{pick.step}  {pick.run.path}"
            )
            values = " ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(pick.run.hparams.items())
            )
            lines.append(f"    {values or '(no hyperparameters recorded)'}")
    lines += [f"note: {note}" for note in notes]
    return "\n".join(lines) + "\n"


def _trial_key(trial: str) -> tuple:
    return (0, int(trial), "") if trial.isdigit() else (1, 0, trial)
