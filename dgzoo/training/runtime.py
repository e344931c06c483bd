"""The runtime the engine hands to algorithms: :class:`~dgzoo.algorithms.runtime.Runtime` backed by Accelerate.

The interface lives with the algorithms (they only ever see it); this implementation lives with the engine, the
one place that knows Accelerate.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from ..algorithms.runtime import Runtime


class AccelerateRuntime(Runtime):
    """The runtime the engine uses: everything goes through the given ``accelerate.Accelerator``."""

    def __init__(self, accelerator: Any):
        self.accelerator = accelerator
        self.device = accelerator.device
        self.num_processes = accelerator.num_processes
        self.process_index = accelerator.process_index

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.num_processes > 1:
            torch.distributed.all_reduce(tensor)
            tensor.div_(self.num_processes)
        return tensor

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        if self.num_processes > 1:
            torch.distributed.broadcast(tensor, src)
        return tensor

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.num_processes == 1:
            return tensor
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(tensor.contiguous()), dim=0)

    def autocast(self) -> AbstractContextManager[Any]:
        return self.accelerator.autocast()

    def unwrap(self, model: nn.Module) -> nn.Module:
        return self.accelerator.unwrap_model(model)
