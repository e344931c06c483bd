"""One model-selection module: every method is a registered class, and the report, the engine and the CLI use it."""

from __future__ import annotations

import pytest

from dgzoo.run.selection import (
    REPORT_SELECTION_METHODS,
    SELECTION,
    SELECTION_METHODS,
    LeaveOneDomainOut,
    select,
)

RECORDS = [
    {"step": s, "acc": {"a": {"in": ia, "out": oa}, "b": {"in": ib, "out": ob}}}
    for s, ia, oa, ib, ob in [(0, 0.1, 0.5, 0.2, 0.3), (5, 0.2, 0.7, 0.4, 0.6), (10, 0.3, 0.7, 0.9, 0.8)]
]


def test_every_method_named_anywhere_is_a_registered_class():
    from dgzoo.experiments.report import SELECTION_METHODS as report_methods

    assert set(SELECTION_METHODS) | set(REPORT_SELECTION_METHODS) == set(SELECTION)
    assert report_methods == REPORT_SELECTION_METHODS
    assert all(SELECTION[m].per_run for m in SELECTION_METHODS) and not LeaveOneDomainOut.per_run


@pytest.mark.parametrize(
    "method, step, score",
    [
        ("training_domain_validation", 5, 0.7),  # tie: earliest step
        ("oracle", 10, 0.8),
        ("last", 10, 0.7),
    ],
)
def test_per_run_methods_pick_and_score(method, step, score):
    chosen = select(RECORDS, method, ["a"], ["b"])
    assert (chosen["method"], chosen["step"]) == (method, step) and chosen["score"] == pytest.approx(score)
    assert chosen["accuracy"] == {"a": RECORDS[step // 5]["acc"]["a"]["out"], "b": RECORDS[step // 5]["acc"]["b"]["in"]}


def test_leave_one_domain_out_needs_its_validators():
    with pytest.raises(NotImplementedError):
        LeaveOneDomainOut.run_acc(RECORDS, ["a"], ["b"])
    with pytest.raises(ValueError, match="unknown selection method"):
        select(RECORDS, "leave_one_domain_out", ["a"], ["b"])
    assert LeaveOneDomainOut.validated_step(RECORDS, ["b"], ["a"], {}) is None
    step, score, test = LeaveOneDomainOut.validated_step(RECORDS, ["b"], ["a"], {"a": RECORDS})
    assert (step, score, test) == (10, 0.3, 0.9)  # the validator's accuracy on a's in split, best at step 10
