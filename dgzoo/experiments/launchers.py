"""Launchers: how the pending runs of a sweep get trained, on this machine or off it.

- ``local``: one run after another in this process; ``subprocess``: one after another, each in a fresh process;
  ``print``: the commands only, as a shell script.
- ``local-gpus``: a pool over this machine's GPUs: one run per device slot (one GPU, or ``gpus_per_run`` GPUs
  with ``accelerate launch`` inside the run), refilled as runs finish, each with its log under ``launch_logs/``,
  the device given through ``CUDA_VISIBLE_DEVICES``, and a progress line whenever the counts change.
- ``slurm``: one submitit job array per invocation. Each array task re-reads its run's status on the node, trains
  it in the job, and when Slurm preempts it or its time runs out, submitit calls :meth:`SlurmTask.checkpoint` and
  requeues it: the requeued task resumes from the run's last checkpoint (``--resume``). ``slurm_jobs.json`` records
  which job trains which run, for ``dgzoo sweep --status`` and so a rerun does not submit a queued run again.
- ``--runs-per-gpu N`` packs N runs onto each device slot (``local-gpus``) or into each Slurm job (``slurm``), each
  run still its own process: small runs leave most of a large GPU idle.

Rerunning is safe under every launcher. Before launching a run, the sweep claims it (:func:`acquire`: a claim
file under ``<output_dir>/.claims/``, :mod:`dgzoo.run.claim`) and reads its status again while holding the claim,
so two invocations of one sweep never both start it; a run whose directory a live training process holds (any
launcher, or a `dgzoo train` by hand) is reported "running elsewhere" and skipped, never counted as failed; a
dead process holds nothing (its claim goes stale). A failed run is retried at most ``max_retries`` times, resuming
from its checkpoint when it has one.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import io
import os
import pickle
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from ..errors import DGZooError, Interrupted, suggest
from ..run.claim import CLAIM_TTL_S, EXIT_CLAIMED, RunDirClaimed, claim_run_dir
from ..run.rundir import read_json, write_json
from .slurm import (
    DEFAULT_MAX_REQUEUES,
    FAILED_STATES,
    FAILURE_FILE,
    UNKNOWN,
    check_time,
    job_states,
    read_failure,
    resolve_gpus,
    sbatch_refusal,
    write_failure,
)
from .sweep import (
    DEFAULT_LAUNCH_PREFIX,
    SweepRun,
    SweepSpec,
    add_more_trials,
    check_slurm_options,
    describe_running,
    expand_all,
    holder_of,
    plan,
    prepare,
    status_line,
    sweep_claim_dir,
    train_command,
    write_manifest,
)

LAUNCHERS = ("local", "subprocess", "print", "local-gpus", "slurm")
SLURM_CLUSTERS = ("slurm", "local", "debug")  # submitit's: a real cluster, or this machine (to try a sweep)
SLURM_JOBS = "slurm_jobs.json"
SLURM_FOLDER = "slurm"  # submitit's pickles and every job's stdout/stderr, <output_dir>/slurm/<job id>_*
LAUNCH_LOGS = "launch_logs"  # local-gpus: <output_dir>/launch_logs/<run dir name>.log
DEFAULT_SLURM_TIME_MIN = 24 * 60
LIVE_SLURM_STATES = (
    "PENDING",
    "RUNNING",
    "REQUEUED",
    "CONFIGURING",
    "COMPLETING",
    "RESIZING",
    "SUSPENDED",
    "REQUEUE_HOLD",
    "REQUEUE_FED",
)
ENDED_CHECK_S = 15.0  # --wait on Slurm: how often to look for jobs that ended without a result
MAIN_PROCESS_PORT = 29500  # accelerate's default; slot i of a local-gpus pool uses port + i


@dataclass
class SweepOutcome:
    """What one invocation of a sweep did."""

    runs: list[SweepRun]
    trained: list[SweepRun] = field(default_factory=list)
    failed: list[tuple[SweepRun, str]] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    elsewhere: list[SweepRun] = field(default_factory=list)  # held or queued by another process: skipped
    jobs: dict[str, str] = field(default_factory=dict)  # slurm: run directory name -> job id


def run_sweep(
    spec: SweepSpec,
    launcher: str = "local",
    launch_prefix: str | None = None,
    fail_fast: bool = False,
    log: Callable[[str], None] = print,
    max_retries: int = 0,
    gpus: Sequence[str] | None = None,
    gpus_per_run: int = 1,
    slurm: dict[str, Any] | None = None,
    cluster: str = "slurm",
    wait: bool | None = None,
    more_trials: int = 0,
    selection: str = "training_domain_validation",
    train_fn: Callable[[Any], Any] | None = None,
    poll_s: float = 0.5,
    runs_per_gpu: int = 1,
) -> SweepOutcome:
    """Expand, plan and launch a sweep; return what was trained, failed, skipped and (``print``) the commands.

    ``more_trials``: first add N trial seeds of the selected samples (``selection``). ``max_retries``: how often a
    failed run is tried again in this invocation. ``gpus`` / ``gpus_per_run``: the device slots of ``local-gpus``
    (default: ``CUDA_VISIBLE_DEVICES``, else every GPU torch sees). ``slurm``: resources overriding the spec's
    ``slurm`` section; ``cluster``: submitit's cluster (``local`` runs the jobs on this machine); ``wait``: wait for
    the jobs (default: only on ``local``/``debug``). ``train_fn`` replaces the engine's ``train`` (``local`` and
    single-GPU ``slurm`` jobs), e.g. to instrument it. ``runs_per_gpu``: runs sharing each device slot
    (``local-gpus``) or each Slurm job (``slurm``), each still its own process (:func:`pack_slots`,
    :class:`PackedSlurmTask`).
    """
    if launcher not in LAUNCHERS:
        raise DGZooError(f"--launcher '{launcher}' is not one of {', '.join(LAUNCHERS)}{suggest(launcher, LAUNCHERS)}")
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        raise DGZooError(f"--max-retries must be a whole number >= 0, got {max_retries!r}")
    if isinstance(gpus_per_run, bool) or not isinstance(gpus_per_run, int) or gpus_per_run < 1:
        raise DGZooError(f"--gpus-per-run must be a positive integer, got {gpus_per_run!r}")
    check_runs_per_gpu(runs_per_gpu, launcher)
    prefix = launch_prefix or DEFAULT_LAUNCH_PREFIX
    if launcher == "subprocess" and "recipes/train.py" in prefix and not Path("recipes/train.py").exists():
        raise DGZooError(
            "recipes/train.py is not in the current directory; run the sweep from a dgzoo checkout or "
            "pass --launch-prefix 'accelerate launch -m dgzoo.cli train'"
        )
    slots = (
        pack_slots(device_slots(list(gpus) if gpus is not None else visible_gpus(), gpus_per_run), runs_per_gpu)
        if launcher == "local-gpus"
        else []
    )
    options = {**spec.slurm, **check_slurm_options(dict(slurm or {}), "the slurm flags")}
    if launcher == "slurm":
        if cluster not in SLURM_CLUSTERS:
            raise DGZooError(
                f"--slurm-cluster '{cluster}' is not one of {', '.join(SLURM_CLUSTERS)}"
                f"{suggest(cluster, SLURM_CLUSTERS)}"
            )
        if cluster == "slurm":  # before anything is written: the time limit, and GPUs the partition has
            check_time(options.get("time", DEFAULT_SLURM_TIME_MIN))
            options["gpus"] = resolve_gpus(options, gpus_per_run, log)
        executor = _executor(Path(spec.output_dir), options, cluster, gpus_per_run)  # no Slurm here: fail first
    runs = add_more_trials(spec, more_trials, selection) if more_trials else expand_all(spec)
    runs = plan(runs)
    write_manifest(spec, runs, prefix)
    pending = [r for r in runs if r.status != "done"]
    outcome = SweepOutcome(runs)
    # Printed commands form a shell script: status lines become comments.
    note = (lambda text: log(f"# {text}")) if launcher == "print" else log
    note(f"sweep {spec.output_dir}: {status_line(runs)}")
    purpose = f"dgzoo sweep {spec.output_dir} ({launcher})"
    if launcher == "print":
        for run in pending:
            if run.status == "running":
                note(describe_running(run))
                continue
            command = train_command(run.config, prefix)
            outcome.commands.append(command)
            log(command)
        return outcome
    if launcher in ("local", "subprocess"):
        _sequential(pending, launcher, prefix, fail_fast, log, max_retries, train_fn, purpose, outcome)
    elif launcher == "local-gpus":
        _pool(
            Path(spec.output_dir), pending, slots, launch_prefix, fail_fast, log, max_retries, purpose, outcome, poll_s
        )
    else:
        waiting = cluster != "slurm" if wait is None else wait  # a local "cluster" has no queue to return to
        _submit(
            spec,
            pending,
            executor,
            cluster,
            gpus_per_run,
            max_retries,
            log,
            waiting,
            train_fn,
            purpose,
            outcome,
            poll_s,
            runs_per_gpu,
        )
        if not waiting:
            return outcome
    log(
        f"sweep {spec.output_dir}: {status_line(plan(runs))}"
        + (f"; {len(outcome.failed)} failed (rerun the sweep to retry them)" if outcome.failed else "")
    )
    if spec.soup:  # soups of the cells whose runs are all finished (torch loads only now: `dgzoo report` stays fast)
        from .soup import build_sweep_soups

        build_sweep_soups(spec, runs, log)
    log(f"tables: dgzoo report {spec.output_dir}")
    return outcome


# ---------------------------------------------------------------------- claims


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


def _task_failure(error: BaseException) -> str:
    """The one line a failed Slurm task records: dgzoo's own message, submitit's reason for not requeueing, or the
    exception (whose traceback goes to the job's log)."""
    if type(error).__name__ == "UncompletedJobError":
        return (
            f"{error} (submitit requeues a job that runs out of time at most --slurm-max-requeues times, "
            f"default {DEFAULT_MAX_REQUEUES}; raise it or --slurm-time, then rerun the sweep to resume)"
        )
    return _failure_reason(error)


def _failure_reason(error: BaseException) -> str:
    if isinstance(error, subprocess.CalledProcessError):
        return f"exit status {error.returncode}"
    if not isinstance(error, DGZooError):  # a DGZooError already said what went wrong
        traceback.print_exc(file=sys.stderr)
    return repr(error) if not isinstance(error, DGZooError) else str(error)


# ---------------------------------------------------------------------- one after another


def _sequential(
    pending: list[SweepRun],
    launcher: str,
    prefix: str,
    fail_fast: bool,
    log: Callable[[str], None],
    max_retries: int,
    train_fn: Callable[[Any], Any] | None,
    purpose: str,
    outcome: SweepOutcome,
) -> None:
    """``local`` and ``subprocess``: each pending run in turn, claimed, re-planned, retried up to ``max_retries``."""
    for index, run in enumerate(pending, 1):
        for attempt in range(max_retries + 1):
            stack, status = acquire(run, purpose)
            if status == "done":
                log(f"[{index}/{len(pending)}] finished elsewhere meanwhile: {run.describe()}")
                break
            if status == "running":
                log(f"[{index}/{len(pending)}] {describe_running(run)}")
                outcome.elsewhere.append(run)
                break
            retry = f", retry {attempt}/{max_retries}" if attempt else ""
            log(f"[{index}/{len(pending)}] {run.describe()} ({status}{retry}) -> {run.output_dir}")
            with stack:
                try:
                    if launcher == "local":
                        if train_fn is None:
                            from ..training.engine import train as engine_train

                            train_fn = engine_train
                        train_fn(run.config)
                    else:
                        code = subprocess.run(shlex.split(train_command(run.config, prefix))).returncode
                        if code == EXIT_CLAIMED:
                            raise RunDirClaimed(f"{run.output_dir} is in use by another process")
                        if code:
                            raise subprocess.CalledProcessError(code, prefix)
                    outcome.trained.append(run)
                    break
                except RunDirClaimed as e:
                    log(f"running elsewhere: {run.describe()}: {e}")
                    outcome.elsewhere.append(run)
                    break
                except Interrupted:  # Ctrl-C stops the sweep, it is not a failure of this run
                    raise
                except Exception as e:  # one failing run must not cost the others
                    if fail_fast:
                        raise
                    reason = _failure_reason(e)
                    if attempt < max_retries:
                        log(f"run failed: {run.describe()}: {reason}; retrying ({attempt + 1}/{max_retries})")
                        continue
                    outcome.failed.append((run, reason))
                    log(f"run failed: {run.describe()}: {reason}")


# ---------------------------------------------------------------------- a pool over local GPUs


def visible_gpus() -> list[str]:
    """The GPUs this process may use: ``CUDA_VISIBLE_DEVICES`` if set, else every device torch sees."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


def device_slots(gpus: Sequence[str], gpus_per_run: int) -> list[tuple[str, ...]]:
    """Split ``gpus`` into slots of ``gpus_per_run`` devices (left-over devices stay idle)."""
    if not gpus:
        raise DGZooError(
            "--launcher local-gpus found no GPU (CUDA_VISIBLE_DEVICES is empty and torch sees none); "
            "name them with --gpus 0,1,... or use --launcher local"
        )
    if gpus_per_run > len(gpus):
        raise DGZooError(
            f"--gpus-per-run {gpus_per_run} needs at least that many GPUs; {len(gpus)} visible ({','.join(gpus)})"
        )
    return [tuple(gpus[i : i + gpus_per_run]) for i in range(0, len(gpus) - gpus_per_run + 1, gpus_per_run)]


def check_runs_per_gpu(runs_per_gpu: Any, launcher: str) -> None:
    """``--runs-per-gpu`` is a positive integer, and packs runs only where runs get devices (local-gpus, slurm)."""
    if isinstance(runs_per_gpu, bool) or not isinstance(runs_per_gpu, int) or runs_per_gpu < 1:
        raise DGZooError(f"--runs-per-gpu must be a positive integer, got {runs_per_gpu!r}")
    if runs_per_gpu > 1 and launcher not in ("local-gpus", "slurm"):
        raise DGZooError(
            f"--runs-per-gpu packs runs onto the GPUs of --launcher local-gpus or slurm, not "
            f"{launcher}; use one of those, or drop --runs-per-gpu"
        )


def pack_slots(slots: list[tuple[str, ...]], runs_per_gpu: int) -> list[tuple[str, ...]]:
    """Every device slot repeated ``runs_per_gpu`` times: that many runs (each its own process) share its GPUs.

    Small runs (DomainBed's 32 images per domain) leave most of a large GPU idle; packing them fills it. The copies
    of a slot are adjacent, so the slot index (and with it the rendezvous port of multi-GPU runs) differs for each.
    """
    return [devices for devices in slots for _ in range(runs_per_gpu)]


def pool_prefix(gpus_per_run: int, slot: int) -> str:
    """The command that trains one run on a slot: ``dgzoo train`` in a fresh Python, or for several GPUs per run
    ``accelerate launch`` with one process per GPU (each slot its own rendezvous port)."""
    python = shlex.quote(sys.executable)
    if gpus_per_run == 1:
        return f"{python} -m dgzoo.cli train"
    return (
        f"{python} -m accelerate.commands.launch --multi_gpu --num_processes {gpus_per_run} "
        f"--main_process_port {MAIN_PROCESS_PORT + slot} -m dgzoo.cli train"
    )


@dataclass
class _Slot:
    run: SweepRun
    process: subprocess.Popen
    claim: contextlib.ExitStack
    log_file: IO[str]
    log_path: Path


def _pool(
    root: Path,
    pending: list[SweepRun],
    slots: list[tuple[str, ...]],
    launch_prefix: str | None,
    fail_fast: bool,
    log: Callable[[str], None],
    max_retries: int,
    purpose: str,
    outcome: SweepOutcome,
    poll_s: float,
) -> None:
    """``local-gpus``: keep every device slot busy with one run until none is left."""
    queue = collections.deque(pending)
    attempts: collections.Counter[str] = collections.Counter()
    busy: dict[int, _Slot] = {}
    logs = root / LAUNCH_LOGS
    total, last = len(pending), None
    log(f"local-gpus: {len(slots)} slot(s): " + "; ".join(f"GPU {','.join(s)}" for s in slots))
    try:
        while queue or busy:
            for index, devices in enumerate(slots):
                while index not in busy and queue:
                    run = queue.popleft()
                    try:
                        claim, status = acquire(run, purpose)
                    except DGZooError as e:
                        outcome.failed.append((run, str(e)))
                        log(f"run failed: {run.describe()}: {e}")
                        continue
                    if status == "done":
                        log(f"finished elsewhere meanwhile: {run.describe()}")
                        continue
                    if status == "running":
                        log(describe_running(run))
                        outcome.elsewhere.append(run)
                        continue
                    busy[index] = _start(run, status, claim, devices, index, launch_prefix, logs, log)
            for index, slot in list(busy.items()):
                code = slot.process.poll()
                if code is None:
                    continue
                del busy[index]
                slot.log_file.close()
                slot.claim.close()
                run = slot.run
                if code == 0:
                    outcome.trained.append(run)
                elif code == EXIT_CLAIMED:
                    log(describe_running(run))
                    outcome.elsewhere.append(run)
                elif attempts[str(run.output_dir)] < max_retries:
                    attempts[str(run.output_dir)] += 1
                    log(
                        f"run failed: {run.describe()}: exit status {code} (log: {slot.log_path}); retrying "
                        f"({attempts[str(run.output_dir)]}/{max_retries})"
                    )
                    queue.append(run)
                else:
                    outcome.failed.append((run, f"exit status {code}; log: {slot.log_path}"))
                    log(f"run failed: {run.describe()}: exit status {code}; log: {slot.log_path}")
                    if fail_fast:
                        queue.clear()  # start nothing new; the runs in flight finish
            counts = (len(outcome.trained), len(busy), len(outcome.failed), len(queue))
            if counts != last:
                last = counts
                log(
                    f"progress: {counts[0]} done, {counts[1]} running, {counts[2]} failed, {counts[3]} queued "
                    f"(of {total})"
                )
            if busy:
                time.sleep(poll_s)
    finally:
        for slot in busy.values():  # Ctrl-C or an error here: stop the children, who leave resumable runs
            with contextlib.suppress(ProcessLookupError):
                slot.process.send_signal(signal.SIGINT)
        for slot in busy.values():
            try:
                slot.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                slot.process.kill()
            slot.log_file.close()
            slot.claim.close()


def _start(
    run: SweepRun,
    status: str,
    claim: contextlib.ExitStack,
    devices: tuple[str, ...],
    slot: int,
    launch_prefix: str | None,
    logs: Path,
    log: Callable[[str], None],
) -> _Slot:
    command = train_command(run.config, launch_prefix or pool_prefix(len(devices), slot))
    logs.mkdir(parents=True, exist_ok=True)
    log_path = logs / f"{run.output_dir.name}.log"
    log_file = open(log_path, "a")
    visible = ",".join(devices)
    log_file.write(
        f"# {datetime.now(timezone.utc).isoformat(timespec='seconds')} CUDA_VISIBLE_DEVICES={visible} {command}\n"
    )
    log_file.flush()
    try:
        process = subprocess.Popen(
            shlex.split(command),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, "CUDA_VISIBLE_DEVICES": visible},
        )
    except BaseException:
        log_file.close()
        claim.close()
        raise
    log(f"start {run.describe()} ({status}) on GPU {visible} -> {run.output_dir} (log: {log_path})")
    return _Slot(run, process, claim, log_file, log_path)


# ---------------------------------------------------------------------- Slurm through submitit


def import_submitit() -> Any:
    """submitit, or a one-line error saying how to install it (it is an optional dependency)."""
    try:
        import submitit
    except ImportError:
        raise DGZooError(
            "--launcher slurm needs submitit, which is not installed: pip install 'dgzoo[slurm]'"
        ) from None
    return submitit


@dataclass
class SlurmTask:
    """One run of a sweep as a task of the job array, called on the node by submitit.

    It claims the run and reads its status there (the run may have finished or be held by another job since it was
    submitted), trains it, tries again up to ``max_retries`` times, and is *checkpointable*: on preemption or
    time-out submitit calls :meth:`checkpoint` and requeues the same task, which then resumes the run from its
    last checkpoint, since the run directory says it has one.
    """

    purpose: str
    max_retries: int = 0
    gpus_per_run: int = 1
    train_fn: Callable[[Any], Any] | None = None
    own_process: bool = False  # train in a child process even on one GPU (runs packed into one job)
    slot: int = 0  # this run's place in its job (multi-GPU runs: the rendezvous port)
    launch_prefix: str | None = None  # the child's command (default: pool_prefix)

    def __call__(self, run: SweepRun) -> str:
        job = os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID") or str(os.getpid())
        purpose = f"{self.purpose} (job {job})"
        # A requeued task may start on another node before the claims of its own previous attempt went stale;
        # a holder on another host cannot be checked by pid, so wait for its heartbeat to stop (or to prove it live).
        deadline = time.time() + 1.5 * CLAIM_TTL_S
        for attempt in range(self.max_retries + 1):
            # Every attempt claims the run and reads its status again, as the local launchers do: a run that
            # another process finished (or holds) while this one failed is not trained a second time.
            while True:
                try:
                    claim, status = acquire(run, purpose)
                except DGZooError as e:  # e.g. the directory holds a run trained with other settings
                    write_failure(run.output_dir, str(e), job)
                    raise
                holder = holder_of(run) or {}
                if status == "running" and holder.get("host") != socket.gethostname() and time.time() < deadline:
                    time.sleep(5)
                    continue
                break
            if status == "done":
                return "done"
            if status == "running":
                print(describe_running(run), flush=True)
                return "running elsewhere"
            with claim:
                try:
                    self._train(run)
                    (run.output_dir / FAILURE_FILE).unlink(missing_ok=True)  # an earlier failure is history
                    return "trained"
                except RunDirClaimed as e:
                    print(f"running elsewhere: {run.describe()}: {e}", flush=True)
                    return "running elsewhere"
                except Interrupted:  # cancelled: not a failure to retry
                    raise
                except Exception as e:
                    # submitit's "not requeued" (time-outs exhausted) arrives here from its signal handler
                    final = type(e).__name__ == "UncompletedJobError"
                    if attempt == self.max_retries or final:
                        write_failure(run.output_dir, _task_failure(e), job)  # for --status and --wait
                        raise
                    traceback.print_exc()
                    print(f"retrying {run.describe()} ({attempt + 1}/{self.max_retries})", flush=True)
        return "trained"

    def _train(self, run: SweepRun) -> None:
        if self.gpus_per_run == 1 and not self.own_process:
            train = self.train_fn
            if train is None:
                from ..training.engine import train as engine_train

                train = engine_train
            train(run.config)
            return
        prefix = self.launch_prefix or pool_prefix(self.gpus_per_run, self.slot)
        code = subprocess.run(shlex.split(train_command(run.config, prefix))).returncode
        if code == EXIT_CLAIMED:
            raise RunDirClaimed(f"{run.output_dir} is in use by another process")
        if code:
            raise subprocess.CalledProcessError(code, "accelerate launch")

    def checkpoint(self, run: SweepRun) -> Any:
        """Requeue this task as it is: the run directory's checkpoints carry the state, the task none."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, run)


@dataclass
class PackedSlurmTask:
    """Several runs of a sweep as one task of the job array (``--runs-per-gpu N``): they share the job's GPUs, each
    trained by :class:`SlurmTask` in a process of its own, concurrently.

    Each run is claimed, retried and reported on its own, as in an unpacked job; a run that fails does not stop
    the others. On preemption or time-out submitit requeues the whole task, and each run resumes from its own last
    checkpoint (or is skipped, if it finished).
    """

    task: SlurmTask

    def __call__(self, runs: list[SweepRun]) -> list[str]:
        """Train ``runs`` side by side; return each one's outcome: trained, done, running elsewhere, or
        ``failed: <reason>``."""
        outcomes = ["failed: did not start"] * len(runs)

        def train_one(index: int, run: SweepRun) -> None:
            task = dataclasses.replace(self.task, own_process=True, slot=index)
            try:
                outcomes[index] = task(run)
            except BaseException as e:  # this run's failure, reported with it; the others go on
                reason = str(e).strip().splitlines()
                outcomes[index] = f"failed: {reason[-1] if reason else type(e).__name__}"
                print(f"run failed: {run.describe()}: {outcomes[index][8:]}", flush=True)

        threads = [threading.Thread(target=train_one, args=(i, run)) for i, run in enumerate(runs)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return outcomes

    def checkpoint(self, runs: list[SweepRun]) -> Any:
        """Requeue the task as it is: each run's directory carries its state."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, runs)


@dataclass
class PackedRun:
    """One run of a packed job, shaped like a submitit job for :func:`_submit`: ``result()`` is the run's own."""

    job: Any
    index: int

    @property
    def job_id(self) -> str:
        return self.job.job_id

    @property
    def paths(self) -> Any:
        return self.job.paths

    def done(self) -> bool:
        return self.job.done()

    def result(self) -> str:
        outcome = self.job.result()[self.index]
        if outcome.startswith("failed: "):
            raise RuntimeError(outcome[len("failed: ") :])
        return outcome


def map_runs(executor: Any, task: SlurmTask, runs: list[SweepRun], runs_per_gpu: int) -> list[Any]:
    """Submit ``runs`` as one job array: one run per task, or with ``runs_per_gpu`` > 1 that many runs per task
    (:class:`PackedSlurmTask`); returns one job-like handle per run, in order."""
    if runs_per_gpu == 1:
        return list(executor.map_array(task, runs))
    groups = [runs[i : i + runs_per_gpu] for i in range(0, len(runs), runs_per_gpu)]
    jobs = executor.map_array(PackedSlurmTask(task), groups)
    return [PackedRun(job, i) for job, group in zip(jobs, groups) for i in range(len(group))]


def _executor(root: Path, options: dict[str, Any], cluster: str, gpus_per_run: int) -> Any:
    submitit = import_submitit()
    try:
        executor = submitit.AutoExecutor(
            folder=root / SLURM_FOLDER,
            cluster=cluster,
            slurm_max_num_timeout=options.get("max_requeues", DEFAULT_MAX_REQUEUES),
        )
    except RuntimeError as e:  # no srun/sbatch on this machine
        raise DGZooError(
            f"cannot submit to Slurm here ({e}); run on the cluster's login node, or pass "
            f"--slurm-cluster local to run the jobs on this machine"
        ) from None
    params: dict[str, Any] = {
        "name": f"dgzoo-{root.name}",
        "timeout_min": options.get("time", DEFAULT_SLURM_TIME_MIN),
        "gpus_per_node": options.get("gpus", gpus_per_run),
        "tasks_per_node": 1,
        "nodes": 1,
    }
    if "cpus" in options:
        params["cpus_per_task"] = options["cpus"]
    if "mem" in options:
        params["mem_gb"] = options["mem"]
    for key in ("partition", "account", "array_parallelism"):
        if key in options:
            params[f"slurm_{key}"] = options[key]
    executor.update_parameters(**params)
    return executor


def _submit(
    spec: SweepSpec,
    pending: list[SweepRun],
    executor: Any,
    cluster: str,
    gpus_per_run: int,
    max_retries: int,
    log: Callable[[str], None],
    wait: bool,
    train_fn: Callable[[Any], Any] | None,
    purpose: str,
    outcome: SweepOutcome,
    poll_s: float,
    runs_per_gpu: int = 1,
) -> None:
    """``slurm``: submit the pending runs that no live process holds and no live job will train, as one array."""
    root = Path(spec.output_dir)
    notes: list[str] = []
    queued = {
        name: job for name, job in latest_jobs(root, notes).items() if job["state"] in (*LIVE_SLURM_STATES, UNKNOWN)
    }  # UNKNOWN: possibly queued, never submitted twice
    for note in notes:
        log(f"slurm: {note}")
    todo = []
    for run in pending:
        if run.status == "running":
            log(describe_running(run))
            outcome.elsewhere.append(run)
        elif run.output_dir.name in queued:
            job = queued[run.output_dir.name]
            log(
                f"{'possibly queued' if job['state'] == UNKNOWN else 'queued elsewhere'}: {run.describe()} "
                f"(job {job['job_id']}, {job['state']})"
            )
            outcome.elsewhere.append(run)
        else:
            todo.append(run)
    if not todo:
        log("slurm: nothing to submit")
        return
    task = SlurmTask(purpose, max_retries, gpus_per_run, train_fn)
    said = io.StringIO()  # submitit prints sbatch's stderr when it refuses: that becomes part of one line instead
    try:
        with contextlib.redirect_stderr(said):
            jobs = map_runs(executor, task, todo, runs_per_gpu)
    except import_submitit().core.utils.FailedJobError as e:  # sbatch refused: its words and the flag to change
        raise DGZooError(sbatch_refusal(str(e))) from None
    except BaseException:
        sys.stderr.write(said.getvalue())
        raise
    sys.stderr.write(said.getvalue())
    outcome.jobs = {run.output_dir.name: job.job_id for run, job in zip(todo, jobs)}
    path = root / SLURM_JOBS
    record = read_json(path) if path.exists() else {"submissions": []}
    record["submissions"].append(
        {
            "submitted": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "cluster": cluster,
            "folder": str(root / SLURM_FOLDER),
            "jobs": outcome.jobs,
        }
    )
    write_json(path, record)
    array = jobs[0].job_id.split("_")[0] if cluster == "slurm" else ", ".join(dict.fromkeys(j.job_id for j in jobs))
    log(
        f"slurm: submitted {len(jobs)} run(s) as job array {array} ({cluster}); logs in {root / SLURM_FOLDER}; "
        f"states: dgzoo sweep SPEC --status"
    )
    if not wait:
        return
    states: dict[str, str] = {}
    last = None
    ended: dict[str, str] = {}  # slurm: jobs that left the queue without a result (killed), by squeue/sacct
    checked = time.monotonic()
    while len(states) < len(jobs):
        if cluster == "slurm" and time.monotonic() - checked > ENDED_CHECK_S:
            checked = time.monotonic()
            ended = {
                job: state for job, state in job_states([j.job_id for j in jobs])[0].items() if state in FAILED_STATES
            }
        for run, job in zip(todo, jobs):
            name = run.output_dir.name
            if name in states:
                continue
            # On Slurm, a result file or a state that says the job is over: submitit's done() asks sacct, which
            # (without accounting) never answers and prints warnings on every call.
            finished = job.paths.result_pickle.exists() if cluster == "slurm" else job.done()
            if not (finished or job.job_id in ended):
                continue
            try:
                if not finished:
                    raise RuntimeError(f"the job ended ({ended[job.job_id]}) without a result")
                states[name] = job.result()
            except Exception as e:  # the task raised, or the job died: one line, the log holds the rest
                states[name] = "failed"
                lines = str(e).strip().splitlines()
                reason = read_failure(run.output_dir) or f"job {job.job_id}: {lines[-1] if lines else type(e).__name__}"
                outcome.failed.append((run, reason))
                log(f"run failed: {run.describe()}: {reason}; log: {job.paths.stderr}")
        trained = sum(s == "trained" for s in states.values())
        counts = (trained, len(jobs) - len(states), sum(s == "failed" for s in states.values()))
        if counts != last:
            last = counts
            log(f"progress: {counts[0]} done, {counts[1]} running or queued, {counts[2]} failed (of {len(jobs)})")
        if len(states) < len(jobs):
            time.sleep(poll_s)
    for run in todo:
        state = states[run.output_dir.name]
        if state == "trained":
            outcome.trained.append(run)
        elif state == "running elsewhere":
            outcome.elsewhere.append(run)


def latest_jobs(root: Path, notes: list[str] | None = None) -> dict[str, dict[str, str]]:
    """Per run directory name, the last job submitted for it: ``{"job_id", "cluster", "state"}``. ``notes``
    receives one line when Slurm's accounting could not give every state (:func:`.slurm.job_states`)."""
    path = Path(root) / SLURM_JOBS
    if not path.exists():
        return {}
    latest: dict[str, dict[str, str]] = {}
    for submission in read_json(path).get("submissions", []):
        for name, job_id in submission["jobs"].items():
            latest[name] = {"job_id": job_id, "cluster": submission["cluster"], "folder": submission["folder"]}
    on_slurm = [job["job_id"] for job in latest.values() if job["cluster"] == "slurm"]
    if on_slurm:  # one sacct (and squeue) call for all of them, one note on what accounting could not say
        import_submitit()
        slurm_states, note = job_states(on_slurm)
        if note and notes is not None:
            notes.append(note)
    for job in latest.values():
        job["state"] = (
            slurm_states[job["job_id"]]
            if job["cluster"] == "slurm"
            else job_state(job["cluster"], job["folder"], job["job_id"])
        )
    return latest


def job_state(cluster: str, folder: str, job_id: str) -> str:
    """A job's state: Slurm's (``sacct``, through submitit) on a cluster; on ``local``/``debug``, COMPLETED or
    FAILED from the result submitit wrote, RUNNING while its process lives, else INTERRUPTED."""
    submitit = import_submitit()
    if cluster == "slurm":
        try:
            return str(submitit.SlurmJob(folder=folder, job_id=job_id).state).split()[0]
        except Exception as e:  # sacct unavailable: say so in the state column rather than fail the listing
            return f"UNKNOWN ({type(e).__name__})"
    from submitit.core.utils import JobPaths

    result = JobPaths(folder, job_id=job_id, task_id=0).result_pickle
    if result.exists():
        with open(result, "rb") as f:
            return "COMPLETED" if pickle.load(f)[0] == "success" else "FAILED"
    with contextlib.suppress(ValueError, ProcessLookupError, PermissionError):
        os.kill(int(job_id), 0)  # a local job's id is its controller's pid
        return "RUNNING"
    return "INTERRUPTED"


def sweep_status(spec: SweepSpec, log: Callable[[str], None] = print) -> list[SweepRun]:
    """``dgzoo sweep SPEC --status``: every run's status from its directory and, for submitted runs, its job's."""
    runs = plan(expand_all(spec))
    notes: list[str] = []
    jobs = latest_jobs(Path(spec.output_dir), notes)
    log(f"sweep {spec.output_dir}: {status_line(runs)}")
    counts = collections.Counter(job["state"] for job in jobs.values())
    if jobs:
        log("jobs: " + ", ".join(f"{n} {state}" for state, n in sorted(counts.items())))
    for note in notes:  # once, not per job: why some states did not come from accounting
        log(note)
    for run in runs:
        job = jobs.get(run.output_dir.name)
        state = f"job {job['job_id']} {job['state']}" if job else "-"
        log(f"{run.status:8} {state:28} {run.output_dir}")
        if run.status != "done" and job is not None and _failed(run, job):
            log(f"{'':9}{_failure_line(run, job)}")
    return runs


def _failed(run: SweepRun, job: dict[str, str]) -> bool:
    """Whether the last job of an unfinished run failed: Slurm says so, or its task wrote a reason (a live job or
    a live holder is not a failure, whatever an earlier attempt wrote)."""
    if run.status == "running" or job["state"] in (*LIVE_SLURM_STATES, UNKNOWN):
        return False
    return job["state"] in FAILED_STATES or (run.output_dir / FAILURE_FILE).exists()


def _failure_line(run: SweepRun, job: dict[str, str]) -> str:
    """Why the last job of ``run`` failed: the line its task wrote, else where its log is."""
    reason = read_failure(run.output_dir)
    if reason:
        return f"failed: {reason}"
    from submitit.core.utils import JobPaths

    log_path = JobPaths(job["folder"], job_id=job["job_id"], task_id=0).stderr
    return f"failed: job {job['job_id']} {job['state']} before the run could say why; log: {log_path}"
