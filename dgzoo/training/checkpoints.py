"""A training run's resumable checkpoints: saved atomically under ``checkpoints/step_N`` with a manifest, and the
newest intact one loaded on resume (a damaged or older-format one is skipped or named with what to do).

Moved out of :mod:`dgzoo.training.engine` unchanged.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
from pathlib import Path
from typing import Any

from .._version import __version__
from ..errors import DGZooError, writing
from ..run.rundir import (
    CHECKPOINT_FORMAT,
    checkpoint_dirs,
    checkpoint_format,
    checkpoint_problem,
    write_checkpoint_manifest,
)

logger = logging.getLogger("dgzoo")


def resume_state(accelerator: Any, out: Path) -> Path:
    """Load the newest intact checkpoint of ``out``; log each newer one skipped and why (truncated, unloadable).

    A failed load may leave objects half-loaded; the older checkpoint loaded next overwrites all of them.
    """
    skipped: list[str] = []
    damaged = False  # a file missing or truncated: a damaged checkpoint, whatever its format
    for checkpoint in reversed(checkpoint_dirs(out)):
        problem = checkpoint_problem(checkpoint)
        damaged = damaged or problem is not None
        if problem is None:
            try:
                accelerator.load_state(str(checkpoint))
            except Exception as e:  # corrupt in a way sizes cannot show; what the loader said, on one line
                problem = f"it does not load ({type(e).__name__}: {' '.join(str(e).split())[:160]})"
        if problem is None:
            for line in skipped:
                logger.warning("skipped checkpoint %s", line)
            return checkpoint
        skipped.append(f"{checkpoint.name}: {problem}")
    if not damaged and all(checkpoint_format(c) is None for c in checkpoint_dirs(out)):  # not --overwrite: it
        # would delete a run that is only of an older format, not broken
        kept = (
            f"its exported model still evaluates and pushes (dgzoo eval {out} --dataset DATASET; dgzoo push "
            f"{out} REPO_ID); "
            if (out / "model.safetensors").is_file()
            else ""
        )
        raise DGZooError(
            f"the checkpoints in {out} were written by an older dgzoo (before checkpoint format "
            f"{CHECKPOINT_FORMAT}) and cannot be resumed by dgzoo {__version__} ({'; '.join(skipped)}); "
            f"{kept}to train further, start a new run in another directory: dgzoo train --config "
            f"{shlex.quote(str(out / 'train_config.json'))} --output-dir NEW_DIR"
        )
    raise DGZooError(f"no intact checkpoint in {out} ({'; '.join(skipped)}); start the run again with --overwrite")


def save_checkpoint(accelerator: Any, out: Path, step: int, keep: int, extra: dict[str, Any] | None = None) -> None:
    """Save a resumable checkpoint to checkpoints/step_N, atomically (written under a temporary name first)."""
    root = out / "checkpoints"
    tmp = root / f".tmp_step_{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    with writing(root / f"step_{step}", cleanup=[tmp]):  # a full disk: one line, no half-written checkpoint left
        accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        final = root / f"step_{step}"
        with writing(final, cleanup=[tmp]):
            write_checkpoint_manifest(tmp, extra)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        for old in checkpoint_dirs(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
