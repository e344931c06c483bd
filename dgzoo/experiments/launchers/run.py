"""``run_sweep``: expand and plan a sweep, write its manifest, and hand the pending runs to the chosen launcher."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..sweep import SweepSpec, add_more_trials, expand_all, plan, status_line, write_manifest
from .base import LAUNCHER_REGISTRY, LaunchOptions, SweepOutcome


def run_sweep(spec: SweepSpec, options: LaunchOptions | str = "local", **changes: Any) -> SweepOutcome:
    """Expand, plan and launch a sweep; return what was trained, failed, skipped and (``print``) the commands.

    ``options`` says how (:class:`LaunchOptions`); a launcher's name stands for the default options of that
    launcher, and keyword arguments change single fields: ``run_sweep(spec, "local-gpus", max_retries=1)`` (or
    ``launcher="local-gpus"``). Every
    option is checked, and the launcher refuses what it cannot do, before anything is written.
    """
    if isinstance(options, str):
        options = LaunchOptions(**{"launcher": options, **changes})
    elif changes:
        options = dataclasses.replace(options, **changes)
    options.check()
    launcher = LAUNCHER_REGISTRY[options.launcher]
    launch = launcher.setup(spec, options)
    log = options.log
    runs = add_more_trials(spec, options.more_trials, options.selection) if options.more_trials else expand_all(spec)
    runs = plan(runs)
    write_manifest(spec, runs, options.prefix)
    pending = [r for r in runs if r.status != "done"]
    outcome = SweepOutcome(runs)
    # A launcher whose output is a shell script (print) gets its status lines as comments.
    note = (lambda text: log(f"# {text}")) if launcher.script else log
    note(f"sweep {spec.output_dir}: {status_line(runs)}")
    if not launch(pending, outcome):  # printed, or submitted without waiting: the runs end elsewhere
        return outcome
    log(
        f"sweep {spec.output_dir}: {status_line(plan(runs))}"
        + (f"; {len(outcome.failed)} failed (rerun the sweep to retry them)" if outcome.failed else "")
    )
    if spec.soup:  # soups of the cells whose runs are all finished (torch loads only now: `dgzoo report` stays fast)
        from ..soup import build_sweep_soups

        build_sweep_soups(spec, runs, log)
    log(f"tables: dgzoo report {spec.output_dir}")
    return outcome
