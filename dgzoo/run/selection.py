"""DomainBed's model-selection methods over a run's evaluation records (no torch: reports load fast).

Each evaluation produces a record ``{"step": s, "acc": {domain: {"in": a, "out": b}}, ...}``. A selection
method picks one record of a run:

- ``training_domain_validation`` (DomainBed's IID selection): the step with the best mean accuracy on the
  source domains' ``out`` splits. Ties go to the earliest step.
- ``oracle`` (test-domain validation): DomainBed's oracle uses the *last* step of a run and ranks runs (e.g.
  hyperparameter samples) by the target domains' ``out`` accuracy; its score is that accuracy.
- ``last``: the last step.

The accuracy a run reports for a domain is measured on data it never trained on: the ``in`` split (80%) of a
target domain, as DomainBed reports, and the ``out`` split of a source domain.
"""
from __future__ import annotations

from typing import Any
from collections.abc import Iterable, Sequence

SELECTION_METHODS = ("training_domain_validation", "oracle", "last")


def reported_accuracy(acc: dict[str, dict[str, float]], sources: Sequence[str]) -> dict[str, float]:
    """Per-domain accuracy on unseen data: ``out`` split for sources, ``in`` split for every other domain."""
    return {d: splits["out"] if d in sources else splits["in"] for d, splits in acc.items()}


def select(records: Sequence[dict[str, Any]], method: str, sources: Sequence[str],
           targets: Sequence[str]) -> dict[str, Any]:
    """Apply a selection method to a run's evaluation records.

    Returns ``{"method", "step", "score", "accuracy" (per domain), "target_accuracy"}``.
    """
    if not records:
        raise ValueError("no evaluation records to select from")
    if method == "training_domain_validation":
        score = lambda r: _mean(r["acc"][d]["out"] for d in sources)  # noqa: E731
        chosen = max(records, key=lambda r: (score(r), -r["step"]))
        value = score(chosen)
    elif method == "oracle":
        chosen = max(records, key=lambda r: r["step"])
        value = _mean(chosen["acc"][d]["out"] for d in targets)
    elif method == "last":
        chosen = max(records, key=lambda r: r["step"])
        value = _mean(chosen["acc"][d]["out"] for d in sources)
    else:
        raise ValueError(f"unknown selection method {method!r}; use one of {SELECTION_METHODS}")
    per_domain = reported_accuracy(chosen["acc"], sources)
    return {"method": method, "step": chosen["step"], "score": value, "accuracy": per_domain,
            "target_accuracy": _mean(per_domain[d] for d in targets)}


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")
