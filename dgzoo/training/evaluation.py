"""Accuracy of a network on domain splits, and of any checkpoint on any dataset (``dgzoo eval``).

Model selection over the resulting records is :mod:`dgzoo.run.selection`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from torch import nn

from ..data import (
    DomainImages,
    eval_transform,
    evaluation_loaders,
    load_dg_dataset,
    loader_workers,
    make_splits,
    resolve_domain,
)
from ..errors import DGZooError
from ..run.hub import CONFIG, WEIGHTS, create_from_folder, label_names, resolve_checkpoint
from ..run.rundir import nonfinite_tensors
from ..run.selection import select  # noqa: F401  (re-exported for callers of dgzoo.training.evaluation)

Gather = Callable[[Any], Any]
SPLITS = ("all", "in", "out")  # what evaluate_pretrained measures a domain on


@torch.no_grad()
def accuracy(model: nn.Module, loader: Iterable, device: torch.device, gather: Gather = lambda t: t) -> float:
    """Top-1 accuracy of ``model`` over ``loader``; ``gather`` collects predictions from all processes."""
    correct, total = 0, 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        predictions, labels = gather((model(x).argmax(dim=1), y))
        correct += int((predictions == labels).sum())
        total += int(labels.numel())
    return correct / max(total, 1)


@torch.no_grad()
def mean_loss(model: nn.Module, loader: Iterable, device: torch.device, gather: Gather = lambda t: t) -> float:
    """Mean cross-entropy of ``model`` over ``loader`` (SWAD's validation loss); ``gather`` as :func:`accuracy`."""
    total, count = 0.0, 0
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        losses = torch.nn.functional.cross_entropy(model(x).float(), y, reduction="none")
        losses = gather(losses)
        total += float(losses.double().sum())
        count += int(losses.numel())
    return total / max(count, 1)


def source_loss(
    model: nn.Module,
    loaders: dict[str, dict[str, Iterable]],
    domains: Sequence[str],
    device: torch.device,
    gather: Gather = lambda t: t,
) -> float:
    """Mean over ``domains`` of ``model``'s mean cross-entropy on their ``out`` split, in eval mode: SWAD's
    source-validation loss (its ``tr_outloss``). Restores the model's mode."""
    was_training = model.training
    model.eval()
    try:
        return sum(mean_loss(model, loaders[d]["out"], device, gather) for d in domains) / len(domains)
    finally:
        model.train(was_training)


def evaluate(
    model: nn.Module, loaders: dict[str, dict[str, Iterable]], device: torch.device, gather: Gather = lambda t: t
) -> dict[str, dict[str, float]]:
    """Accuracy of every domain split: ``{domain: {"in": acc, "out": acc}}``. Restores the model's mode."""
    was_training = model.training
    model.eval()
    try:
        return {
            domain: {split: accuracy(model, loader, device, gather) for split, loader in splits.items()}
            for domain, splits in loaders.items()
        }
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------- evaluating a checkpoint


def label_mapping(model_classes: Sequence[str], data_classes: Sequence[str], num_outputs: int) -> np.ndarray:
    """Map each dataset class index to the model's output index for the same class name.

    A model whose config has no class names must have as many outputs as the dataset has classes; they are
    then assumed to be in the same order.
    """
    if not model_classes:
        if num_outputs != len(data_classes):
            raise DGZooError(
                f"the model has {num_outputs} outputs and no class names, the dataset {len(data_classes)} "
                f"classes; evaluate on a dataset with the model's classes"
            )
        return np.arange(len(data_classes))
    index = {name: i for i, name in enumerate(model_classes)}
    missing = [c for c in data_classes if c not in index]
    if missing:
        raise DGZooError(
            f"the dataset has classes the model does not predict: {', '.join(missing[:5])}"
            f"{' ...' if len(missing) > 5 else ''}; the model knows: {', '.join(model_classes[:8])}"
            f"{' ...' if len(model_classes) > 8 else ''}"
        )
    return np.array([index[c] for c in data_classes], dtype=np.int64)


def evaluate_pretrained(
    name_or_path: str | Path,
    dataset: str,
    domains: Sequence[str] | None = None,
    split: str = "all",
    revision: str | None = None,
    dataset_revision: str | None = None,
    split_seed: int = 0,
    holdout_fraction: float = 0.2,
    batch_size: int = 128,
    device: str | None = None,
    num_workers: int | None = None,
    token: str | None = None,
) -> dict[str, Any]:
    """Top-1 accuracy of a checkpoint on domains of any dataset, with the checkpoint's own eval transform.

    ``split`` is ``all`` (every image of the domain), or the ``in``/``out`` part of dgzoo's seeded split
    (``split_seed``, ``holdout_fraction``) — ``in`` with the run's split seed reproduces the card's held-out
    numbers. Classes are matched by name. When the checkpoint was trained on this dataset, each domain's role
    in training is reported, since ``all``/``in`` accuracy of a source domain includes training images.
    """

    if split not in SPLITS:
        raise DGZooError(f"--split '{split}' is not one of {', '.join(SPLITS)}")
    if not 0.0 < holdout_fraction < 1.0:
        raise DGZooError(f"--holdout-fraction must be in (0, 1), got {holdout_fraction}")
    if batch_size <= 0:
        raise DGZooError(f"--batch-size must be positive, got {batch_size}")
    folder, repo_id, sha = resolve_checkpoint(name_or_path, revision, token)
    data = load_dg_dataset(dataset, dataset_revision)
    chosen = [resolve_domain(data, str(name), "--domains") for name in domains or data.domains]
    model = create_from_folder(folder).eval()
    bad = nonfinite_tensors(model.state_dict())
    if bad:  # an accuracy of a diverged network means nothing (push refuses it too)
        raise DGZooError(
            f"{folder / WEIGHTS} holds non-finite weights ({len(bad)} tensors, e.g. {bad[0]}): the run "
            f"diverged, so it is not evaluated; train it again with a lower --lr (or --clip-grad-norm)"
        )
    mapping = label_mapping(label_names(model), data.class_names, model.num_classes)
    data = dataclasses.replace(data, labels=mapping[data.labels])
    if split == "all":
        rows = data.rows_by_domain
    else:
        splits = make_splits(data, holdout_fraction, split_seed)
        rows = splits.in_rows if split == "in" else splits.out_rows

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    workers, pin = loader_workers(num_workers, device)
    transform = eval_transform(timm.data.resolve_model_data_config(model))
    images = {d: {split: DomainImages(data, rows[d], transform, d)} for d in chosen}
    loaders = evaluation_loaders(images, batch_size, workers, pin)  # one set of workers for every domain
    acc = {d: accuracy(model, loaders[d][split], device) for d in chosen}
    sizes = {d: len(images[d][split]) for d in chosen}

    meta = json.loads((folder / CONFIG).read_text()).get("dgzoo") or {}  # timm's model drops this key
    info = data.info()
    same_data = bool(meta) and (
        meta.get("dataset_repo_id") == data.repo_id if data.repo_id else meta.get("dataset") == info["name"]
    )
    roles = {
        d: (
            "source"
            if d in meta.get("source_domains", [])
            else "held-out"
            if d in meta.get("target_domains", [])
            else "unused"
        )
        if same_data
        else ""
        for d in chosen
    }
    return {
        "model": repo_id or str(folder),
        "revision": sha,
        "dataset": {k: info[k] for k in ("name", "repo_id", "revision", "path")},
        "split": split,
        "split_seed": split_seed if split != "all" else None,
        "holdout_fraction": holdout_fraction if split != "all" else None,
        "accuracy": acc,
        "images": sizes,
        "roles": roles,
        "mean_accuracy": sum(acc.values()) / len(acc),
    }
