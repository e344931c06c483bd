"""What every launcher shares: the options of a sweep invocation, the launcher registry, and one run's claim ->
status -> train -> retry cycle (:class:`Attempts`), which each launcher drives and reports in its own words."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ...errors import DGZooError, Interrupted, suggest
from ...registry import Registry
from ...run.claim import EXIT_CLAIMED, RunDirClaimed, claim_run_dir
from ..spec import check_slurm_options
from ..sweep import DEFAULT_LAUNCH_PREFIX, SweepRun, SweepSpec, prepare, sweep_claim_dir

# What an attempt, or a whole run's attempts, came to (a Slurm task returns these strings to the submitting side).
TRAINED, DONE, ELSEWHERE, RETRY, FAILED = "trained", "done", "running elsewhere", "retry", "failed"
PACKING_LAUNCHERS = ("local-gpus", "slurm")  # where runs get devices, so --runs-per-gpu can pack them


@dataclass
class LaunchOptions:
    """How one invocation of a sweep launches its runs: everything ``dgzoo sweep`` takes beside the spec.

    ``launcher``: a name in :data:`LAUNCHER_REGISTRY`. ``launch_prefix``: the command that trains one run
    (``subprocess``, ``print``; ``local-gpus`` and packed Slurm jobs default to :func:`.pool.pool_prefix`).
    ``max_retries``: how often a failed run is tried again in this invocation. ``gpus`` / ``gpus_per_run``: the
    device slots of ``local-gpus`` (default: ``CUDA_VISIBLE_DEVICES``, else every GPU torch sees). ``runs_per_gpu``:
    runs sharing each device slot (``local-gpus``) or each Slurm job, each still its own process. ``slurm``:
    resources overriding the spec's ``slurm`` section; ``cluster``: submitit's cluster (``local`` runs the jobs on
    this machine); ``wait``: wait for the jobs (default: only on ``local``/``debug``). ``more_trials``: first add N
    trial seeds of the samples ``selection`` picks. ``train_fn`` replaces the engine's ``train`` (``local`` and
    single-GPU Slurm jobs), e.g. to instrument it. ``poll_s``: how often a waiting launcher looks at its runs.
    """

    launcher: str = "local"
    launch_prefix: str | None = None
    fail_fast: bool = False
    log: Callable[[str], None] = print
    max_retries: int = 0
    gpus: Sequence[str] | None = None
    gpus_per_run: int = 1
    runs_per_gpu: int = 1
    slurm: dict[str, Any] | None = None
    cluster: str = "slurm"
    wait: bool | None = None
    more_trials: int = 0
    selection: str = "training_domain_validation"
    train_fn: Callable[[Any], Any] | None = None
    poll_s: float = 0.5

    @property
    def prefix(self) -> str:
        """The command that trains one run, as the manifest and printed commands give it."""
        return self.launch_prefix or DEFAULT_LAUNCH_PREFIX

    def check(self) -> None:
        """Refuse, in one line naming the flag, options no launcher can use (before anything is written)."""
        if self.launcher not in LAUNCHER_REGISTRY:
            names = tuple(LAUNCHER_REGISTRY)
            raise DGZooError(
                f"--launcher '{self.launcher}' is not one of {', '.join(names)}{suggest(self.launcher, names)}"
            )
        if not _whole(self.max_retries, 0):
            raise DGZooError(f"--max-retries must be a whole number >= 0, got {self.max_retries!r}")
        if not _whole(self.gpus_per_run, 1):
            raise DGZooError(f"--gpus-per-run must be a positive integer, got {self.gpus_per_run!r}")
        check_runs_per_gpu(self.runs_per_gpu, self.launcher)
        check_slurm_options(dict(self.slurm or {}), "the slurm flags")


def _whole(value: Any, least: int) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= least


def check_runs_per_gpu(runs_per_gpu: Any, launcher: str) -> None:
    """``--runs-per-gpu`` is a positive integer, and packs runs only where runs get devices (local-gpus, slurm)."""
    if not _whole(runs_per_gpu, 1):
        raise DGZooError(f"--runs-per-gpu must be a positive integer, got {runs_per_gpu!r}")
    if runs_per_gpu > 1 and launcher not in PACKING_LAUNCHERS:
        raise DGZooError(
            f"--runs-per-gpu packs runs onto the GPUs of --launcher local-gpus or slurm, not "
            f"{launcher}; use one of those, or drop --runs-per-gpu"
        )


@dataclass
class SweepOutcome:
    """What one invocation of a sweep did."""

    runs: list[SweepRun]
    trained: list[SweepRun] = field(default_factory=list)
    failed: list[tuple[SweepRun, str]] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    elsewhere: list[SweepRun] = field(default_factory=list)  # held or queued by another process: skipped
    jobs: dict[str, str] = field(default_factory=dict)  # slurm: run directory name -> job id


# ---------------------------------------------------------------------- the registry

Launch = Callable[[list[SweepRun], SweepOutcome], bool]
"""Launches the pending runs, recording them in the outcome; returns whether they ended in this invocation (then
the sweep's final status line and soups follow; a Slurm submission without ``--wait`` returns False)."""
Setup = Callable[[SweepSpec, LaunchOptions], Launch]
"""A launcher: checks the spec and options before anything is written and returns its :data:`Launch`."""


@dataclass(frozen=True)
class Launcher:
    """A registered launcher. ``setup(spec, options)`` runs before anything is written: it refuses what it cannot
    do (one line) and returns the :data:`Launch` for the pending runs. ``script``: its output is a shell script, so
    the sweep's status lines become comments."""

    setup: Setup
    script: bool = False


LAUNCHER_REGISTRY: Registry[Launcher] = Registry("launcher", describe=lambda entry: entry.setup.__qualname__)


def register_launcher(name: str, script: bool = False, replace: bool = False) -> Callable[[Setup], Setup]:
    """Register ``setup`` as ``--launcher name`` (a taken name is refused unless ``replace``)."""

    def add(setup: Setup) -> Setup:
        LAUNCHER_REGISTRY.add(name, Launcher(setup, script), replace=replace)
        return setup

    return add


def purpose(spec: SweepSpec, options: LaunchOptions) -> str:
    """What the claims of this invocation say holds a run."""
    return f"dgzoo sweep {spec.output_dir} ({options.launcher})"


# ---------------------------------------------------------------------- one run's claim -> status -> train -> retry


def acquire(run: SweepRun, purpose: str) -> tuple[contextlib.ExitStack, str]:
    """Claim ``run`` for this invocation and read its status again while holding the claim.

    Returns the claim (an ExitStack to close when the run ends) and the status; for ``done`` and ``running`` (another
    live process holds the run, or a sweep invocation is launching it) the claim is already released.
    """
    stack = contextlib.ExitStack()
    try:
        stack.enter_context(claim_run_dir(sweep_claim_dir(run), purpose))
        status = prepare(run)
    except RunDirClaimed:
        stack.close()
        run.status = "running"
        return stack, "running"
    except BaseException:
        stack.close()
        raise
    if status in ("done", "running"):
        stack.close()
    return stack, status


@dataclass
class Attempts:
    """One run's claim -> status -> train -> retry cycle, the same under every launcher.

    Each attempt claims the run and reads its status again (:meth:`begin`): a run finished or held elsewhere
    meanwhile is skipped. An attempt that ends (:meth:`end`) is trained, running elsewhere (another live process
    holds the run directory), or failed: retried while ``max_retries`` allow, resuming from its checkpoint, else
    failed for good. Ctrl-C is never a failure. A launcher that blocks on its runs calls :meth:`train`; one that
    keeps several in flight calls :meth:`begin` and :meth:`end` itself. Launchers subclass it to report each step
    (the ``on_*`` hooks, which do nothing here); a hook may raise to stop the run (fail-fast, a task's failure).
    """

    run: SweepRun
    purpose: str
    max_retries: int = 0
    attempt: int = 0  # 0 for the first try, k for the k-th retry
    claim: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    status: str = ""

    def acquire(self) -> tuple[contextlib.ExitStack, str]:
        """Claim the run and read its status (:func:`acquire`); Slurm tasks wait here for a holder on another host."""
        return acquire(self.run, self.purpose)

    def begin(self) -> str:
        """Claim the run and read its status: ``done`` and ``running`` are reported and released; otherwise the
        claim is held until :meth:`end`."""
        self.claim, self.status = self.acquire()
        if self.status == "done":
            self.on_done()
        elif self.status == "running":
            self.on_running()
        return self.status

    def end(self, error: BaseException | None) -> str:
        """Report how an attempt ended and release the claim: TRAINED, ELSEWHERE, RETRY (call :meth:`begin`
        again) or FAILED. Ctrl-C (and anything that is not an ``Exception``) is raised again."""
        with self.claim:
            if error is None:
                self.on_trained()
                return TRAINED
            if isinstance(error, RunDirClaimed):
                self.on_elsewhere(error)
                return ELSEWHERE
            if isinstance(error, Interrupted) or not isinstance(error, Exception):
                raise error
            if self.attempt < self.max_retries and self.retryable(error):
                self.attempt += 1
                self.on_retry(error)
                return RETRY
            self.on_failed(error)
            return FAILED

    def train(self, train: Callable[[SweepRun], None]) -> str:
        """Attempt the run with ``train`` (which raises when it fails) until it ends: DONE, ELSEWHERE, TRAINED or
        FAILED."""
        while True:
            status = self.begin()
            if status == "done":
                return DONE
            if status == "running":
                return ELSEWHERE
            self.on_start()
            try:
                train(self.run)
            except BaseException as e:  # end() says what it means: one failing run must not cost the others
                verdict = self.end(e)
            else:
                verdict = self.end(None)
            if verdict != RETRY:
                return verdict

    def retryable(self, error: BaseException) -> bool:
        """Whether a failure may be tried again (while retries are left)."""
        return True

    def on_done(self) -> None:
        """The run finished elsewhere meanwhile."""

    def on_running(self) -> None:
        """Another live process holds the run, or another sweep invocation is launching it."""

    def on_start(self) -> None:
        """An attempt starts (``status``: new, resume or restart; ``attempt``: which)."""

    def on_trained(self) -> None:
        """The attempt trained the run."""

    def on_elsewhere(self, error: RunDirClaimed) -> None:
        """The training process found the run directory held by another live process."""

    def on_retry(self, error: Exception) -> None:
        """The attempt failed and the run is tried again (``attempt`` is the retry's number)."""

    def on_failed(self, error: Exception) -> None:
        """The last attempt failed."""


def exit_error(code: int, run: SweepRun, command: str) -> Exception | None:
    """What a training process's exit status means: None (trained), :class:`RunDirClaimed` (held by another live
    process, :data:`EXIT_CLAIMED`) or the failure."""
    if code == EXIT_CLAIMED:
        return RunDirClaimed(f"{run.output_dir} is in use by another process")
    if code:
        return subprocess.CalledProcessError(code, command)
    return None


def failure_reason(error: BaseException) -> str:
    """One line for a failed attempt: dgzoo's own message, a process's exit status, or the exception (whose
    traceback goes to stderr)."""
    if isinstance(error, subprocess.CalledProcessError):
        return f"exit status {error.returncode}"
    if not isinstance(error, DGZooError):  # a DGZooError already said what went wrong
        traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
    return repr(error) if not isinstance(error, DGZooError) else str(error)


def engine_train(train_fn: Callable[[Any], Any] | None) -> Callable[[Any], Any]:
    """``train_fn``, or the engine's ``train`` (imported only now: torch loads when a run trains, not before)."""
    if train_fn is not None:
        return train_fn
    from ...training.engine import train

    return train
