"""Data that would train silently wrong, caught before a run writes anything.

A dataset with one class scores every prediction right (held-out accuracy 1.000, meaning nothing), so it is
refused. A class that only held-out domains have is never seen in training: the held-out accuracy then counts
it as errors by construction, which is worth knowing before reading the number, so the run says so first.
"""

from __future__ import annotations

import numpy as np

from ..data import DGDataset, Protocol
from ..errors import DGZooError


def check_classes(data: DGDataset, protocol: Protocol) -> list[str]:
    """Refuse a one-class dataset; return the warnings about classes the source domains never show."""
    if data.num_classes < 2:
        only = data.class_names[0] if data.class_names else "none"
        raise DGZooError(
            f"{data.name} has a single class ('{only}'): every prediction would be right, so any accuracy "
            f"would read 1.000; a classifier needs two classes or more: add the other classes' images "
            f"(root/<domain>/<class>/*) or pass the right --label-column"
        )

    def classes_of(domains: tuple[str, ...]) -> set[int]:
        index = [data.domains.index(d) for d in domains]
        return set(np.flatnonzero(data.class_presence[index].any(axis=0)).tolist()) if index else set()

    unseen = sorted(classes_of(protocol.targets) - classes_of(protocol.sources))
    if not unseen:
        return []
    names = ", ".join(f"'{data.class_names[c]}'" for c in unseen[:5]) + (" ..." if len(unseen) > 5 else "")
    return [
        f"{len(unseen)} class(es) of the held-out domain(s) appear in no source domain ({names}): the network "
        f"never sees them in training, so the held-out accuracy counts their images as errors; add source "
        f"images of them, or remove them from the held-out domains"
    ]
