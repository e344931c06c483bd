"""What a resumed run must continue: the same data, and at least the steps its checkpoint has trained.

A run's splits are drawn from its dataset's rows, so resuming on a dataset that changed (images added to a local
folder, a new commit of a Hub dataset) would redraw them: images trained on would move into validation, and the
run would record only the new data. Every checkpoint's manifest records the data it was trained on
(:func:`data_record`); :func:`check_resume` compares it with the data about to be loaded, before anything is written,
and refuses a change with the fix (the commit to pin, or a new run).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from ..config import TrainConfig
from ..data import DGDataset
from ..errors import DGZooError
from ..run.rundir import checkpoint_manifest, latest_checkpoint


def data_fingerprint(data: DGDataset) -> str:
    """A digest of what the splits are drawn from: every row's label and domain, the class and domain names."""
    digest = hashlib.sha256()
    digest.update(repr((data.domains, data.class_names, len(data.labels))).encode())
    digest.update(data.labels.astype("int64").tobytes())
    digest.update(data.domain_of_row.astype("int64").tobytes())
    return digest.hexdigest()[:32]


def data_record(data: DGDataset) -> dict[str, Any]:
    """The manifest entry of a checkpoint naming the data it was trained on."""
    return {
        "data": {
            "fingerprint": data_fingerprint(data),
            "revision": data.revision,
            "images": len(data.labels),
            "repo_id": data.repo_id,
            "path": data.path,
        }
    }


def recorded_data(output_dir: str | Path) -> dict[str, Any] | None:
    """The data the newest checkpoint of ``output_dir`` was trained on (None: no checkpoint, or an older one)."""
    newest = latest_checkpoint(output_dir)
    found = checkpoint_manifest(newest).get("data") if newest else None
    return found if isinstance(found, dict) else None


def check_resume(cfg: TrainConfig, output_dir: Path, data: DGDataset) -> None:
    """Refuse to resume ``output_dir`` with fewer ``--steps`` than its newest checkpoint trained, or on other data."""
    newest = latest_checkpoint(output_dir)
    if newest is None:
        return
    done = int(newest.name[5:])
    if cfg.steps < done:
        raise DGZooError(
            f"--steps {cfg.steps} is fewer than the {done} steps {output_dir} has already trained "
            f"({newest.name}); resume with --steps {done} or more, or start a new run with --overwrite"
        )
    recorded = recorded_data(output_dir)
    if recorded is None:
        return
    if recorded.get("revision") and recorded["revision"] != data.revision:
        raise DGZooError(
            f"the dataset {data.repo_id or data.name} is now at commit {data.revision}, but {output_dir} "
            f"trained on commit {recorded['revision']}; resume on the data it trained on with --revision "
            f"{recorded['revision']}, or start a new run with --overwrite"
        )
    if recorded.get("fingerprint") != data_fingerprint(data):
        raise DGZooError(
            f"the dataset {data.path or data.name} changed since {output_dir} started ({recorded.get('images')}"
            f" images then, {len(data.labels)} now): resuming would redraw the splits and move images "
            f"trained on into validation; restore the dataset as it was, or start a new run with "
            f"--overwrite or another --output-dir"
        )
