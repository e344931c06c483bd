"""Empirical Risk Minimization, DomainBed's baseline: one cross-entropy step on the pooled per-domain batches."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Algorithm, Minibatches, register_algorithm


@register_algorithm
class ERM(Algorithm):
    """Concatenate the equal-size per-domain minibatches and minimise their mean cross-entropy.

    Each domain therefore weighs the same whatever its size (Vapnik 1992; DomainBed's ``ERM``).
    """

    name = "erm"
    title = "Empirical Risk Minimization"

    def update(self, minibatches: Minibatches, step: int) -> dict[str, float]:
        x = torch.cat([x for x, _ in minibatches])
        y = torch.cat([y for _, y in minibatches])
        loss = F.cross_entropy(self.model(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        self.runtime.backward(loss)
        self.step_optimizer()
        return {"loss": loss.item()}
