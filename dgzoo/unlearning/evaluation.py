"""How well a model forgot: accuracy on every set, and two membership attacks.

Accuracy is measured on the forget set, the retain set, the matched validation rows, the untouched test rows
(overall and matched to the forget set's distribution) and the held-out domains. For partial-class and random
unlearning the target is *not* zero forget accuracy but the retrained model's value: a model that never saw the
forget set still generalises to it.

Both attacks ask one question: can an attacker tell the forget set (members that were supposed to be removed)
from unseen images of the same distribution (the matched test rows)? 50% means it cannot.

- ``loss``: logistic regression on each image's cross-entropy loss (the SCRUB-style loss MIA);
- ``representation_knn``: a 5-nearest-neighbour classifier on standardised penultimate features (the
  "representation-space MIA" of third-party SURE code);
- ``representation_linear``: a linear probe (logistic regression) on the same features.

Each attack is trained and scored by stratified k-fold cross-validation on a balanced sample (the larger group is
subsampled to the size of the smaller), repeated over several seeded subsamples and averaged, because forget sets
and matched test sets are often small.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..data import DGDataset
from ..models import classifier, features
from ..training.evaluation import Gather
from .forget import UnlearningData

ATTACKS = {
    "loss": "logistic regression on the per-image cross-entropy loss",
    "representation_knn": "5-nearest-neighbour classifier on standardised penultimate features",
    "representation_linear": "logistic regression (linear probe) on standardised penultimate features",
}
MIN_ATTACK_SAMPLES = 5  # per group: below this, cross-validated attack accuracy means nothing


@dataclass
class Outputs:
    """A model's outputs over one set of images, in the set's order."""

    logits: torch.Tensor
    labels: torch.Tensor
    features: torch.Tensor

    @property
    def losses(self) -> np.ndarray:
        return F.cross_entropy(self.logits, self.labels, reduction="none").numpy()

    @property
    def correct(self) -> np.ndarray:
        return (self.logits.argmax(1) == self.labels).numpy()


@torch.no_grad()
def collect(model: nn.Module, loader: Iterable, device: torch.device, gather: Gather = lambda t: t) -> Outputs:
    """Logits, labels and penultimate features of every image of ``loader`` (gathered from all processes)."""
    was_training = model.training
    model.eval()
    logits, labels, feats = [], [], []
    try:
        for x, y in loader:
            z = features(model, x.to(device))
            out = classifier(model)(z)
            out, y, z = gather((out.float(), y.to(device), z.float()))
            logits.append(out.cpu())
            labels.append(y.cpu())
            feats.append(z.cpu())
    finally:
        model.train(was_training)
    if not logits:
        return Outputs(torch.zeros(0, 0), torch.zeros(0, dtype=torch.long), torch.zeros(0, 0))
    return Outputs(torch.cat(logits), torch.cat(labels), torch.cat(feats))


def attack_accuracy(
    members: np.ndarray, nonmembers: np.ndarray, attack: str, seed: int, repeats: int = 10, folds: int = 5
) -> dict[str, Any]:
    """Cross-validated accuracy of ``attack`` telling ``members`` from ``nonmembers`` (rows are samples).

    Returns ``{"accuracy", "std" (over repeats), "n" (samples per group)}``; accuracy is None when either group
    has fewer than ``MIN_ATTACK_SAMPLES`` samples.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    n = min(len(members), len(nonmembers))
    if n < MIN_ATTACK_SAMPLES:
        return {"accuracy": None, "std": None, "n": int(n)}
    scores = []
    for r in range(repeats):
        rng = np.random.default_rng([seed, r])
        x = np.concatenate(
            [
                members[rng.choice(len(members), n, replace=False)],
                nonmembers[rng.choice(len(nonmembers), n, replace=False)],
            ]
        )
        y = np.concatenate([np.ones(n, dtype=int), np.zeros(n, dtype=int)])
        # n >= MIN_ATTACK_SAMPLES = folds keeps every training fold larger than the 5 neighbours.
        head = KNeighborsClassifier(n_neighbors=5) if attack == "representation_knn" else LogisticRegression()
        cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=int(rng.integers(2**31 - 1)))
        scores.append(float(cross_val_score(make_pipeline(StandardScaler(), head), x, y, cv=cv).mean()))
    return {"accuracy": float(np.mean(scores)), "std": float(np.std(scores)), "n": int(n)}


