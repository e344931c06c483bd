"""``slurm``: one submitit job array per invocation.

Each array task re-reads its run's status on the node, trains it in the job, and when Slurm preempts it or its time
runs out, submitit calls :meth:`SlurmTask.checkpoint` and requeues it: the requeued task resumes from the run's last
checkpoint (``--resume``). ``slurm_jobs.json`` (:mod:`.jobs`) records which job trains which run, for ``dgzoo sweep
--status`` and so a rerun does not submit a queued run again. ``--runs-per-gpu N`` packs N runs into each job, each
run still its own process (:class:`PackedSlurmTask`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import shlex
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ...errors import DGZooError, suggest
from ...run.claim import CLAIM_TTL_S, RunDirClaimed
from ...run.rundir import read_json, write_json
from ..slurm import (
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
from ..slurm_fit import check_request, stuck_jobs
from ..spec import check_slurm_options
from ..sweep import SweepRun, SweepSpec, describe_running, holder_of, train_command
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
from .jobs import LIVE_SLURM_STATES, SLURM_FOLDER, SLURM_JOBS, import_submitit, latest_jobs
from .pool import pool_prefix

SLURM_CLUSTERS = ("slurm", "local", "debug")  # submitit's: a real cluster, or this machine (to try a sweep)
DEFAULT_SLURM_TIME_MIN = 24 * 60
ENDED_CHECK_S = 15.0  # --wait on Slurm: how often to look for jobs that ended without a result


@register_launcher("slurm")
def job_array(spec: SweepSpec, options: LaunchOptions) -> Launch:
    """``slurm``: the pending runs no live process holds and no live job will train, as one job array."""
    resources = {**spec.slurm, **check_slurm_options(dict(options.slurm or {}), "the slurm flags")}
    cluster = options.cluster
    if cluster not in SLURM_CLUSTERS:
        raise DGZooError(
            f"--slurm-cluster '{cluster}' is not one of {', '.join(SLURM_CLUSTERS)}{suggest(cluster, SLURM_CLUSTERS)}"
        )
    if cluster == "slurm":  # before anything is written: the time limit, and GPUs the partition has
        check_time(resources.get("time", DEFAULT_SLURM_TIME_MIN))
        resources["gpus"] = resolve_gpus(resources, options.gpus_per_run, options.log)
        check_request(resources, options.runs_per_gpu)  # a job no node can run would pend for ever
    executor = _executor(Path(spec.output_dir), resources, cluster, options.gpus_per_run)  # no Slurm here: fail first
    waiting = cluster != "slurm" if options.wait is None else options.wait  # a local "cluster" has no queue

    def launch(pending: list[SweepRun], outcome: SweepOutcome) -> bool:
        _submit(spec, options, executor, waiting, pending, outcome)
        return waiting

    return launch


def _task_failure(error: BaseException) -> str:
    """The one line a failed Slurm task records: dgzoo's own message, submitit's reason for not requeueing, or the
    exception (whose traceback goes to the job's log)."""
    if type(error).__name__ == "UncompletedJobError":
        return (
            f"{error} (submitit requeues a job that runs out of time at most --slurm-max-requeues times, "
            f"default {DEFAULT_MAX_REQUEUES}; raise it or --slurm-time, then rerun the sweep to resume)"
        )
    return failure_reason(error)


@dataclass
class _TaskRun(Attempts):
    """A run in a Slurm task: it waits for a holder on another host, says what it does in the job's log, and
    records a failure in ``failure.txt`` (for ``--status`` and ``--wait``) before failing the task."""

    job: str = ""
    deadline: float = 0.0  # until when a holder on another host is waited for

    def acquire(self) -> tuple[contextlib.ExitStack, str]:
        # A requeued task may start on another node before the claims of its own previous attempt went stale;
        # a holder on another host cannot be checked by pid, so wait for its heartbeat to stop (or to prove it live).
        while True:
            try:
                claim, status = super().acquire()
            except DGZooError as e:  # e.g. the directory holds a run trained with other settings
                write_failure(self.run.output_dir, str(e), self.job)
                raise
            holder = holder_of(self.run) or {}
            if status == "running" and holder.get("host") != socket.gethostname() and time.time() < self.deadline:
                time.sleep(5)
                continue
            return claim, status

    def on_running(self) -> None:
        print(describe_running(self.run), flush=True)

    def on_trained(self) -> None:
        (self.run.output_dir / FAILURE_FILE).unlink(missing_ok=True)  # an earlier failure is history

    def on_elsewhere(self, error: RunDirClaimed) -> None:
        print(f"running elsewhere: {self.run.describe()}: {error}", flush=True)

    def retryable(self, error: BaseException) -> bool:
        # submitit's "not requeued" (time-outs exhausted) arrives from its signal handler: the job is over
        return type(error).__name__ != "UncompletedJobError"

    def on_retry(self, error: Exception) -> None:
        traceback.print_exception(type(error), error, error.__traceback__)
        print(f"retrying {self.run.describe()} ({self.attempt}/{self.max_retries})", flush=True)

    def on_failed(self, error: Exception) -> None:
        write_failure(self.run.output_dir, _task_failure(error), self.job)
        raise error


@dataclass
class SlurmTask:
    """One run of a sweep as a task of the job array, called on the node by submitit.

    It claims the run and reads its status there (the run may have finished or be held by another job since it was
    submitted), trains it, tries again up to ``max_retries`` times (:class:`.base.Attempts`), and is
    *checkpointable*: on preemption or time-out submitit calls :meth:`checkpoint` and requeues the same task, which
    then resumes the run from its last checkpoint, since the run directory says it has one.
    """

    purpose: str
    max_retries: int = 0
    gpus_per_run: int = 1
    train_fn: Callable[[Any], Any] | None = None
    own_process: bool = False  # train in a child process even on one GPU (runs packed into one job)
    slot: int = 0  # this run's place in its job (multi-GPU runs: the rendezvous port)
    launch_prefix: str | None = None  # the child's command (default: pool_prefix)

    def __call__(self, run: SweepRun) -> str:
        """Train ``run``; return trained, done or running elsewhere (a failure raises, for submitit)."""
        job = os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID") or str(os.getpid())
        attempts = _TaskRun(
            run, f"{self.purpose} (job {job})", self.max_retries, job=job, deadline=time.time() + 1.5 * CLAIM_TTL_S
        )
        return attempts.train(self._train)

    def _train(self, run: SweepRun) -> None:
        if self.gpus_per_run == 1 and not self.own_process:
            engine_train(self.train_fn)(run.config)
            return
        prefix = self.launch_prefix or pool_prefix(self.gpus_per_run, self.slot)
        code = subprocess.run(shlex.split(train_command(run.config, prefix))).returncode
        error = exit_error(code, run, "accelerate launch")
        if error is not None:
            raise error

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
    options: LaunchOptions,
    executor: Any,
    wait: bool,
    pending: list[SweepRun],
    outcome: SweepOutcome,
) -> None:
    """``slurm``: submit the pending runs that no live process holds and no live job will train, as one array."""
    root, cluster, log = Path(spec.output_dir), options.cluster, options.log
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
                f"(job {job['job_id']}, {job['state']})" + (f"; stuck: {job['stuck']}" if job.get("stuck") else "")
            )
            outcome.elsewhere.append(run)
        else:
            todo.append(run)
    if not todo:
        log("slurm: nothing to submit")
        return
    task = SlurmTask(purpose(spec, options), options.max_retries, options.gpus_per_run, options.train_fn)
    said = io.StringIO()  # submitit prints sbatch's stderr when it refuses: that becomes part of one line instead
    try:
        with contextlib.redirect_stderr(said):
            jobs = map_runs(executor, task, todo, options.runs_per_gpu)
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
    stuck: dict[str, str] = {}  # slurm: pending jobs no node can run, with the line saying why
    checked = time.monotonic()
    while len(states) < len(jobs):
        if cluster == "slurm" and time.monotonic() - checked > ENDED_CHECK_S:
            checked = time.monotonic()
            now = job_states([j.job_id for j in jobs])[0]
            ended = {job: state for job, state in now.items() if state in FAILED_STATES}
            stuck = stuck_jobs([job for job, state in now.items() if state == "PENDING"])
        for run, job in zip(todo, jobs):
            name = run.output_dir.name
            if name in states:
                continue
            if job.job_id in stuck:  # it would never start: --wait says why and stops waiting for it
                states[name] = "failed"
                outcome.failed.append((run, stuck[job.job_id]))
                log(f"run stuck: {run.describe()}: {stuck[job.job_id]}")
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
            time.sleep(options.poll_s)
    for run in todo:
        state = states[run.output_dir.name]
        if state == "trained":
            outcome.trained.append(run)
        elif state == "running elsewhere":
            outcome.elsewhere.append(run)
