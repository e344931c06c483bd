"""What the Slurm launcher asks the cluster, and how it turns the cluster's answers into one line.

- GPUs per job default to what the partition offers: ``sinfo`` lists its generic resources (GRES); a partition
  without ``gpu`` GRES gets jobs asking for no GPU, since sbatch refuses any ``--gpus-per-node`` there.
- A refusal of ``sbatch`` (submitit raises its ``FailedJobError`` with sbatch's stderr) becomes one line naming the
  flag to change.
- Job states come from ``sacct``; a cluster without accounting (``sacct`` lists nothing) is answered by
  ``squeue --states=all``, which knows queued and recently ended jobs. A job neither lists has left the queue
  (``ENDED``); one whose state nobody can tell is ``UNKNOWN`` and counts as possibly queued, so a rerun never
  submits it again.
- The time limit must leave room before Slurm's warning signal (``USR2``, :data:`SIGNAL_DELAY_S` before the end),
  which submitit turns into a checkpoint and a requeue; submitit requeues a timed-out job at most
  :data:`DEFAULT_MAX_REQUEUES` times (its ``max_num_timeout``), a preempted one without limit.
- A task that fails writes its reason, one line, to ``failure.txt`` in its run directory, for ``--status`` and
  ``--wait``.
"""

from __future__ import annotations

import math
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..errors import DGZooError
from ..run.rundir import atomic_write_text

SIGNAL_DELAY_S = 90  # submitit's default: --signal=USR2@90
MIN_WORK_S = 120  # what a task needs between its start and the signal: start Python, resume, save a checkpoint
MIN_TIME_MIN = math.ceil((SIGNAL_DELAY_S + MIN_WORK_S) / 60)
DEFAULT_MAX_REQUEUES = 3  # submitit's max_num_timeout (submitit/core/core.py, Executor.__init__)
UNKNOWN = "UNKNOWN"  # no answer from sacct nor squeue: possibly still queued
ENDED = "ENDED"  # not in squeue any more and no accounting record: the job is over, its run directory says how
FAILED_STATES = (
    "FAILED",
    "TIMEOUT",
    "OUT_OF_MEMORY",
    "NODE_FAIL",
    "BOOT_FAIL",
    "DEADLINE",
    "CANCELLED",
    "PREEMPTED",
    ENDED,
)
FAILURE_FILE = "failure.txt"
QUERY_TIMEOUT_S = 60


def _run(command: list[str]) -> subprocess.CompletedProcess | None:
    """Run a Slurm client command; None when it cannot run at all (not installed, hangs)."""
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=QUERY_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return None


# ---------------------------------------------------------------------- resources


def gres_gpus(gres: str) -> int:
    """GPUs per node in an ``sinfo`` GRES field: ``gpu:4``, ``gpu:a100:2(S:0-1),shard:8`` -> 4, 2; ``(null)`` -> 0."""
    count = 0
    for item in gres.split(","):
        name, *rest = item.split("(")[0].strip().split(":")
        if name == "gpu" and rest and rest[-1].isdigit():
            count += int(rest[-1])
    return count


def partition_gpus(partition: str | None) -> tuple[str, int] | None:
    """The partition (``None``: the cluster's default) and the most GPUs one of its nodes has, from ``sinfo``; None
    when ``sinfo`` does not answer. Raises DGZooError naming the partitions when ``partition`` is not one."""
    done = _run(["sinfo", "--noheader", "--format=%P|%G"])
    if done is None or done.returncode != 0:
        return None
    gpus: dict[str, int] = {}
    default = None
    for line in done.stdout.splitlines():
        if "|" not in line:
            continue
        name, gres = line.split("|", 1)
        if name.endswith("*"):
            name = default = name[:-1]
        gpus[name] = max(gpus.get(name, 0), gres_gpus(gres))
    if not gpus:
        return None
    chosen = partition or default
    if chosen is None:
        return None
    if chosen not in gpus:
        raise DGZooError(
            f"--slurm-partition {chosen}: no such partition on this cluster (sinfo lists "
            f"{', '.join(sorted(gpus))}); pass one of them"
        )
    return chosen, gpus[chosen]


def resolve_gpus(options: dict[str, Any], gpus_per_run: int, log: Callable[[str], None]) -> int:
    """GPUs per job: ``--slurm-gpus`` when given, else ``gpus_per_run`` on a partition with that many GPUs per
    node, 0 on a partition without GPUs; refused in one line when the partition has too few."""
    if "gpus" in options:
        return int(options["gpus"])
    found = partition_gpus(options.get("partition"))
    if found is None:  # sinfo silent: ask as before, sbatch's refusal (if any) names the flag
        return gpus_per_run
    name, available = found
    if available == 0:
        if gpus_per_run > 1:
            raise DGZooError(
                f"--gpus-per-run {gpus_per_run}: partition {name} has no GPUs (sinfo lists no gpu "
                f"GRES); choose a GPU partition with --slurm-partition, or drop --gpus-per-run"
            )
        log(
            f"slurm: partition {name} has no GPUs (sinfo lists no gpu GRES): the jobs ask for none and train on "
            f"CPUs; --slurm-gpus N asks for GPUs"
        )
        return 0
    if available < gpus_per_run:
        raise DGZooError(
            f"--gpus-per-run {gpus_per_run}: the nodes of partition {name} have at most {available} "
            f"GPU(s); pass --gpus-per-run {available} or another --slurm-partition"
        )
    return gpus_per_run


