"""The session around a run, shared by training, unlearning, soups and the dry run: the Accelerator, logging, the
run directory's first write and claim, the device's name and the timing record.

Moved out of :mod:`dgzoo.training.engine` unchanged, so that the engine holds the run's driver; the
engine re-exports these names, so ``from dgzoo.training.engine import create_accelerator`` keeps working.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import sys
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import timm
import torch

from .._version import __version__
from ..errors import DGZooError
from ..run.claim import RunDirClaimed, claim_run_dir
from ..run.provenance import code_version
from ..run.rundir import atomic_write_text, clear_run_dir
from .hostmemory import keep_freed_host_memory
from .peers import collective_timeout

logger = logging.getLogger("dgzoo")


def multiprocess_cpu() -> bool:
    """Several processes launched (torchrun / accelerate launch) on a machine without an accelerator.

    Accelerate only forms a gloo process group on CPU when asked to, otherwise each process would silently
    train alone; dgzoo asks whenever the launcher started several processes and no GPU is visible.
    """
    has_gpu = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
    return not has_gpu and int(os.environ.get("WORLD_SIZE", "1")) > 1


def create_accelerator(
    mixed_precision: str,
    log_with: list[str] | None = None,
    project_dir: Path | None = None,
    find_unused_parameters: bool = False,
) -> Any:
    """An ``accelerate.Accelerator`` for one run of this process (training or unlearning).

    Accelerate keeps its settings in a process-wide singleton; a previous run in this process (a sweep, a test,
    a notebook) may have used other ones, so they are reset first, keeping the process group (PartialState).
    Tracker logs go to ``project_dir/logs``. ``find_unused_parameters`` is for hosts whose modules are not all in
    every loss (DDP then looks for the unused ones each step). The process keeps the host memory its steps free
    for the next ones (:mod:`dgzoo.training.hostmemory`).
    """
    keep_freed_host_memory()
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, ProjectConfiguration

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    project = (
        ProjectConfiguration(project_dir=str(project_dir), logging_dir=str(project_dir / "logs"))
        if project_dir is not None
        else None
    )
    ddp = DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)
    group = InitProcessGroupKwargs(timeout=collective_timeout())  # a silent peer ends the run (peers.py)
    return Accelerator(
        cpu=multiprocess_cpu(),
        mixed_precision=mixed_precision,
        log_with=log_with,
        project_config=project,
        kwargs_handlers=[ddp, group],
    )


class _ProgressAwareHandler(logging.StreamHandler):
    """A console handler whose lines do not land on the end of a running progress bar: ``tqdm.write`` clears
    the bar, prints the line and redraws the bar below it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm.auto import tqdm

            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:  # logging must never break training; report it the standard way
            self.handleError(record)


def setup_logging(is_main: bool, logfile: Path) -> None:
    """Log to stdout (main process; others only warnings) and, on the main process, to ``logfile``."""
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    console = _ProgressAwareHandler(sys.stdout)
    console.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(console)
    if is_main:
        handler = logging.FileHandler(logfile)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)


def run_timing(seconds: float, images: int, steps: int) -> dict[str, float]:
    """results.json's ``timing``: training time and throughput (training images only, evaluation excluded)."""
    return {
        "train_seconds": seconds,
        "images_per_second": images / max(seconds, 1e-9),
        "train_images": images,
        "steps_per_second": steps / max(seconds, 1e-9),
    }


def start_run_dir(accelerator: Any, out: Path, overwrite: bool, recipe: tuple[str, str] | None, logfile: str) -> None:
    """The first write of a run, once every check has passed: on the main process empty a replaced run's files
    (``overwrite``), make ``out`` and write the recipe file ``(name, text)`` (None: written later, as a resumed
    run does once its checkpoint has loaded); then every process logs to ``out/logfile`` (the main one) and the
    console."""
    if accelerator.is_main_process:
        if overwrite:
            clear_run_dir(out)
        out.mkdir(parents=True, exist_ok=True)
        if recipe is not None:
            atomic_write_text(out / recipe[0], recipe[1])
    accelerator.wait_for_everyone()
    setup_logging(accelerator.is_main_process, out / logfile)


def device_name(device: torch.device) -> str:
    """A readable name of the device a run used (for results.json and the card)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU ({os.cpu_count()} cores)"


def cpu_threads(device: torch.device) -> int | None:
    """torch's compute threads when ``device`` is a CPU (they fix the order of its parallel sums, so they are part
    of what makes a CPU run repeat bit for bit); None on an accelerator."""
    return torch.get_num_threads() if device.type == "cpu" else None


def run_environment(device: torch.device, num_processes: int) -> dict[str, Any]:
    """Where and with what a run was computed, for its results.json: processes, device (and on a CPU its compute
    threads), library versions, the code (:func:`dgzoo.run.provenance.code_version`) and when it finished. One
    block, so every kind of run records the same fields the same way."""
    threads = cpu_threads(device)
    return {
        "num_processes": num_processes,
        "device": device_name(device),
        **({"cpu_threads": threads} if threads is not None else {}),
        "dgzoo_version": __version__,
        "timm_version": timm.__version__,
        "torch_version": torch.__version__,
        "code": code_version(),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def check_process_split(batch_size: int, grad_accumulation: int, num_processes: int) -> None:
    """The global per-domain batch must split evenly over processes and then over micro-batches."""
    if batch_size % num_processes:
        raise DGZooError(
            f"--batch-size {batch_size} (per domain, global) must be divisible by the "
            f"{num_processes} processes; use a multiple of {num_processes}"
        )
    if (batch_size // num_processes) % grad_accumulation:
        raise DGZooError(
            f"--batch-size {batch_size} over {num_processes} processes leaves "
            f"{batch_size // num_processes} images per process, not divisible by --grad-accumulation "
            f"{grad_accumulation}; use a batch size that is a multiple of both"
        )


@contextlib.contextmanager
def claim_on_main(accelerator: Any, out: Path, purpose: str) -> Iterator[None]:
    """Hold the claim on ``out`` from the main process; every process fails alike when another run holds it."""
    claim = claim_run_dir(out, purpose) if accelerator.is_main_process else contextlib.nullcontext()
    error: RunDirClaimed | None = None
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(claim)
        except RunDirClaimed as e:
            error = e
        if accelerator.num_processes > 1:  # the other processes learn the main one's answer before anything runs
            held = [error is None]
            torch.distributed.broadcast_object_list(held, src=0)
            if not held[0]:
                raise error or RunDirClaimed(f"{out} is in use by another run; choose another --output-dir")
        elif error is not None:
            raise error
        yield
