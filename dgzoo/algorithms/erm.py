"""Empirical Risk Minimization, DomainBed's baseline: cross-entropy on the pooled per-domain batches."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import LossHost, Metrics, Minibatches
from .registry import register_algorithm


def pooled(minibatches: Minibatches) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's per-domain minibatches concatenated into one batch."""
    return torch.cat([x for x, _ in minibatches]), torch.cat([y for _, y in minibatches])


@register_algorithm
class ERM(LossHost):
    """Concatenate the equal-size per-domain minibatches and minimise their mean cross-entropy.

    Each domain therefore weighs the same whatever its size (Vapnik 1992; DomainBed's ``ERM``).
    """

    name = "erm"
    title = "Empirical Risk Minimization"
    paper = "Vapnik, 1998"

    def loss(self, minibatches: Minibatches, step: int) -> tuple[torch.Tensor, Metrics]:
        x, y = pooled(minibatches)
        return F.cross_entropy(self.predict(x), y), {}
