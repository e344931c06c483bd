"""The ``dgzoo sweep`` and ``dgzoo report`` commands (registered through ``dgzoo.cli.COMMAND_MODULES``)."""
from __future__ import annotations

import argparse
import sys
from typing import Any

from ..experiments.report import FORMATS, SELECTION_METHODS, report_dirs
from ..experiments.sweep import LAUNCHERS, SweepSpec, expand, plan, run_sweep, search_space, status_line, unsearched_hparams


def register_cli(subparsers: Any, groups: dict[str, Any]) -> None:
    """Add ``sweep`` and ``report`` to the ``dgzoo`` command."""
    sweep = subparsers.add_parser(
        "sweep", help="train a DomainBed-style sweep: datasets x algorithms x held-out domains x hparams x trials",
        description="Expand a sweep spec into runs and train the missing ones (finished runs are skipped, "
                    "interrupted ones resumed). See docs/sweeps.md.")
    sweep.add_argument("spec", help="sweep spec (YAML)")
    sweep.add_argument("--launcher", choices=LAUNCHERS, default="local",
                       help="local: train one run after another in this process; subprocess: each run in a fresh "
                            "process; print: print the training commands (a shell script) for a cluster "
                            "(default: local)")
    sweep.add_argument("--output-dir", help="where the run directories and sweep.json go (default: the spec's "
                                            "output_dir, else sweeps/<spec name>)")
    sweep.add_argument("--launch-prefix", help="command that trains one run, for subprocess and print "
                                               "(default: 'accelerate launch recipes/train.py')")
    sweep.add_argument("--dry-run", action="store_true",
                       help="list the runs, their status and the search spaces, and write nothing")
    sweep.add_argument("--fail-fast", action="store_true", help="stop at the first failing run")
    sweep.set_defaults(handler=_sweep)

    report = subparsers.add_parser(
        "report", help="DomainBed-style tables (mean ± standard error over trial seeds) from run directories",
        description="Read every finished run under DIR..., apply the model-selection methods to their evaluation "
                    "records and print one table per dataset and method plus the averages across datasets.")
    report.add_argument("dirs", nargs="+", metavar="DIR", help="run directories, or folders holding them (a sweep)")
    report.add_argument("--format", choices=FORMATS, default="markdown", help="printed format (default: markdown)")
    report.add_argument("--selection", nargs="+", choices=SELECTION_METHODS, default=list(SELECTION_METHODS),
                        metavar="METHOD", help=f"selection methods, of: {', '.join(SELECTION_METHODS)} (default: all)")
    report.add_argument("--output-dir", help="also write report.md, report.tex, report.csv, selected_runs.csv and "
                                             "accuracy_<dataset>.png plots here")
    report.set_defaults(handler=_report)


def _sweep(args: argparse.Namespace) -> int:
    spec = SweepSpec.from_yaml(args.spec, output_dir=args.output_dir)
    if args.dry_run:
        runs = plan(expand(spec))
        print(f"sweep {spec.output_dir}: {status_line(runs)}")
        for dataset, algorithm in dict.fromkeys((r.dataset, r.algorithm) for r in runs):
            space = search_space(algorithm, dataset, spec.search)
            print(f"search space of {algorithm} on {dataset}: "
                  + (", ".join(f"{k} {v}" for k, v in space.items()) or "nothing searched"))
            fixed = unsearched_hparams(algorithm, space)
            if fixed:
                print(f"  not searched (every sample keeps the recipe's value): {', '.join(fixed)}")
        for run in runs:
            sampled = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in run.sampled.items())
            print(f"{run.status:8} {run.output_dir}  {sampled or '(defaults)'}")
        return 0
    try:
        outcome = run_sweep(spec, args.launcher, args.launch_prefix, args.fail_fast)
    except KeyboardInterrupt:
        print("\ninterrupted; run the same command again to resume: finished runs are skipped, the interrupted one "
              "continues from its last checkpoint", file=sys.stderr)
        return 130
    return 1 if outcome.failed else 0


def _report(args: argparse.Namespace) -> int:
    report = report_dirs(args.dirs, args.selection)
    sys.stdout.write(report.render(args.format))
    if args.format != "markdown":  # Markdown lists the notes under its tables
        for note in report.notes:
            print(f"note: {note}", file=sys.stderr)
    if args.output_dir:
        for path in report.write(args.output_dir):
            print(f"wrote {path}", file=sys.stderr)
    return 0
