"""One evaluation loader for all of a run's domain splits, its workers started once per run.

A run evaluates every domain's ``in`` and ``out`` split at every evaluation. One DataLoader per split, each with
persistent workers, keeps ``2 x domains x workers`` processes alive for the whole run (48 on a 6-domain dataset
with the 4 workers a GPU process gets), most of them idle; without persistence, each evaluation of each split
starts its workers again. Here a single DataLoader holds every split's images and one set of workers; each split
is a view of it (:class:`SplitLoader`) whose iteration yields exactly the batches a sequential loader over that
split alone would, so accuracies per split are unchanged, also when Accelerate shards and gathers them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from .loaders import DomainImages
from .loading import DGDataset
from .splits import DomainSplits

SplitKey = tuple[int, int]  # (split index, position within the split)


class _Selected:
    """Which split the shared loader serves now; read in the main process, where batches are sampled."""

    def __init__(self) -> None:
        self.split = 0
        self.active = False


class SplitsDataset(Dataset):
    """Several splits (:class:`DomainImages`), addressed by ``(split index, position)`` keys.

    ``total_dataset_length`` is the selected split's size: Accelerate reads it to know how many samples of the
    last, padded, batch of a sharded loader are real (``gather_for_metrics``), which must be counted per split.
    """

    def __init__(self, splits: list[DomainImages], selected: _Selected):
        self.splits, self.selected = splits, selected

    def __len__(self) -> int:
        return sum(len(s) for s in self.splits)

    @property
    def total_dataset_length(self) -> int:
        return len(self.splits[self.selected.split])

    def __getitem__(self, key: SplitKey) -> tuple[Any, int]:
        split, position = key
        return self.splits[split][position]


class SplitBatches:
    """Batches of the selected split in order, ``batch_size`` keys each (the last may be short): what a
    ``DataLoader(split, batch_size, shuffle=False)`` samples. The split is read once, when iteration starts."""

    drop_last = False

    def __init__(self, sizes: list[int], batch_size: int, selected: _Selected):
        self.sizes, self.batch_size, self.selected = sizes, batch_size, selected

    def __iter__(self) -> Iterator[list[SplitKey]]:
        split, n = self.selected.split, self.sizes[self.selected.split]
        return iter(
            [
                [(split, i) for i in range(start, min(start + self.batch_size, n))]
                for start in range(0, n, self.batch_size)
            ]
        )

    def __len__(self) -> int:
        return math.ceil(self.sizes[self.selected.split] / self.batch_size)


class SplitLoader:
    """One split's view of the shared evaluation loader: iterating it yields that split's batches."""

    def __init__(self, shared: EvalLoader, split: int):
        self.shared, self.split = shared, split

    def __iter__(self) -> Iterator[Any]:
        selected = self.shared.selected
        if selected.active:
            raise RuntimeError("the splits of one evaluation loader are iterated one at a time, not interleaved")
        selected.split, selected.active = self.split, True
        try:
            yield from self.shared.loader
        finally:
            selected.active = False

    def __len__(self) -> int:
        return math.ceil(len(self.shared.dataset.splits[self.split]) / self.shared.batch_size)


class EvalLoader:
    """The shared loader of :func:`evaluation_loaders` and the split it serves."""

    def __init__(self, loader: Any, dataset: SplitsDataset, selected: _Selected, batch_size: int):
        self.loader, self.dataset, self.selected, self.batch_size = loader, dataset, selected, batch_size


def evaluation_loaders(
    splits: Mapping[str, Mapping[str, DomainImages]],
    batch_size: int,
    num_workers: int = 0,
    pin_memory: bool = False,
    prepare: Callable[[DataLoader], Any] | None = None,
) -> dict[str, dict[str, Iterable[Any]]]:
    """Loaders of every split in ``splits`` (``{domain: {split name: images}}``), in the same layout, sharing one
    DataLoader and its ``num_workers`` persistent workers. ``prepare`` wraps that DataLoader once (Accelerate's
    ``prepare_data_loader``, which shards each split across processes as it would a loader of its own)."""
    names = [(domain, name) for domain, named in splits.items() for name in named]
    images = [splits[domain][name] for domain, name in names]
    selected = _Selected()
    dataset = SplitsDataset(images, selected)
    loader = DataLoader(
        dataset,
        batch_sampler=SplitBatches([len(s) for s in images], batch_size, selected),
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        # A private generator: starting an iteration must not draw from the global RNG that checkpoints restore.
        generator=torch.Generator().manual_seed(0),
    )
    shared = EvalLoader(prepare(loader) if prepare is not None else loader, dataset, selected, batch_size)
    views: dict[str, dict[str, Iterable[Any]]] = {domain: {} for domain in splits}
    for index, (domain, name) in enumerate(names):
        views[domain][name] = SplitLoader(shared, index)
    return views


def domain_split_images(
    data: DGDataset, splits: DomainSplits, transform: Callable[[Any], Any]
) -> dict[str, dict[str, DomainImages]]:
    """Every domain's ``in`` and ``out`` split of ``data`` as images through ``transform``, in the layout
    :func:`evaluation_loaders` takes: what a run (or a soup) evaluates at every evaluation."""
    return {
        d: {
            split: DomainImages(data, rows[d], transform, d)
            for split, rows in (("in", splits.in_rows), ("out", splits.out_rows))
        }
        for d in data.domains
    }
