"""Launchers: how the pending runs of a sweep get trained, on this machine or off it.

- ``local``: one run after another in this process; ``subprocess``: one after another, each in a fresh process;
  ``print``: the commands only, as a shell script (:mod:`.local`).
- ``local-gpus``: a pool over this machine's GPUs: one run per device slot (one GPU, or ``gpus_per_run`` GPUs
  with ``accelerate launch`` inside the run), refilled as runs finish, each with its log under ``launch_logs/``,
  the device given through ``CUDA_VISIBLE_DEVICES``, and a progress line whenever the counts change (:mod:`.pool`).
- ``slurm``: one submitit job array per invocation. Each array task re-reads its run's status on the node, trains
  it in the job, and when Slurm preempts it or its time runs out, submitit calls :meth:`SlurmTask.checkpoint` and
  requeues it: the requeued task resumes from the run's last checkpoint (``--resume``). ``slurm_jobs.json`` records
  which job trains which run, for ``dgzoo sweep --status`` and so a rerun does not submit a queued run again
  (:mod:`.slurm`, :mod:`.jobs`).
- ``--runs-per-gpu N`` packs N runs onto each device slot (``local-gpus``) or into each Slurm job (``slurm``), each
  run still its own process: small runs leave most of a large GPU idle.

Rerunning is safe under every launcher. Before launching a run, the sweep claims it (:func:`acquire`: a claim
file under ``<output_dir>/.claims/``, :mod:`dgzoo.run.claim`) and reads its status again while holding the claim,
so two invocations of one sweep never both start it; a run whose directory a live training process holds (any
launcher, or a `dgzoo train` by hand) is reported "running elsewhere" and skipped, never counted as failed; a
dead process holds nothing (its claim goes stale). A failed run is retried at most ``max_retries`` times, resuming
from its checkpoint when it has one. That cycle is one class, :class:`.base.Attempts`, which every launcher drives.

A launcher is a function ``setup(spec, options) -> launch`` registered with :func:`register_launcher`: ``setup``
runs before anything is written and refuses what it cannot do; ``launch(pending, outcome)`` trains (or submits) the
pending runs. :func:`run_sweep` (:mod:`.run`) does the rest. See docs/architecture.md, "Adding things".
"""

from .base import (
    LAUNCHER_REGISTRY,
    Attempts,
    Launch,
    Launcher,
    LaunchOptions,
    Setup,
    SweepOutcome,
    acquire,
    check_runs_per_gpu,
    register_launcher,
)
from .jobs import LIVE_SLURM_STATES, SLURM_FOLDER, SLURM_JOBS, import_submitit, job_state, latest_jobs, sweep_status
from .local import sequential
from .pool import LAUNCH_LOGS, MAIN_PROCESS_PORT, device_slots, pack_slots, pool_prefix, visible_gpus
from .run import run_sweep
from .slurm import (
    DEFAULT_SLURM_TIME_MIN,
    ENDED_CHECK_S,
    SLURM_CLUSTERS,
    PackedRun,
    PackedSlurmTask,
    SlurmTask,
    map_runs,
)

LAUNCHERS = tuple(LAUNCHER_REGISTRY)  # the built-in launchers, in the order --help lists them

__all__ = [
    "DEFAULT_SLURM_TIME_MIN",
    "ENDED_CHECK_S",
    "LAUNCHERS",
    "LAUNCHER_REGISTRY",
    "LAUNCH_LOGS",
    "LIVE_SLURM_STATES",
    "MAIN_PROCESS_PORT",
    "SLURM_CLUSTERS",
    "SLURM_FOLDER",
    "SLURM_JOBS",
    "Attempts",
    "Launch",
    "LaunchOptions",
    "Launcher",
    "PackedRun",
    "PackedSlurmTask",
    "Setup",
    "SlurmTask",
    "SweepOutcome",
    "acquire",
    "check_runs_per_gpu",
    "device_slots",
    "import_submitit",
    "job_state",
    "latest_jobs",
    "map_runs",
    "pack_slots",
    "pool_prefix",
    "register_launcher",
    "run_sweep",
    "sequential",
    "sweep_status",
    "visible_gpus",
]
