"""What an algorithm may ask of the distributed runtime, and nothing more.

Algorithms never import Accelerate. They receive a :class:`Runtime` that can run a backward pass (with
mixed-precision loss scaling), average a tensor across processes, open an autocast region, and unwrap a
DDP model. :class:`Runtime` itself is the single-process implementation used by unit tests;
:class:`AccelerateRuntime` is the one the engine passes, backed by an ``accelerate.Accelerator``.
"""

from __future__ import annotations

import contextlib
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn


class Runtime:
    """Single-process runtime: plain backward, no-op reductions."""

    num_processes: int = 1
    process_index: int = 0

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)

    @property
    def is_main_process(self) -> bool:
        return self.process_index == 0

    def backward(self, loss: torch.Tensor) -> None:
        """Backpropagate ``loss`` into ``.grad`` (synchronising gradients across processes for DDP models)."""
        loss.backward()

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """Average ``tensor`` in place across processes and return it."""
        return tensor

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Overwrite ``tensor`` in place with process ``src``'s copy and return it."""
        return tensor

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every process's ``tensor`` concatenated along dim 0 in process order, differentiably: a batch statistic
        computed on the result is the one-process statistic of the global batch, and its gradient reaches each
        process's own rows. (DDP averages gradients over processes, so a loss that is the same global statistic on
        every process gets exactly its one-process gradient.)"""
        return tensor

    def autocast(self) -> AbstractContextManager[Any]:
        """Context for forward passes made outside the prepared model (mixed precision, if enabled)."""
        return contextlib.nullcontext()

    def mixed_precision(self) -> str:
        """The precision forward passes autocast to: 'no', 'bf16' or 'fp16'."""
        with self.autocast():
            device = self.device.type
            if not torch.is_autocast_enabled(device):
                return "no"
            return "fp16" if torch.get_autocast_dtype(device) == torch.float16 else "bf16"

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The bare model under any DDP/compile wrapper (same parameters, no gradient hooks)."""
        return model

    def sync_buffers(self, module: nn.Module) -> None:
        """Average floating-point buffers (BatchNorm running statistics) across processes."""
        for buffer in module.buffers():
            if buffer.is_floating_point():
                self.all_reduce_mean(buffer.data)
