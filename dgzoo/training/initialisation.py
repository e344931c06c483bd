"""Starting a run from an existing checkpoint's weights (the recipe's ``init_from``).

Weight averaging only works between networks fine-tuned from one shared initialisation (docs/soups.md): DiWA starts
every run of a sweep from one linear-probed checkpoint, model ratatouille from auxiliary fine-tunes. ``init_from``
gives a sweep that shared start by construction: every run loads the same weights, classifier head included, before
its first step. The checkpoint is a dgzoo run directory or a Hub repo (``REPO@REV``, pinned to the commit it
resolves to), read as safetensors only.

Everything is checked before a run writes anything: the architecture against ``--backbone``, the label names against
the dataset's (so the head means the same classes in the same order), and every tensor's name and shape against the
network the recipe builds.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import DGZooError
from ..run.hub import CONFIG, WEIGHTS, resolve_checkpoint


@dataclass(frozen=True)
class InitSource:
    """A resolved ``init_from``: where its files are and what they are (for results.json's provenance)."""

    reference: str  # as the recipe gave it
    folder: Path  # holds config.json + model.safetensors
    repo_id: str | None  # Hub checkpoints: the repo and the commit it was pinned to
    revision: str | None
    architecture: str

    def provenance(self) -> dict[str, Any]:
        """results.json's ``init_from``: the run directory, or the Hub repo and the exact commit."""
        if self.repo_id:
            return {"repo_id": self.repo_id, "revision": self.revision, "architecture": self.architecture}
        return {"run": str(self.folder.resolve()), "architecture": self.architecture}


def resolve_init(
    reference: str,
    backbone: str,
    class_names: Sequence[str],
    network: nn.Module | None = None,
    token: str | None = None,
) -> InitSource:
    """Resolve and check ``init_from`` against the recipe: architecture, label names and, when the recipe's
    ``network`` is given (built on the meta device), every tensor's name and shape. Downloads only the two timm
    files of a Hub checkpoint. Raises a one-line DGZooError naming the mismatch."""
    folder, repo_id, revision = resolve_checkpoint(reference, None, token)
    try:
        config = json.loads((folder / CONFIG).read_text())
    except (OSError, ValueError) as e:
        raise DGZooError(
            f"--init-from {reference}: {CONFIG} is not valid JSON ({e}); re-export the checkpoint"
        ) from None
    architecture = str(config.get("architecture") or "")
    wanted = backbone.removeprefix("timm/").partition(".")[0]
    if architecture != wanted:
        raise DGZooError(
            f"--init-from {reference} holds a {architecture or 'model of unknown architecture'} and the "
            f"recipe's --backbone is {backbone}; pass --backbone {architecture} or a {wanted} checkpoint"
        )
    labels = list(config.get("label_names") or [])
    if labels != list(class_names):
        if sorted(labels) == sorted(class_names):
            detail = "the same classes in another order"
        else:
            detail = f"classes {', '.join(labels[:6]) or 'unnamed'}{' ...' if len(labels) > 6 else ''}"
        raise DGZooError(
            f"--init-from {reference} predicts {detail}, the dataset has {', '.join(class_names[:6])}"
            f"{' ...' if len(class_names) > 6 else ''}; start from a checkpoint trained on this "
            f"dataset's labels"
        )
    source = InitSource(reference, folder, repo_id, revision, architecture)
    if network is not None:
        _check_shapes(source, {k: tuple(v.shape) for k, v in network.state_dict().items()})
    return source


def _check_shapes(source: InitSource, expected: dict[str, tuple[int, ...]]) -> None:
    from safetensors import safe_open

    with safe_open(str(source.folder / WEIGHTS), framework="pt") as f:
        found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    missing = sorted(set(expected) - set(found))
    if missing:
        raise DGZooError(
            f"--init-from {source.reference} lacks {len(missing)} tensors of the recipe's network "
            f"(e.g. {missing[0]}); start from a checkpoint of the same --backbone"
        )
    wrong = [k for k in expected if found[k] != expected[k]]
    if wrong:
        raise DGZooError(
            f"--init-from {source.reference}: {wrong[0]} has shape {list(found[wrong[0]])}, the recipe's "
            f"network {list(expected[wrong[0]])}; use the checkpoint's --image-size and --backbone"
        )


def load_init(network: nn.Module, source: InitSource) -> None:
    """Copy the checkpoint's weights (every parameter and buffer, head included) into ``network``."""
    from safetensors.torch import load_file

    state = load_file(str(source.folder / WEIGHTS))
    try:
        with torch.no_grad():
            network.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise DGZooError(
            f"--init-from {source.reference} does not fit the recipe's network "
            f"({str(e).splitlines()[0]}); use the checkpoint's --backbone"
        ) from None
