"""The per-domain gradient engine shared by every gradient-manipulating algorithm.

Given a model and K per-domain minibatches, :func:`per_domain_gradients` returns a ``[K, P]`` matrix whose row
``k`` is the flattened gradient of domain ``k``'s mean cross-entropy, averaged across processes, without
touching ``.grad``. :meth:`FlatParams.assign_grad` writes one combined ``[P]`` gradient back into ``.grad`` so
the algorithm's optimizer can step. Because the per-domain gradients are already averaged across processes,
that write-back needs no further synchronisation.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime import Runtime

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class FlatParams:
    """A fixed list of trainable tensors seen as one flat vector (DGvGS's whole-model flattening)."""

    def __init__(self, params: Iterable[nn.Parameter]):
        self.tensors = [p for p in params if p.requires_grad]
        self.numels = [p.numel() for p in self.tensors]
        self.numel = sum(self.numels)

    @classmethod
    def of(cls, module: nn.Module) -> "FlatParams":
        return cls(module.parameters())

    def flatten(self, tensors: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """Concatenate per-tensor values (None = zeros, for parameters a loss does not reach) into ``[P]``."""
        return torch.cat([(t if t is not None else torch.zeros_like(p)).reshape(-1).float()
                          for t, p in zip(tensors, self.tensors)])

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """View a ``[P]`` vector as tensors shaped like the parameters."""
        return [chunk.view_as(p) for chunk, p in zip(flat.split(self.numels), self.tensors)]

    def assign_grad(self, flat: torch.Tensor) -> None:
        """Set every parameter's ``.grad`` from a ``[P]`` vector (cast to the parameter's dtype)."""
        for p, g in zip(self.tensors, self.split(flat)):
            p.grad = g.to(p.dtype).clone()

    def values(self) -> torch.Tensor:
        """The current parameter values as one ``[P]`` vector."""
        return torch.cat([p.detach().reshape(-1).float() for p in self.tensors])


def per_domain_gradients(module: nn.Module, minibatches: Sequence[tuple[torch.Tensor, torch.Tensor]],
                         params: FlatParams, runtime: Runtime | None = None,
                         loss_fn: LossFn = F.cross_entropy) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(grads [K, P], losses [K])``: each domain's mean-loss gradient, averaged across processes.

    One forward and one backward per domain on that domain's minibatch, as DomainBed-family code does, so a
    training-mode BatchNorm normalises each domain with its own batch statistics.
    """
    runtime = runtime or Runtime()
    grads = torch.empty(len(minibatches), params.numel, device=params.tensors[0].device)
    losses = torch.empty(len(minibatches), device=grads.device)
    for k, (x, y) in enumerate(minibatches):
        with runtime.autocast():
            loss = loss_fn(module(x), y)
        grads[k] = params.flatten(torch.autograd.grad(loss, params.tensors, allow_unused=True))
        losses[k] = loss.detach().float()
    runtime.all_reduce_mean(grads)
    runtime.all_reduce_mean(losses)
    return grads, losses


def pairwise_cosine(grads: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """The ``[K, K]`` matrix of cosine similarities between the rows of ``grads``."""
    normed = grads / grads.norm(dim=1, keepdim=True).clamp_min(eps)
    return normed @ normed.T
