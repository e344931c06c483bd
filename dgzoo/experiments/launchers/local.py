"""The launchers that stay in this process: ``local`` (one run after another, here), ``subprocess`` (one after
another, each in a fresh process) and ``print`` (the commands only, as a shell script)."""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import DGZooError
from ...run.claim import RunDirClaimed
from ..sweep import SweepRun, SweepSpec, describe_running, train_command
from .base import (
    Attempts,
    Launch,
    LaunchOptions,
    SweepOutcome,
    engine_train,
    exit_error,
    failure_reason,
    purpose,
    register_launcher,
)


@dataclass
class _Sequential(Attempts):
    """A run of ``local`` / ``subprocess``: each line numbered ``[index/total]``; ``fail_fast`` stops the sweep."""

    index: int = 0
    total: int = 0
    fail_fast: bool = False
    log: Callable[[str], None] = print
    outcome: SweepOutcome = field(default_factory=lambda: SweepOutcome([]))

    def say(self, text: str) -> None:
        self.log(f"[{self.index}/{self.total}] {text}")

    def on_done(self) -> None:
        self.say(f"finished elsewhere meanwhile: {self.run.describe()}")

    def on_running(self) -> None:
        self.say(describe_running(self.run))
        self.outcome.elsewhere.append(self.run)

    def on_start(self) -> None:
        retry = f", retry {self.attempt}/{self.max_retries}" if self.attempt else ""
        self.say(f"{self.run.describe()} ({self.status}{retry}) -> {self.run.output_dir}")

    def on_trained(self) -> None:
        self.outcome.trained.append(self.run)

    def on_elsewhere(self, error: RunDirClaimed) -> None:
        self.log(f"running elsewhere: {self.run.describe()}: {error}")
        self.outcome.elsewhere.append(self.run)

    def on_retry(self, error: Exception) -> None:
        if self.fail_fast:
            raise error
        reason = failure_reason(error)
        self.log(f"run failed: {self.run.describe()}: {reason}; retrying ({self.attempt}/{self.max_retries})")

    def on_failed(self, error: Exception) -> None:
        if self.fail_fast:
            raise error
        reason = failure_reason(error)
        self.outcome.failed.append((self.run, reason))
        self.log(f"run failed: {self.run.describe()}: {reason}")


def sequential(spec: SweepSpec, options: LaunchOptions, train: Callable[[SweepRun], None]) -> Launch:
    """Each pending run in turn, trained by ``train`` (which raises when the run fails) through :class:`Attempts`."""

    def launch(pending: list[SweepRun], outcome: SweepOutcome) -> bool:
        for index, run in enumerate(pending, 1):
            attempts = _Sequential(
                run,
                purpose(spec, options),
                options.max_retries,
                index=index,
                total=len(pending),
                fail_fast=options.fail_fast,
                log=options.log,
                outcome=outcome,
            )
            attempts.train(train)
        return True

    return launch


@register_launcher("local")
def in_this_process(spec: SweepSpec, options: LaunchOptions) -> Launch:
    """``local``: one run after another in this process (``options.train_fn``, default the engine's ``train``)."""
    return sequential(spec, options, lambda run: engine_train(options.train_fn)(run.config))


@register_launcher("subprocess")
def in_subprocesses(spec: SweepSpec, options: LaunchOptions) -> Launch:
    """``subprocess``: one run after another, each a fresh process running ``options.prefix`` + its flags."""
    prefix = options.prefix
    if "recipes/train.py" in prefix and not Path("recipes/train.py").exists():
        raise DGZooError(
            "recipes/train.py is not in the current directory; run the sweep from a dgzoo checkout or "
            "pass --launch-prefix 'accelerate launch -m dgzoo.cli train'"
        )

    def train(run: SweepRun) -> None:
        error = exit_error(subprocess.run(shlex.split(train_command(run.config, prefix))).returncode, run, prefix)
        if error is not None:
            raise error

    return sequential(spec, options, train)


@register_launcher("print", script=True)
def print_commands(spec: SweepSpec, options: LaunchOptions) -> Launch:
    """``print``: the command of every pending run, as a shell script (a run held elsewhere is a comment)."""

    def launch(pending: list[SweepRun], outcome: SweepOutcome) -> bool:
        for run in pending:
            if run.status == "running":
                options.log(f"# {describe_running(run)}")
                continue
            command = train_command(run.config, options.prefix)
            outcome.commands.append(command)
            options.log(command)
        return False

    return launch
