"""The ``dgzoo sweep`` and ``dgzoo report`` commands (registered through ``dgzoo.cli.COMMAND_MODULES``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..errors import DGZooError, Interrupted
from ..experiments.launchers import LAUNCHER_REGISTRY, SLURM_CLUSTERS, LaunchOptions, run_sweep, sweep_status
from ..experiments.report import FORMATS, SELECTION_METHODS, report_dirs, top_hparams
from ..experiments.sweep import SLURM_KEYS, SweepSpec, expand_all, plan, search_space, status_line, unsearched_hparams


def register_cli(subparsers: Any, groups: dict[str, Any]) -> None:
    """Add ``sweep`` and ``report`` to the ``dgzoo`` command."""
    sweep = subparsers.add_parser(
        "sweep",
        help="train a DomainBed-style sweep: datasets x algorithms x held-out domains x hparams x trials",
        description="Expand a sweep spec into runs and train the missing ones (finished runs are skipped, "
        "interrupted ones resumed). See docs/sweeps.md.",
    )
    sweep.add_argument(
        "spec", help="sweep spec (YAML); with --top-hparams also a sweep's output folder (dgzoo's or DomainBed's)"
    )
    sweep.add_argument(
        "--launcher",
        choices=tuple(LAUNCHER_REGISTRY),  # every registered launcher, built-in or added
        default="local",
        help="local: train one run after another in this process; subprocess: each run in a fresh "
        "process; print: print the training commands (a shell script); local-gpus: a pool with "
        "one run per GPU of this machine; slurm: one job array through submitit "
        "(pip install 'dgzoo[slurm]') (default: local)",
    )
    sweep.add_argument(
        "--output-dir",
        help="where the run directories and sweep.json go (default: the spec's output_dir, else sweeps/<spec name>)",
    )
    sweep.add_argument(
        "--launch-prefix",
        help="command that trains one run, for subprocess and print (default: 'accelerate launch recipes/train.py')",
    )
    sweep.add_argument(
        "--dry-run", action="store_true", help="list the runs, their status and the search spaces, and write nothing"
    )
    sweep.add_argument("--fail-fast", action="store_true", help="stop at the first failing run")
    sweep.add_argument(
        "--max-retries",
        type=int,
        default=0,
        metavar="N",
        help="try a failed run again up to N times in this invocation, from its last checkpoint "
        "(default: 0; a rerun of the sweep retries failed runs anyway)",
    )
    sweep.add_argument(
        "--status",
        action="store_true",
        help="print every run's status (and its Slurm job's state) and exit; trains nothing",
    )
    sweep.add_argument(
        "--top-hparams",
        action="store_true",
        help="list the hyperparameters each selection method chose per dataset, algorithm, held-out "
        "domains and trial seed (DomainBed's list_top_hparams) and exit",
    )
    sweep.add_argument(
        "--more-trials",
        type=int,
        default=0,
        metavar="N",
        help="train the selected hyperparameter sample of every dataset/algorithm/held-out set on N "
        "new trial seeds (the sweep must be finished; see docs/sweeps.md)",
    )
    sweep.add_argument(
        "--selection",
        nargs="+",
        choices=SELECTION_METHODS,
        metavar="METHOD",
        help=f"selection method(s) for --top-hparams (default: all) and --more-trials (one; default: "
        f"training_domain_validation), of: {', '.join(SELECTION_METHODS)}",
    )
    pool = sweep.add_argument_group("local-gpus and slurm")
    pool.add_argument(
        "--gpus",
        help="local-gpus: the GPU ids to use, e.g. 0,1,2,3 (default: CUDA_VISIBLE_DEVICES, else every GPU torch sees)",
    )
    pool.add_argument(
        "--gpus-per-run",
        type=int,
        default=1,
        metavar="N",
        help="GPUs per run; N > 1 trains each run with `accelerate launch --num_processes N` (default: 1)",
    )
    pool.add_argument(
        "--runs-per-gpu",
        type=int,
        default=1,
        metavar="N",
        help="runs sharing each GPU (local-gpus: per device slot; slurm: per job), each its own "
        "process; small runs leave most of a large GPU idle (default: 1)",
    )
    slurm = sweep.add_argument_group("slurm (flags override the spec's slurm section)")
    for key, (kind, meaning) in SLURM_KEYS.items():
        slurm.add_argument(
            f"--slurm-{key.replace('_', '-')}",
            dest=f"slurm_{key}",
            type=kind,
            metavar="N" if kind is int else "NAME",
            help=meaning.replace("%", "%%"),
        )
    slurm.add_argument(
        "--slurm-cluster",
        choices=SLURM_CLUSTERS,
        default="slurm",
        help="submitit's cluster: slurm, or local/debug to run the jobs on this machine (default: slurm)",
    )
    slurm.add_argument(
        "--wait",
        action="store_true",
        help="wait for the jobs and print progress (always on for --slurm-cluster local/debug)",
    )
    sweep.set_defaults(handler=_sweep)

    report = subparsers.add_parser(
        "report",
        help="DomainBed-style tables (mean ± standard error over trial seeds) from run directories",
        description="Read every finished run under DIR..., apply the model-selection methods to their evaluation "
        "records and print one table per dataset and method plus the averages across datasets.",
    )
    report.add_argument("dirs", nargs="+", metavar="DIR", help="run directories, or folders holding them (a sweep)")
    report.add_argument("--format", choices=FORMATS, default="markdown", help="printed format (default: markdown)")
    report.add_argument(
        "--selection",
        nargs="+",
        choices=SELECTION_METHODS,
        default=list(SELECTION_METHODS),
        metavar="METHOD",
        help=f"selection methods, of: {', '.join(SELECTION_METHODS)} (default: all)",
    )
    report.add_argument(
        "--output-dir",
        help="also write report.md, report.tex, report.csv, selected_runs.csv and accuracy_<dataset>.png plots here",
    )
    report.set_defaults(handler=_report)


def _sweep(args: argparse.Namespace) -> int:
    if args.top_hparams:
        target = Path(args.spec)
        folder = target if target.is_dir() else Path(SweepSpec.from_yaml(target, output_dir=args.output_dir).output_dir)
        sys.stdout.write(top_hparams([folder], args.selection or list(SELECTION_METHODS)))
        return 0
    spec = SweepSpec.from_yaml(args.spec, output_dir=args.output_dir)
    if args.status:
        sweep_status(spec)
        return 0
    if args.more_trials and args.selection and len(args.selection) > 1:
        raise DGZooError("--more-trials selects with one method; pass one --selection")
    if args.dry_run:
        runs = plan(expand_all(spec))
        print(f"sweep {spec.output_dir}: {status_line(runs)}")
        for dataset, algorithm in dict.fromkeys((r.dataset, r.algorithm) for r in runs):
            space = search_space(algorithm, dataset, spec.search)
            print(
                f"search space of {algorithm} on {dataset}: "
                + (", ".join(f"{k} {v}" for k, v in space.items()) or "nothing searched")
            )
            fixed = unsearched_hparams(algorithm, space)
            if fixed:
                print(f"  not searched (every sample keeps the recipe's value): {', '.join(fixed)}")
        for run in runs:
            sampled = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in run.sampled.items())
            print(f"{run.status:8} {run.output_dir}  {sampled or '(defaults)'}")
        return 0
    try:
        slurm = {key: getattr(args, f"slurm_{key}") for key in SLURM_KEYS if getattr(args, f"slurm_{key}") is not None}
        gpus = [g.strip() for g in args.gpus.split(",") if g.strip()] if args.gpus else None
        options = LaunchOptions(
            launcher=args.launcher,
            launch_prefix=args.launch_prefix,
            fail_fast=args.fail_fast,
            max_retries=args.max_retries,
            gpus=gpus,
            gpus_per_run=args.gpus_per_run,
            runs_per_gpu=args.runs_per_gpu,
            slurm=slurm,
            cluster=args.slurm_cluster,
            wait=True if args.wait else None,
            more_trials=args.more_trials,
            selection=(args.selection or ["training_domain_validation"])[0],
        )
        outcome = run_sweep(spec, options)
    except (KeyboardInterrupt, Interrupted):
        print(
            "\ninterrupted; run the same command again to resume: finished runs are skipped, the interrupted one "
            "continues from its last checkpoint",
            file=sys.stderr,
        )
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
