"""Identify-and-Unlearn's view of the source data: flattened per-split pools, an image cache, a forward pass's outputs.

IU reads every source sample after each epoch; these classes hold which samples a call reads (and their labels,
domains and dataset rows) apart from what the call does with them (:mod:`.iu`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Subset


@dataclass
class Pool:
    """The source domains' samples of one split, flattened: dataset index -> domain, table row, label.

    ``images`` holds the eval-transformed images in pool order when they are cached (else None: read them from
    ``dataset``).
    """

    dataset: ConcatDataset
    domain: torch.Tensor
    rows: np.ndarray
    labels: torch.Tensor
    images: torch.Tensor | None = None

    @classmethod
    def of(cls, domains: Sequence[Any], fraction: float = 1.0, seed: int = 0, cache: ImageCache | None = None) -> Pool:
        """All samples of ``domains``, or a seeded random ``fraction`` of each domain (the same on every process)."""
        generator = torch.Generator().manual_seed(seed)
        keep = [
            np.arange(len(ds))
            if fraction >= 1
            else np.sort(torch.randperm(len(ds), generator=generator)[: max(1, round(fraction * len(ds)))].numpy())
            for ds in domains
        ]
        rows = [np.asarray(ds.rows)[k] for ds, k in zip(domains, keep)]
        cached = [cache.get(ds) if cache is not None else None for ds in domains]
        present = [c for c in cached if c is not None]
        images = (
            torch.cat([c[torch.from_numpy(k)] for c, k in zip(present, keep)]) if len(present) == len(cached) else None
        )
        return cls(
            ConcatDataset([Subset(ds, k.tolist()) for ds, k in zip(domains, keep)]),
            torch.cat([torch.full((len(k),), d, dtype=torch.long) for d, k in enumerate(keep)]),
            np.concatenate(rows),
            torch.from_numpy(np.concatenate([ds.data.labels[r] for ds, r in zip(domains, rows)])).long(),
            images,
        )

    def __len__(self) -> int:
        return len(self.rows)

    def subset(self, index: torch.Tensor) -> Pool:
        """The samples at pool positions ``index``, as a pool of their own."""
        return Pool(
            Subset(self.dataset, index.tolist()),
            self.domain[index],
            self.rows[index.numpy()],
            self.labels[index],
            None if self.images is None else self.images[index],
        )

    def load(self, index: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples ``index`` (pool positions) as one batch on ``device``."""
        if self.images is not None:
            return self.images[index].to(device), self.labels[index].to(device)
        return load_batch(self.dataset, index, device)


class ImageCache:
    """The eval-transformed images of each source dataset, stacked once and kept across IU calls.

    An IU call reads every source image; decoding and transforming them again every epoch is up to half of the
    call on small networks. The evaluation transform is deterministic, so the tensors are the same every time.
    A dataset is cached only while the total stays within ``budget`` bytes.
    """

    def __init__(self, budget: int):
        self.budget, self.used = budget, 0
        self.tensors: dict[int, torch.Tensor | None] = {}

    def get(self, dataset: Any) -> torch.Tensor | None:
        key = id(dataset)
        if key not in self.tensors:
            first = dataset[0][0] if len(dataset) else None
            size = 0 if first is None else first.numel() * first.element_size() * len(dataset)
            if first is None or self.used + size > self.budget:
                self.tensors[key] = None
            else:
                self.tensors[key] = torch.stack([dataset[i][0] for i in range(len(dataset))])
                self.used += size
        return self.tensors[key]


@dataclass
class Pass:
    """What one eval-mode forward pass over a pool gives, for every sample (gathered across processes)."""

    features: torch.Tensor  # [N, D] penultimate features
    logits: torch.Tensor  # [N, classes]
    activations: torch.Tensor | None  # [N, channels] at IU's layer
    entries: torch.Tensor | None = None  # this process's inputs of the tail's first stage, for its share of rows


def load_batch(dataset: Any, index: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack samples ``index`` of ``dataset`` (eval transform) into one batch on ``device``."""
    samples = [dataset[int(i)] for i in index]
    return (
        torch.stack([x for x, _ in samples]).to(device),
        torch.tensor([y for _, y in samples], dtype=torch.long, device=device),
    )


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(1).cpu() == labels).float().mean().item()
