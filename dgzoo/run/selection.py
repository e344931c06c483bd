"""DomainBed's model-selection methods over evaluation records, in one place (no torch: reports load fast).

Each evaluation produces a record ``{"step": s, "acc": {domain: {"in": a, "out": b}}, ...}``. As in DomainBed's
``model_selection.py``, every method is a :class:`SelectionMethod` subclass registered in :data:`SELECTION`; its
``run_acc`` picks one record of a run and scores it:

- ``training_domain_validation`` (DomainBed's IID selection): the step with the best mean accuracy on the
  source domains' ``out`` splits. Ties go to the earliest step.
- ``oracle`` (test-domain validation): DomainBed's oracle uses the *last* step of a run and ranks runs (e.g.
  hyperparameter samples) by the target domains' ``out`` accuracy; its score is that accuracy.
- ``last``: the last step (results.json only; not a table of the report).
- ``leave_one_domain_out``: needs the runs that hold out one more domain (the validators), so it scores a run
  only inside a sweep's report (:meth:`LeaveOneDomainOut.validated_step`), never from one run's records.

The accuracy a run reports for a domain is measured on data it never trained on: the ``in`` split (80%) of a
target domain, as DomainBed reports, and the ``out`` split of a source domain.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, ClassVar

Record = dict[str, Any]


class SelectionMethod:
    """One model-selection method: which record of a run counts, and the score that ranks runs."""

    name: ClassVar[str]
    title: ClassVar[str]
    per_run: ClassVar[bool] = True  # scores a run from its own records (results.json's ``selections``)

    @classmethod
    def run_acc(cls, records: Sequence[Record], sources: Sequence[str], targets: Sequence[str]) -> tuple[Record, float]:
        """The chosen record of one run and the method's score for it."""
        raise NotImplementedError(f"{cls.name} cannot select from one run's records")

    @classmethod
    def select(cls, records: Sequence[Record], sources: Sequence[str], targets: Sequence[str]) -> dict[str, Any]:
        """``{"method", "step", "score", "accuracy" (per domain), "target_accuracy"}`` of the chosen record."""
        if not records:
            raise ValueError("no evaluation records to select from")
        chosen, value = cls.run_acc(records, sources, targets)
        per_domain = reported_accuracy(chosen["acc"], sources)
        return {
            "method": cls.name,
            "step": chosen["step"],
            "score": value,
            "accuracy": per_domain,
            "target_accuracy": _mean(per_domain[d] for d in targets),
        }


class TrainingDomainValidation(SelectionMethod):
    name = "training_domain_validation"
    title = "training-domain validation set"

    @classmethod
    def run_acc(cls, records: Sequence[Record], sources: Sequence[str], targets: Sequence[str]) -> tuple[Record, float]:
        score = lambda r: _mean(r["acc"][d]["out"] for d in sources)  # noqa: E731
        chosen = max(records, key=lambda r: (score(r), -r["step"]))
        return chosen, score(chosen)


class Oracle(SelectionMethod):
    name = "oracle"
    title = "test-domain validation set (oracle)"

    @classmethod
    def run_acc(cls, records: Sequence[Record], sources: Sequence[str], targets: Sequence[str]) -> tuple[Record, float]:
        chosen = max(records, key=lambda r: r["step"])
        return chosen, _mean(chosen["acc"][d]["out"] for d in targets)


class Last(SelectionMethod):
    name = "last"
    title = "last step"

    @classmethod
    def run_acc(cls, records: Sequence[Record], sources: Sequence[str], targets: Sequence[str]) -> tuple[Record, float]:
        chosen = max(records, key=lambda r: r["step"])
        return chosen, _mean(chosen["acc"][d]["out"] for d in sources)


class LeaveOneDomainOut(SelectionMethod):
    name = "leave_one_domain_out"
    title = "leave-one-domain-out cross-validation"
    per_run = False

    @staticmethod
    def validated_step(
        records: Sequence[Record],
        targets: Sequence[str],
        others: Sequence[str],
        validators: Mapping[str, Sequence[Record]],
    ) -> tuple[int, float, float] | None:
        """DomainBed's leave-one-domain-out cross-validation of a run holding out ``targets``.

        ``validators[v]`` are the records of the run of the same hyperparameter sample and trial holding out
        ``targets`` plus ``v``, for every domain ``v`` of ``others``. At each step all of them evaluated, the score
        is the mean over ``v`` of that run's accuracy on ``v``'s ``in`` split; the best step wins (ties: the
        earliest). Returns (step, score, target accuracy), or None when a validator or a common step is missing.
        """
        if not others or any(v not in validators for v in others):
            return None
        own = {r["step"]: r for r in records}
        theirs = [{r["step"]: r for r in validators[v]} for v in others]
        steps = sorted(s for s in own if all(s in steps_of for steps_of in theirs))
        if not steps:
            return None
        scores = {s: _mean(by_step[s]["acc"][v]["in"] for v, by_step in zip(others, theirs)) for s in steps}
        step = max(steps, key=lambda s: (scores[s], -s))
        return step, scores[step], _mean(own[step]["acc"][t]["in"] for t in targets)


SELECTION: dict[str, type[SelectionMethod]] = {
    m.name: m for m in (TrainingDomainValidation, Oracle, Last, LeaveOneDomainOut)
}
SELECTION_METHODS = ("training_domain_validation", "oracle", "last")
"""The per-run methods every results.json records under ``selections``."""
REPORT_SELECTION_METHODS = ("training_domain_validation", "leave_one_domain_out", "oracle")
"""The methods the report's tables (``dgzoo report``, the zoo's leaderboard) select with, in table order."""
SELECTION_TITLES = {name: SELECTION[name].title for name in REPORT_SELECTION_METHODS}


def reported_accuracy(acc: dict[str, dict[str, float]], sources: Sequence[str]) -> dict[str, float]:
    """Per-domain accuracy on unseen data: ``out`` split for sources, ``in`` split for every other domain."""
    return {d: splits["out"] if d in sources else splits["in"] for d, splits in acc.items()}


def select(records: Sequence[Record], method: str, sources: Sequence[str], targets: Sequence[str]) -> dict[str, Any]:
    """Apply a per-run selection method to a run's evaluation records (see :meth:`SelectionMethod.select`)."""
    if not records:
        raise ValueError("no evaluation records to select from")
    if method not in SELECTION_METHODS:
        raise ValueError(f"unknown selection method {method!r}; use one of {SELECTION_METHODS}")
    return SELECTION[method].select(records, sources, targets)


def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")