def attacks(forget: Outputs, unseen: Outputs, seed: int) -> dict[str, dict[str, Any]]:
    """Every attack of :data:`ATTACKS`: forget set (members) against matched unseen images (non-members)."""
    inputs = {
        "loss": (forget.losses[:, None], unseen.losses[:, None]),
        "representation_knn": (forget.features.numpy(), unseen.features.numpy()),
        "representation_linear": (forget.features.numpy(), unseen.features.numpy()),
    }
    return {name: attack_accuracy(*inputs[name], name, seed) for name in ATTACKS}


def accuracy(outputs: Outputs) -> float | None:
    return float(outputs.correct.mean()) if len(outputs.labels) else None


def per_group_accuracy(outputs: Outputs, groups: np.ndarray) -> dict[Any, float]:
    """Accuracy of every value of ``groups`` (one entry per image, e.g. its domain)."""
    correct = outputs.correct
    return {g: float(correct[groups == g].mean()) for g in dict.fromkeys(groups.tolist())}


EVALUATED_SETS = ("forget", "retain", "matched_validation", "test")


def evaluated_rows(sets: UnlearningData) -> dict[str, dict[str, np.ndarray]]:
    """The rows every evaluation reads, as :func:`evaluate_model` takes their loaders: ``{"sets": {name: rows}}``
    for :data:`EVALUATED_SETS` and ``{"held_out": {domain: rows}}``. A run builds their loaders once
    (:func:`dgzoo.data.evaluation_loaders`, one set of workers) and evaluates the original and the unlearned model
    with them."""
    return {"sets": {name: getattr(sets, name) for name in EVALUATED_SETS}, "held_out": dict(sets.held_out)}


def evaluate_model(
    model: nn.Module,
    data: DGDataset,
    sets: UnlearningData,
    loaders: Mapping[str, Mapping[str, Iterable[Any]]],
    device: torch.device,
    gather: Any,
    seed: int,
) -> dict[str, Any]:
    """Accuracy on every set, per-domain test and held-out accuracy, and both attacks (see ``evaluation``).

    ``loaders`` are sequential loaders of :func:`evaluated_rows`, in its layout."""
    outputs = {name: collect(model, loaders["sets"][name], device, gather) for name in EVALUATED_SETS}
    # The matched test rows are a subset of the test rows, in order: read them off instead of a second pass.
    matched = torch.from_numpy(np.isin(sets.test, sets.matched_test))
    test = outputs["test"]
    outputs["matched_test"] = Outputs(test.logits[matched], test.labels[matched], test.features[matched])
    for name, out in outputs.items():  # gathering keeps the loaders' order; the labels prove it
        expected = data.labels[getattr(sets, name)]
        if not np.array_equal(out.labels.numpy(), expected):
            raise RuntimeError(f"evaluation of the {name} set returned images out of order")
    held_out = {d: accuracy(collect(model, loaders["held_out"][d], device, gather)) for d in sets.held_out}
    test_domains = per_group_accuracy(outputs["test"], np.asarray(data.domains)[data.domain_of_row[sets.test]])
    return {
        "accuracy": {
            "forget": accuracy(outputs["forget"]),
            "retain": accuracy(outputs["retain"]),
            "validation": accuracy(outputs["matched_validation"]),
            "test": accuracy(outputs["test"]),
            "matched_test": accuracy(outputs["matched_test"]),
            "held_out": float(np.mean(list(held_out.values()))) if held_out else None,
        },
        "test_domains": test_domains,
        "held_out_domains": held_out,
        "mean_loss": {
            "forget": float(outputs["forget"].losses.mean()),
            "matched_test": float(outputs["matched_test"].losses.mean())
            if len(outputs["matched_test"].labels)
            else None,
        },
        "attacks": attacks(outputs["forget"], outputs["matched_test"], seed),
    }
