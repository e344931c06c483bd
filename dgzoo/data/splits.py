"""Seeded in/out splits and the DG protocols.

Every domain is split once into an ``in`` part (80%: training data for sources, the reported test data for
targets) and an ``out`` part (20%: validation for sources, the oracle's selection data for targets), exactly
as DomainBed does. The split of a domain depends only on (split seed, domain name, domain size): not on which
other domains exist, nor on the order they were listed in, nor on the number of processes.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import DGZooError, suggest
from . import plan_cache
from .loading import DGDataset


def seed_hash(*args: object) -> int:
    """A stable 31-bit integer hash of the arguments (DomainBed's ``misc.seed_hash``)."""
    digest = hashlib.md5(str(args).encode("utf-8")).hexdigest()
    return int(digest, 16) % (2**31)


def split_rows(
    rows: np.ndarray, holdout_fraction: float, split_seed: int, domain: str
) -> tuple[np.ndarray, np.ndarray]:
    """Split a domain's row indices into (in, out); ``out`` holds ``int(n * holdout_fraction)`` rows."""
    perm = np.random.RandomState(seed_hash(split_seed, domain)).permutation(len(rows))
    n_out = int(len(rows) * holdout_fraction)
    return np.sort(rows[perm[n_out:]]), np.sort(rows[perm[:n_out]])


@dataclass(frozen=True)
class Protocol:
    """Which domains train the model and which are held out."""

    name: str  # leave-domains-out | single-source | multi-source
    sources: tuple[str, ...]
    targets: tuple[str, ...]


def resolve_protocol(data: DGDataset, target_domains: list[str] | None, source_domains: list[str] | None) -> Protocol:
    """Turn ``--target-domains`` / ``--source-domains`` into a protocol, with one-line errors for bad names."""
    if len(data.domains) < 2:  # no protocol exists: say so, rather than advise flags that are refused in turn
        raise DGZooError(
            f"{data.name} has a single domain ('{data.domains[0] if data.domains else 'none'}'): domain "
            f"generalization trains on some domains and tests on another, so it needs two or more; "
            f"lay the images out as root/<domain>/<class>/* with several domains, or pass the column "
            f"that holds the domain with --domain-column"
        )
    targets = [resolve_domain(data, d, "--target-domains") for d in target_domains or []]
    sources = [resolve_domain(data, d, "--source-domains") for d in source_domains or []]
    if not targets and not sources:
        defaults = data.spec.default_targets if data.spec else None
        if not defaults:
            raise DGZooError(
                f"choose the held-out domain(s) of {data.name} with --target-domains "
                f"(one of: {', '.join(data.domains)}) or the training domain(s) with --source-domains"
            )
        targets = list(defaults)
    if len(set(targets)) != len(targets) or len(set(sources)) != len(sources):
        raise DGZooError("a domain is listed twice in --target-domains or --source-domains; list each once")
    overlap = sorted(set(targets) & set(sources))
    if overlap:
        raise DGZooError(f"domain(s) {', '.join(overlap)} are both source and target; a domain can only be one")
    if not sources:
        sources = [d for d in data.domains if d not in targets]
        if not sources:
            raise DGZooError(
                f"--target-domains {' '.join(targets)} leaves no source domain to train on; "
                f"hold out fewer of: {', '.join(data.domains)}"
            )
        name = "leave-domains-out"
    else:
        if not targets:
            targets = [d for d in data.domains if d not in sources]
        if not targets:
            raise DGZooError(
                f"--source-domains uses every domain of {data.name}, leaving none to test on; leave at least one out"
            )
        name = "single-source" if len(sources) == 1 else "multi-source"
    order = {d: i for i, d in enumerate(data.domains)}
    # order.get: every name is one of data.domains (resolve_domain, or the registry's defaults for this dataset)
    return Protocol(name, tuple(sorted(sources, key=order.get)), tuple(sorted(targets, key=order.get)))  # type: ignore[arg-type]


def resolve_domain(data: DGDataset, name: str, flag: str) -> str:
    """The dataset's name for a user-given domain (exact, alias or any case), or a one-line error for ``flag``
    listing the valid domains."""
    found = data.canonical_domain(str(name))
    if found is None:
        raise DGZooError(
            f"{flag}: unknown domain '{name}' in {data.name}{suggest(str(name), data.domains)}; "
            f"valid domains: {', '.join(data.domains)}"
        )
    return found


@dataclass
class DomainSplits:
    """Row indices of the in and out split of every domain."""

    in_rows: dict[str, np.ndarray]
    out_rows: dict[str, np.ndarray]


def make_splits(
    data: DGDataset,
    holdout_fraction: float,
    split_seed: int,
    used: Sequence[str] | None = None,
    remember: bool = True,
) -> DomainSplits:
    """Split every domain of ``data`` (sources and targets alike) into in/out parts.

    Each ``used`` domain (default: all) must get images on both sides: an empty validation split would be
    scored 0.0 and averaged into model selection. The splits are read from dgzoo's plan cache when an earlier run
    stored them for this table, seed and fraction (:mod:`dgzoo.data.plan_cache`), else computed and, unless
    ``remember`` is False (a dry run), stored there.
    """
    key = None if data.plan_key is None else _splits_key(data, holdout_fraction, split_seed)
    cached = _cached_splits(data, key) if key is not None else None
    if cached is not None:
        in_rows, out_rows = cached
    else:
        in_rows, out_rows = {}, {}
        for domain, rows in data.rows_by_domain.items():
            in_rows[domain], out_rows[domain] = split_rows(rows, holdout_fraction, split_seed, domain)
        if key is not None and remember:
            arrays = {f"in_{i}": in_rows[d] for i, d in enumerate(data.domains)}
            arrays.update({f"out_{i}": out_rows[d] for i, d in enumerate(data.domains)})
            plan_cache.save("splits", key, arrays)
    for domain, rows in data.rows_by_domain.items():
        if used is not None and domain not in used:
            continue
        if len(rows) < 2:
            raise DGZooError(
                f"domain '{domain}' has {len(rows)} image(s), too few for a training and a validation "
                f"split; add images, or leave it out with --source-domains and --target-domains"
            )
        if len(in_rows[domain]) == 0 or len(out_rows[domain]) == 0:
            needed = math.ceil(1000 / len(rows)) / 1000  # rounded up, so int(n * needed) >= 1 holds
            fix = (
                f"raise --holdout-fraction to at least {needed:.3g}"
                if len(out_rows[domain]) == 0
                else "lower --holdout-fraction"
            )
            raise DGZooError(
                f"domain '{domain}' has only {len(rows)} image(s): --holdout-fraction {holdout_fraction} "
                f"leaves its {'validation' if len(out_rows[domain]) == 0 else 'training'} split empty; "
                f"{fix}, or leave the domain out"
            )
    return DomainSplits(in_rows, out_rows)


def _splits_key(data: DGDataset, holdout_fraction: float, split_seed: int) -> dict[str, object]:
    # repr keeps every digit of the fraction: 0.2 and 0.20000001 split differently
    return {
        "tables": data.plan_key,
        "domains": data.domains,
        "holdout": repr(float(holdout_fraction)),
        "seed": split_seed,
    }


def _cached_splits(
    data: DGDataset, key: dict[str, object]
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]] | None:
    """The stored splits, or None when missing or not splitting exactly this dataset's domains (then recomputed)."""
    cached = plan_cache.load("splits", key)
    if cached is None:
        return None
    in_rows, out_rows = {}, {}
    for i, (domain, rows) in enumerate(data.rows_by_domain.items()):
        inside, outside = cached.get(f"in_{i}"), cached.get(f"out_{i}")
        if inside is None or outside is None or len(inside) + len(outside) != len(rows):
            return None
        in_rows[domain], out_rows[domain] = inside, outside
    return in_rows, out_rows
