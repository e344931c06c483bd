"""Randomness an algorithm shares across processes and resumes: seeds derived from the run seed and the step.

A random decision that must be the same on every process of a distributed run (GGA's candidates, CausIRL's cut,
PCGrad's order) and again after a resume draws from a generator seeded with :func:`derive_seed` of the
:func:`run_seed` and the step, never from the global RNG (which dropout and augmentation also draw from).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch

from .runtime import Runtime


def derive_seed(*words: int) -> int:
    """A 63-bit seed mixed from non-negative integers (run seed, step, stream), the same on every machine."""
    return int(np.random.SeedSequence([int(w) for w in words]).generate_state(1, np.uint64)[0] >> 1)


def run_seed(runtime: Runtime) -> int:
    """The run's seed (``torch.initial_seed()``: the engine seeds torch with --seed), as process 0 holds it."""
    seed = torch.tensor([torch.initial_seed() % 2**63], dtype=torch.int64, device=runtime.device)
    return int(runtime.broadcast(seed).item())


def seed_rng(device: torch.device, seed: int) -> None:
    torch.random.default_generator.manual_seed(seed)
    if device.type != "cpu":
        torch.get_device_module(device.type).manual_seed(seed)


@contextlib.contextmanager
def private_rng(device: torch.device, seed: int) -> Iterator[None]:
    """Run a block on the global RNGs seeded with ``seed``, then give the caller back its own RNG state.

    The extra forward passes draw dropout masks from here, so they are reproducible and leave the host's
    random stream exactly as it would be without the add-on.
    """
    devices = [] if device.type == "cpu" else [device]
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else None):
        seed_rng(device, seed)
        yield