def check_time(minutes: int) -> None:
    """Refuse a time limit that leaves too little before Slurm's warning signal: the signal would reach a task
    before submitit's handler exists (or before a checkpoint), and the job would fail instead of requeueing."""
    if minutes * 60 < SIGNAL_DELAY_S + MIN_WORK_S:
        raise DGZooError(
            f"--slurm-time {minutes} is too short: Slurm signals a job {SIGNAL_DELAY_S} s before its "
            f"limit so that it can checkpoint and requeue, which leaves {minutes * 60 - SIGNAL_DELAY_S} s "
            f"to start and train; pass --slurm-time {MIN_TIME_MIN} or more"
        )


# What sbatch says -> the flag to change. Checked in order: the specific messages before the generic ones.
SBATCH_REFUSALS = (
    ("generic resource", "--slurm-gpus (0 on a partition without GPUs)"),
    ("gres", "--slurm-gpus (0 on a partition without GPUs)"),
    ("qos", "the sweep's size or your QOS (sacctmgr show qos)"),
    ("account", "--slurm-account (sacctmgr show assoc user=$USER lists yours)"),
    ("partition", "--slurm-partition (sinfo lists the partitions)"),
    ("time limit", "--slurm-time"),
    ("memory", "--slurm-mem"),
    ("cpu count", "--slurm-cpus"),
    ("processors", "--slurm-cpus"),
    ("array", "--slurm-array-parallelism, or a smaller sweep (the cluster limits job arrays)"),
    ("node configuration", "--slurm-cpus, --slurm-mem or --slurm-gpus (no node has that much)"),
)


def sbatch_refusal(message: str) -> str:
    """One line for sbatch's refusal ``message`` (its stderr): sbatch's own words and the flag to change."""
    errors = [line.split("error:", 1)[1].strip() for line in message.splitlines() if "error:" in line]
    errors = [e for e in errors if e] or [line.strip() for line in message.splitlines() if line.strip()][-1:]
    said = "; ".join(dict.fromkeys(errors)) or "no reason given"
    lowered = said.lower()
    fix = next(
        (flag for key, flag in SBATCH_REFUSALS if key in lowered),
        "the --slurm-* flags (partition, gpus, cpus, mem, time, account)",
    )
    return f"sbatch refused the job array: {said}; change {fix}"


# ---------------------------------------------------------------------- job states


def job_states(job_ids: Sequence[str]) -> tuple[dict[str, str], str | None]:
    """The state of every Slurm job in ``job_ids`` (``<array>_<task>`` ids), and one note when some states could
    not come from accounting: ``sacct`` first, then ``squeue --states=all`` for the jobs it does not list (no
    accounting), :data:`ENDED` for jobs neither lists, :data:`UNKNOWN` when squeue does not answer either."""
    from submitit.slurm.slurm import SlurmInfoWatcher

    ids = list(dict.fromkeys(job_ids))
    arrays = sorted({job.split("_")[0] for job in ids})
    states: dict[str, str] = {}
    if not ids:
        return states, None
    sacct = _run(["sacct", "-o", "JobID,State,NodeList", "--parsable2", *[f for a in arrays for f in ("-j", a)]])
    if sacct is not None and sacct.returncode == 0:
        info = SlurmInfoWatcher().read_info(sacct.stdout)
        states = {job: info[job]["State"].split()[0] for job in ids if info.get(job, {}).get("State")}
    missing = [job for job in ids if job not in states]
    if not missing:
        return states, None
    squeue = _run(["squeue", "--noheader", "--array", "--states=all", "--format=%i|%T", f"--jobs={','.join(arrays)}"])
    answered = squeue is not None and (squeue.returncode == 0 or "Invalid job id" in squeue.stderr)
    listed = {}
    if answered and squeue is not None:
        for line in squeue.stdout.splitlines():
            if "|" in line:
                job, state = line.strip().split("|", 1)
                listed[job] = state.strip()
    for job in missing:
        states[job] = listed.get(job, ENDED) if answered else UNKNOWN
    why = "sacct has no record of them (this cluster keeps no accounting, or not yet)"
    if answered:
        note = (
            f"job states of {len(missing)} job(s) from squeue: {why}; a job that has left the queue shows "
            f"{ENDED}, its run directory tells how it ended"
        )
    else:
        error = (squeue.stderr.strip().splitlines() or ["no answer"])[-1] if squeue is not None else "not runnable"
        note = (
            f"{len(missing)} job state(s) {UNKNOWN}: {why} and squeue did not answer ({error}); they may still "
            f"be queued, so a rerun does not submit them again (scancel them to resubmit)"
        )
    return states, note


# ---------------------------------------------------------------------- failure reasons


def write_failure(run_dir: Path, reason: str, job: str) -> None:
    """Record why the task of ``job`` failed, one line in ``run_dir/failure.txt`` (kept until the run succeeds)."""
    line = " ".join(reason.split())
    atomic_write_text(Path(run_dir) / FAILURE_FILE, f"job {job}: {line}\n")


def read_failure(run_dir: Path) -> str | None:
    """The failure line a task wrote into ``run_dir``, or None."""
    path = Path(run_dir) / FAILURE_FILE
    try:
        return path.read_text().strip() or None
    except OSError:
        return None
