"""Per-domain minibatches that are a pure function of (seed, domain, step).

DomainBed draws every training domain's minibatch independently, with replacement, in equal sizes. dgzoo
keeps those semantics and makes each draw *stateless*: the rows and the augmentation seeds of domain ``d`` at
step ``t`` come from a generator seeded with ``(seed, d, t)``. Three properties follow without any sampler
state to save: a resumed run sees exactly the batches the uninterrupted run would have seen; N processes
each take their contiguous share of the same global batch (so 2 processes train on what 1 process would);
and the number of data-loading workers never changes the data.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .loading import DGDataset
from .verify import row_decode_error

Key = tuple[int, int, int]  # (domain index, position within the domain's rows, augmentation seed)


class DomainImages(Dataset):
    """Some rows of a :class:`DGDataset` with a transform. Indexed by position, optionally with an augmentation seed.

    ``random`` says whether the transform draws random numbers; only then is a seed applied per sample (seeding
    costs more than decoding a small image, so deterministic transforms skip it).
    """

    def __init__(
        self, data: DGDataset, rows: np.ndarray, transform: Callable, domain: str | None = None, random: bool = True
    ):
        self.data, self.rows, self.transform, self.domain = data, np.asarray(rows), transform, domain
        self.random = random

    def __len__(self) -> int:
        return len(self.rows)

    def image(self, position: int) -> Any:
        row = int(self.rows[position])
        try:
            return self.data.decode_image(row)  # decoded in full here, where a failure can name the row
        except Exception as e:  # PIL's many error types: any failure here is an unreadable image
            raise row_decode_error(self.data, row, self.domain, e) from None

    def label(self, position: int) -> int:
        return int(self.data.labels[self.rows[position]])

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Any, int]:
        position, seed = key if isinstance(key, tuple) else (key, None)
        if seed is None or not self.random:
            return self.transform(self.image(position)), self.label(position)
        with caller_rng_kept():
            return self.transformed(self.image(position), seed), self.label(position)

    def transformed(self, image: Any, seed: int | None) -> Any:
        """``image`` through the transform; with ``seed`` (and a random transform), after seeding torch's and Python's
        global generators from it. The caller keeps their state (:func:`caller_rng_kept`)."""
        if seed is not None and self.random:
            torch.default_generator.manual_seed(seed)
            random.seed(seed)  # timm's crops draw from Python's `random`
        return self.transform(image)


@contextmanager
def caller_rng_kept() -> Iterator[None]:
    """Restore torch's default generator and Python's ``random`` on leaving, so seeding transforms inside leaves the
    caller's RNG (dropout, checkpointed by Accelerate) undisturbed. Saved once for a whole batch of samples."""
    generator = torch.default_generator
    torch_state, python_state = generator.get_state(), random.getstate()
    try:
        yield
    finally:
        generator.set_state(torch_state)
        random.setstate(python_state)


class MultiDomainSet(Dataset):
    """Several :class:`DomainImages`, addressed by ``(domain index, position, augmentation seed)`` keys."""

    def __init__(self, domains: Sequence[DomainImages]):
        self.domains = list(domains)

    def __len__(self) -> int:
        return sum(len(d) for d in self.domains)

    def __getitem__(self, key: Key) -> tuple[Any, int, int]:
        d, position, seed = key
        x, y = self.domains[d][(position, seed)]
        return x, y, d

    def __getitems__(self, keys: Sequence[Key]) -> list[tuple[Any, int, int]]:
        """A whole step's samples (the DataLoader fetches a batch through this), each distinct image decoded once:
        DomainBed's draws are with replacement, so a step may name a row twice (each use still gets its own
        augmentation seed, and a fresh copy of the decoded image). The same samples as ``[self[k] for k in keys]``."""
        uses = Counter((d, position) for d, position, _ in keys)
        decoded: dict[tuple[int, int], Any] = {}
        samples = []
        with caller_rng_kept():
            for d, position, seed in keys:
                domain = self.domains[d]
                image = decoded.get((d, position))
                if image is None:
                    image = domain.image(position)
                    if uses[(d, position)] > 1:  # keep a pristine copy: a transform may change its input
                        decoded[(d, position)] = _copy(image)
                else:
                    image = _copy(image)
                samples.append((domain.transformed(image, seed), domain.label(position), d))
        return samples


def _copy(image: Any) -> Any:
    """A copy of a decoded image (PIL image or array) that a transform may change without touching the original."""
    return image.copy() if hasattr(image, "copy") else image


