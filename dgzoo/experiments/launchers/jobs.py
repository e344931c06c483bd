"""What ``slurm_jobs.json`` records (which job trains which run) and the states of those jobs, for the Slurm
launcher (a rerun never submits a queued run again) and ``dgzoo sweep SPEC --status``."""

from __future__ import annotations

import collections
import contextlib
import os
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ...errors import DGZooError
from ...run.rundir import read_json
from ..slurm import FAILED_STATES, FAILURE_FILE, UNKNOWN, job_states, read_failure
from ..slurm_fit import stuck_jobs
from ..sweep import SweepRun, SweepSpec, expand_all, plan, status_line

SLURM_JOBS = "slurm_jobs.json"
SLURM_FOLDER = "slurm"  # submitit's pickles and every job's stdout/stderr, <output_dir>/slurm/<job id>_*
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


def import_submitit() -> Any:
    """submitit, or a one-line error saying how to install it (it is an optional dependency)."""
    try:
        import submitit
    except ImportError:
        raise DGZooError(
            "--launcher slurm needs submitit, which is not installed: pip install 'dgzoo[slurm]'"
        ) from None
    return submitit


def latest_jobs(root: Path, notes: list[str] | None = None) -> dict[str, dict[str, str]]:
    """Per run directory name, the last job submitted for it: ``{"job_id", "cluster", "state"}``. ``notes``
    receives one line when Slurm's accounting could not give every state (:func:`.slurm.job_states`). A pending
    Slurm job that can never start also has ``"stuck"``: the line saying why (:func:`.slurm_fit.stuck_jobs`)."""
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
    pending = [job["job_id"] for job in latest.values() if job["cluster"] == "slurm" and job["state"] == "PENDING"]
    stuck = stuck_jobs(pending) if pending else {}
    for job in latest.values():
        if job["job_id"] in stuck:
            job["stuck"] = stuck[job["job_id"]]
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
        elif run.status != "done" and job is not None and job.get("stuck"):
            log(f"{'':9}stuck: {job['stuck']}")
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
