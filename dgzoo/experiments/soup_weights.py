"""The weight average of a soup: a running sum of state dicts, so many large networks never sit in memory at once.

Used by :mod:`dgzoo.experiments.soup_run` for the uniform, greedy and top-k soups.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class WeightSum:
    """A running sum of state dicts (float64), so a soup of many large networks holds two in memory, not all.

    Floating-point tensors are averaged; integer buffers (BatchNorm's ``num_batches_tracked``) are the first
    ingredient's (BatchNorm recomputation resets them).
    """

    def __init__(self) -> None:
        self.total: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, state: dict[str, torch.Tensor]) -> None:
        for key, value in state.items():
            if not value.is_floating_point():
                self.total.setdefault(key, value.clone())
            elif key in self.total:
                self.total[key] += value.double()
            else:
                self.total[key] = value.double().clone()
        self.count += 1

    def plus(self, state: dict[str, torch.Tensor]) -> WeightSum:
        copy = WeightSum()
        copy.total = {k: v.clone() for k, v in self.total.items()}
        copy.count = self.count
        copy.add(state)
        return copy

    def average(self, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The mean, in the dtypes of ``like`` (a network's state dict)."""
        return {k: (v / self.count if v.is_floating_point() else v).to(like[k].dtype) for k, v in self.total.items()}


def average_state_dicts(states: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The uniform average of ``states`` (floating-point tensors; integer buffers from the first)."""
    total = WeightSum()
    for state in states:
        total.add(state)
    return total.average(states[0])