class StepBatchSampler:
    """For each step ``t`` in ``[start_step, steps)``, yield this process's keys of every domain's minibatch.

    ``batch_size`` is the global per-domain batch; process ``r`` of ``W`` takes rows ``[r*B/W, (r+1)*B/W)``.
    """

    def __init__(
        self,
        domain_sizes: Sequence[int],
        batch_size: int,
        seed: int,
        steps: int,
        start_step: int = 0,
        process_index: int = 0,
        num_processes: int = 1,
    ):
        if batch_size % num_processes:
            raise ValueError(f"batch size {batch_size} is not divisible by {num_processes} processes")
        self.sizes, self.batch_size, self.seed = list(domain_sizes), batch_size, seed
        self.steps, self.start_step = steps, start_step
        self.local = batch_size // num_processes
        self.offset = process_index * self.local

    def keys_at(self, step: int) -> list[Key]:
        """The keys of this process's share of step ``step`` (all domains, domain-major)."""
        keys: list[Key] = []
        for d, n in enumerate(self.sizes):
            rng = np.random.default_rng([self.seed, d, step])
            rows = rng.integers(0, n, size=self.batch_size)
            seeds = rng.integers(0, 2**31 - 1, size=self.batch_size)
            window = slice(self.offset, self.offset + self.local)
            keys.extend((d, int(r), int(s)) for r, s in zip(rows[window], seeds[window]))
        return keys

    def __iter__(self) -> Iterator[list[Key]]:
        for step in range(self.start_step, self.steps):
            yield self.keys_at(step)

    def __len__(self) -> int:
        return max(0, self.steps - self.start_step)


def collate_domains(samples: list[tuple[Any, int, int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Stack samples into one ``(x, y)`` minibatch per domain, in domain order.

    A transform may return several views of an image (a list of tensors); they are stacked on dim 1.
    """
    by_domain: dict[int, list[tuple[Any, int]]] = {}
    for x, y, d in samples:
        by_domain.setdefault(d, []).append((x, y))
    batches = []
    for d in sorted(by_domain):
        xs = [torch.stack(list(x)) if isinstance(x, (list, tuple)) else x for x, _ in by_domain[d]]
        batches.append((torch.stack(xs), torch.tensor([y for _, y in by_domain[d]], dtype=torch.long)))
    return batches


def train_loader(
    domains: Sequence[DomainImages],
    batch_size: int,
    seed: int,
    steps: int,
    start_step: int = 0,
    process_index: int = 0,
    num_processes: int = 1,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """One loader yielding, per step, a list of per-domain ``(x, y)`` minibatches of equal size."""
    sampler = StepBatchSampler(
        [len(d) for d in domains], batch_size, seed, steps, start_step, process_index, num_processes
    )
    # A private generator: creating the iterator must not draw from the global RNG that checkpoints restore.
    return DataLoader(
        MultiDomainSet(domains),
        batch_sampler=sampler,
        num_workers=num_workers,
        collate_fn=collate_domains,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed),
    )


def loader_workers(num_workers: int | None, device: torch.device) -> tuple[int, bool]:
    """Worker processes and pinned memory for loaders that feed ``device``: ``num_workers`` when given, else
    :func:`default_workers`; pinned memory on CUDA only."""
    cuda = device.type == "cuda"
    return (num_workers if num_workers is not None else default_workers(cuda)), cuda


MAX_DEFAULT_WORKERS = 8  # DomainBed's train.py uses 8 per domain loader; past that decode rarely limits one process


def default_workers(
    accelerator: bool, cpus: int | None = None, local_processes: int | None = None, compute_threads: int | None = None
) -> int:
    """Data-loading workers per process when ``--num-workers`` is not given, from the CPUs this process may use
    (``os.sched_getaffinity``: a Slurm or container CPU limit, not the machine's count) shared by the processes
    launched on this machine (``LOCAL_WORLD_SIZE``).

    Feeding an accelerator, every CPU of the process's share but one (its main process) decodes, up to 8. On CPU the
    cores also train: the workers get the cores that torch's compute threads leave idle (none with torch's default
    of a thread per core, one per spare core with ``OMP_NUM_THREADS=1`` on two cores).
    """
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if local_processes is None:
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    share = max(1, cpus // max(1, local_processes))
    if accelerator:
        return max(1, min(MAX_DEFAULT_WORKERS, share - 1))
    threads = torch.get_num_threads() if compute_threads is None else compute_threads
    return max(0, min(MAX_DEFAULT_WORKERS, share - threads))


def eval_loader(dataset: DomainImages, batch_size: int, num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """A sequential loader over one domain split (sharded across processes by Accelerate when prepared), built once
    per run and iterated at every evaluation."""
    # Workers persist: a run evaluates the same splits many times, and starting workers each time costs seconds.
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(0),
    )
