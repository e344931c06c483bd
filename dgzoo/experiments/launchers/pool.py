"""``local-gpus``: a pool over this machine's GPUs.

One run per device slot (one GPU, or ``gpus_per_run`` GPUs with ``accelerate launch`` inside the run), refilled as
runs finish, each with its log under ``launch_logs/``, the device given through ``CUDA_VISIBLE_DEVICES``, and a
progress line whenever the counts change. ``--runs-per-gpu N`` repeats every slot N times: small runs leave most of
a large GPU idle.
"""

from __future__ import annotations

import collections
import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO

from ...errors import DGZooError
from ...run.claim import RunDirClaimed
from ..sweep import SweepRun, SweepSpec, describe_running, train_command
from .base import (
    FAILED,
    RETRY,
    Attempts,
    Launch,
    LaunchOptions,
    SweepOutcome,
    exit_error,
    failure_reason,
    purpose,
    register_launcher,
)

LAUNCH_LOGS = "launch_logs"  # local-gpus: <output_dir>/launch_logs/<run dir name>.log
MAIN_PROCESS_PORT = 29500  # accelerate's default; slot i of a local-gpus pool uses port + i


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
class _PoolRun(Attempts):
    """A run of the pool: its attempts' lines name its log, and the pool requeues it to retry."""

    log: Callable[[str], None] = print
    outcome: SweepOutcome = field(default_factory=lambda: SweepOutcome([]))
    logs: Path = Path(LAUNCH_LOGS)

    @property
    def log_path(self) -> Path:
        return self.logs / f"{self.run.output_dir.name}.log"

    def on_done(self) -> None:
        self.log(f"finished elsewhere meanwhile: {self.run.describe()}")

    def on_running(self) -> None:
        self.log(describe_running(self.run))
        self.outcome.elsewhere.append(self.run)

    def on_trained(self) -> None:
        self.outcome.trained.append(self.run)

    def on_elsewhere(self, error: RunDirClaimed) -> None:
        self.on_running()

    def on_retry(self, error: Exception) -> None:
        self.log(
            f"run failed: {self.run.describe()}: {failure_reason(error)} (log: {self.log_path}); retrying "
            f"({self.attempt}/{self.max_retries})"
        )

    def on_failed(self, error: Exception) -> None:
        reason = f"{failure_reason(error)}; log: {self.log_path}"
        self.outcome.failed.append((self.run, reason))
        self.log(f"run failed: {self.run.describe()}: {reason}")


@dataclass
class _Slot:
    attempts: _PoolRun
    process: subprocess.Popen
    log_file: IO[str]
    command: str


@register_launcher("local-gpus")
def local_gpus(spec: SweepSpec, options: LaunchOptions) -> Launch:
    """``local-gpus``: keep every device slot busy with one run until none is left."""
    gpus = list(options.gpus) if options.gpus is not None else visible_gpus()
    slots = pack_slots(device_slots(gpus, options.gpus_per_run), options.runs_per_gpu)
    root = Path(spec.output_dir)

    def launch(pending: list[SweepRun], outcome: SweepOutcome) -> bool:
        owner = purpose(spec, options)
        queue = collections.deque(
            _PoolRun(run, owner, options.max_retries, log=options.log, outcome=outcome, logs=root / LAUNCH_LOGS)
            for run in pending
        )
        _pool(queue, slots, options, outcome)
        return True

    return launch


def _pool(
    queue: collections.deque[_PoolRun], slots: list[tuple[str, ...]], options: LaunchOptions, outcome: SweepOutcome
) -> None:
    log = options.log
    busy: dict[int, _Slot] = {}
    total, last = len(queue), None
    log(f"local-gpus: {len(slots)} slot(s): " + "; ".join(f"GPU {','.join(s)}" for s in slots))
    try:
        while queue or busy:
            for index, devices in enumerate(slots):
                while index not in busy and queue:
                    attempts = queue.popleft()
                    try:
                        status = attempts.begin()
                    except DGZooError as e:
                        outcome.failed.append((attempts.run, str(e)))
                        log(f"run failed: {attempts.run.describe()}: {e}")
                        continue
                    if status not in ("done", "running"):
                        busy[index] = _start(attempts, devices, index, options.launch_prefix, log)
            for index, slot in list(busy.items()):
                code = slot.process.poll()
                if code is None:
                    continue
                del busy[index]
                slot.log_file.close()
                verdict = slot.attempts.end(exit_error(code, slot.attempts.run, slot.command))
                if verdict == RETRY:
                    queue.append(slot.attempts)
                elif verdict == FAILED and options.fail_fast:
                    queue.clear()  # start nothing new; the runs in flight finish
            counts = (len(outcome.trained), len(busy), len(outcome.failed), len(queue))
            if counts != last:
                last = counts
                log(
                    f"progress: {counts[0]} done, {counts[1]} running, {counts[2]} failed, {counts[3]} queued "
                    f"(of {total})"
                )
            if busy:
                time.sleep(options.poll_s)
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
            slot.attempts.claim.close()


def _start(
    attempts: _PoolRun, devices: tuple[str, ...], slot: int, launch_prefix: str | None, log: Callable[[str], None]
) -> _Slot:
    run = attempts.run
    command = train_command(run.config, launch_prefix or pool_prefix(len(devices), slot))
    attempts.logs.mkdir(parents=True, exist_ok=True)
    log_path = attempts.log_path
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
        attempts.claim.close()
        raise
    log(f"start {run.describe()} ({attempts.status}) on GPU {visible} -> {run.output_dir} (log: {log_path})")
    return _Slot(attempts, process, log_file, command)
