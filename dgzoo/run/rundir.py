"""The run directory: timm-native weights, results.json, the model card, plots, checkpoints and logs.

Layout (the contract of ``--output-dir``)::

    config.json          timm config (architecture, num_classes, label_names, pretrained_cfg, dgzoo metadata)
    model.safetensors    plain timm state dict of the selected step
    README.md            model card
    results.json         what was trained, how, and how well
    train_config.json    the resolved recipe (repeat the run with `dgzoo train --config train_config.json`)
    records.jsonl        one line per evaluation (every domain split), for after-the-fact model selection
    accuracy_per_domain.png, training_curves.png, samples_per_domain.png (a row of sample images per domain)
    checkpoints/step_N/  resumable Accelerate checkpoints
    train.log, logs/     text log and tracker (TensorBoard) logs

Files are written atomically (temporary file, then rename), so an interrupted run never leaves a half-written
``model.safetensors`` or ``results.json`` behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import DGZooError, writing
from .claim import CLAIM_FILE, RunDirClaimed, claim_holder, describe_holder

RUN_MARKERS = ("train_config.json", "results.json", "checkpoints", "unlearn_config.json")
SAMPLES_IMAGE = "samples_per_domain.png"  # one row of sample images per domain, embedded in the model card
OUTPUT_FILES = (
    "config.json",
    "model.safetensors",
    "README.md",
    "results.json",
    "train_config.json",
    "records.jsonl",
    "accuracy_per_domain.png",
    "training_curves.png",
    SAMPLES_IMAGE,
    "train.log",
    "unlearn_config.json",
    "unlearn.log",  # these two: unlearning runs (dgzoo unlearn)
    "failure.txt",  # why the last Slurm task of the run failed (dgzoo.experiments.slurm)
    "soup.log",
)  # soups (dgzoo soup)
OUTPUT_DIRS = ("checkpoints", "logs")
DONE_FILE = "results.json"  # written last: a run is done only when it and every file of RUN_OUTPUTS exist
RUN_OUTPUTS = (
    "config.json",
    "model.safetensors",
    "README.md",
    "train_config.json",
    "records.jsonl",
    "accuracy_per_domain.png",
    "training_curves.png",
    SAMPLES_IMAGE,
)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see either the old or the new file, never a partial one."""
    path = Path(path)
    with writing(path):  # no space, read-only...: one line naming the file; the temporary file is removed
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
            _default_permissions(tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def _default_permissions(path: str | Path) -> None:
    """Give a file made by ``mkstemp`` (mode 0600) the permissions a normal ``open`` would (0666 minus umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def json_text(data: Any) -> str:
    """The JSON text dgzoo writes: indented, values JSON lacks (paths) as strings, a final newline."""
    return json.dumps(data, indent=2, default=str) + "\n"


def write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json_text(data))


def save_model(
    model: nn.Module, run_dir: str | Path, class_names: list[str], data_config: dict[str, Any], metadata: dict[str, Any]
) -> None:
    """Save ``model`` in timm's Hub layout (``config.json`` + ``model.safetensors``) into ``run_dir``.

    ``metadata`` lands under the ``dgzoo`` key of config.json, which timm ignores when loading.
    """
    from timm.models import save_for_hf

    bad = nonfinite_tensors(model.state_dict())
    if bad:
        raise DGZooError(
            f"refusing to export non-finite weights ({len(bad)} tensors, e.g. {bad[0]}); the run "
            f"diverged: lower --lr or set --clip-grad-norm and train again"
        )
    run_dir = Path(run_dir)
    # safetensors stores contiguous tensors only: a channels-last network (--channels-last) is exported in the
    # default layout, the one every loader expects.
    handle = model.register_state_dict_post_hook(_contiguous_values)
    try:
        with (
            writing(run_dir / "model.safetensors"),
            tempfile.TemporaryDirectory(dir=_mkdir(run_dir), prefix=".export-") as tmp,
        ):
            save_for_hf(
                model,
                tmp,
                model_config={"label_names": list(class_names), "dgzoo": metadata},
                safe_serialization=True,
                data_config=data_config,
            )
            for name in ("model.safetensors", "config.json"):
                _default_permissions(Path(tmp) / name)
                os.replace(Path(tmp) / name, run_dir / name)
    finally:
        handle.remove()


def _contiguous_values(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """A state-dict post-hook: every tensor in the default (contiguous) memory layout."""
    for key, value in state_dict.items():
        if hasattr(value, "is_contiguous") and not value.is_contiguous():
            state_dict[key] = value.contiguous()


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def nonfinite_tensors(state_dict: dict[str, Any]) -> list[str]:
    """Names of the floating-point tensors in ``state_dict`` holding a NaN or an infinity."""
    import torch

    return [
        name
        for name, t in state_dict.items()
        if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]


def is_run_dir(path: str | Path) -> bool:
    """Whether ``path`` holds (part of) a dgzoo run."""
    return any((Path(path) / marker).exists() for marker in RUN_MARKERS)


def missing_outputs(path: str | Path) -> list[str] | None:
    """What a finished training run directory lacks: None when it has no ``results.json`` (not finished), ``[]``
    when it is done, else the missing files of :data:`RUN_OUTPUTS`.

    The one "done" check of sweeps, ``--status``, the report and resumption. ``results.json`` is written after every
    other file, so a run killed while finalising is not done; one finished before that order (or with a file deleted
    since) is not done either, and a rerun finishes it. A directory holding ``results.json`` but no ``train.log``
    is a copy of a finished run (e.g. the zoo's mirror of what the report reads) and is judged on ``results.json``.
    """
    path = Path(path)
    if not (path / DONE_FILE).is_file():
        return None
    if not (path / "train.log").exists():
        return []
    return [name for name in RUN_OUTPUTS if not (path / name).exists()]


def run_done(path: str | Path) -> bool:
    """Whether ``path`` holds a finished run with all of its files (see :func:`missing_outputs`)."""
    return missing_outputs(path) == []


def check_output_dir(path: str | Path, resume: bool, overwrite: bool, can_resume: bool = True) -> None:
    """Refuse to train into a directory holding another run unless ``--resume`` or ``--overwrite`` says so.

    Only checks; nothing is deleted here (see :func:`clear_run_dir`), so bad input never costs a run. A directory
    claimed by a live process (:mod:`dgzoo.run.claim`) is refused whatever the flags: ``--overwrite`` must never
    delete the files of a run that is still writing them. ``can_resume`` is False for commands without
    ``--resume`` (``dgzoo unlearn``), so no message suggests it.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DGZooError(f"--output-dir {path} is a file; choose a directory")
    holder = claim_holder(path)
    if holder is not None:
        raise RunDirClaimed(
            f"{path} is in use by {describe_holder(holder)}; wait for it to finish or choose another --output-dir"
        )
    if resume:
        if not latest_checkpoint(path) and not (path / "train_config.json").exists():
            raise DGZooError(f"nothing to resume in {path}: it holds no checkpoint; drop --resume to start a new run")
        return
    if not path.exists() or not any(p for p in path.iterdir() if p.name != CLAIM_FILE):
        return
    if is_run_dir(path):
        if not overwrite:
            if not can_resume or not (path / "train_config.json").exists() and (path / "unlearn_config.json").exists():
                raise DGZooError(
                    f"--output-dir {path} already holds a run; pass --overwrite to replace it, or "
                    f"choose another --output-dir"
                )
            if not latest_checkpoint(path) and not (path / "results.json").exists():
                raise DGZooError(
                    f"--output-dir {path} holds a run that stopped before its first checkpoint; pass "
                    f"--resume to start it again from step 0, --overwrite to replace it, or choose "
                    f"another --output-dir"
                )
            raise DGZooError(
                f"--output-dir {path} already holds a run; pass --resume to continue it, --overwrite "
                f"to replace it, or choose another --output-dir"
            )
        return
    if not overwrite:
        raise DGZooError(f"--output-dir {path} is not empty and holds no dgzoo run; choose an empty or new directory")


def clear_run_dir(path: str | Path) -> None:
    """Remove the files of a previous run (``--overwrite``), leaving anything dgzoo did not write."""
    path = Path(path)
    for name in OUTPUT_FILES:
        (path / name).unlink(missing_ok=True)
    for name in OUTPUT_DIRS:
        shutil.rmtree(path / name, ignore_errors=True)


def checkpoint_dirs(path: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (``checkpoints/step_N``; temporary ones are ignored)."""
    root = Path(path) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


CHECKPOINT_MANIFEST = "dgzoo_manifest.json"
# The layout of the objects a checkpoint holds. 2: the algorithm (an nn.Module owning the network) prepared whole,
# its scheduler and the loop state, as dgzoo 0.2 saves them. A checkpoint without the marker was written before
# it existed (dgzoo 0.1's layout, or an early 0.2 one); if it does not load, it is of an older format.
CHECKPOINT_FORMAT = 2


def write_checkpoint_manifest(checkpoint: str | Path, extra: dict[str, Any] | None = None) -> None:
    """Record the checkpoint format and the size and SHA-256 of every file of a just-saved checkpoint, so that a
    truncated or altered one (same size, other bytes: a resumed RNG state would be silently wrong) is recognised at
    resume, and one of an older format is named as such. ``extra`` adds what the resume checks against (the data
    the run trained on)."""
    checkpoint = Path(checkpoint)
    files = [p for p in sorted(checkpoint.rglob("*")) if p.is_file()]
    sizes = {str(p.relative_to(checkpoint)): p.stat().st_size for p in files}
    digests = {str(p.relative_to(checkpoint)): _sha256(p) for p in files}
    write_json(
        checkpoint / CHECKPOINT_MANIFEST,
        {"format": CHECKPOINT_FORMAT, "files": sizes, "sha256": digests, **(extra or {})},
    )


def checkpoint_format(checkpoint: str | Path) -> int | None:
    """The format marker of a checkpoint's manifest, or None for a checkpoint written before markers existed."""
    try:
        value = read_json(Path(checkpoint) / CHECKPOINT_MANIFEST).get("format")
    except (OSError, ValueError, AttributeError):
        return None
    return int(value) if isinstance(value, int) else None


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_manifest(checkpoint: str | Path) -> dict[str, Any]:
    """The manifest of ``checkpoint`` ({} when it has none or it is unreadable)."""
    try:
        manifest = read_json(Path(checkpoint) / CHECKPOINT_MANIFEST)
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def checkpoint_problem(checkpoint: str | Path) -> str | None:
    """Why ``checkpoint`` cannot be resumed from (a missing, truncated or altered file), or None when it is intact."""
    checkpoint = Path(checkpoint)
    manifest = checkpoint / CHECKPOINT_MANIFEST
    if not manifest.exists():
        return None  # written before manifests existed: only loading it can tell
    try:
        recorded = read_json(manifest)
        sizes, digests = recorded["files"], recorded.get("sha256", {})
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"its {CHECKPOINT_MANIFEST} is unreadable"
    for name, size in sizes.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} is {path.stat().st_size} bytes, {size} were written"
        if name in digests and _sha256(path) != digests[name]:
            return f"{name} does not match the checksum it was written with (altered or corrupt)"
    return None


def latest_checkpoint(path: str | Path) -> Path | None:
    dirs = checkpoint_dirs(path)
    return dirs[-1] if dirs else None


def read_json(path: str | Path) -> Any:
    with open(path) as f:
        return json.load(f)


def read_records(run_dir: str | Path) -> list[dict[str, Any]]:
    """The evaluation records of a run (``records.jsonl``), in step order."""
    path = Path(run_dir) / "records.jsonl"
    if not path.exists():
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
