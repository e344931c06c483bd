"""DomainBed-style result tables over run directories: ``dgzoo report DIR...``.

:mod:`dgzoo.experiments.collect` reads the finished runs under the given directories and applies each
model-selection method after the fact; this module lays the picks out. The reported number is the accuracy on the
held-out domains' ``in`` splits at the selected step. A cell is the mean over trial seeds **± the standard error**
(population standard deviation / sqrt(n), DomainBed's ``format_mean``). Tables: one per dataset and method (rows:
algorithms; columns: held-out domains and their average), plus the averages across datasets. Columns are the
smallest held-out sets present (single domains in a DomainBed sweep; the pairs only serve leave-one-domain-out).
Formats: Markdown, LaTeX (DomainBed's ``results.tex``), CSV, the selected runs' audit CSV and plots.
"""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DGZooError, suggest
from ..run.rundir import atomic_write_text
from ..run.selection import SELECTION_TITLES

# load_runs and select_groups are imported from here too (tests, recipes, benchmarks): they live in collect.
from .collect import SELECTION_METHODS, GroupKey, Pick, Run, column_sets, load_runs, select_groups

FORMATS = ("markdown", "latex", "csv")
MISSING = "X"  # DomainBed's mark for a cell without a finished run
PM_LATEX = "$\\pm$"
SE_NOTE = (
    "± is the standard error of the mean over trial seeds (population standard deviation / √n, as DomainBed reports it)"
)


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
