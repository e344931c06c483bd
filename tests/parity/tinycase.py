"""The tiny case every parity test shares with ``regenerate.py``: one seeded network, fixed minibatches, float64.

The reference numbers in ``data/`` were produced by running the reference implementations on exactly this case
(see ``docs/parity.md``); the tests build it again in dgzoo and compare. Everything runs in float64, so the two
sides agree to rounding and a tight tolerance separates "same update rule" from "different rule".
"""

from __future__ import annotations

import contextlib
import inspect
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

DATA = Path(__file__).resolve().parent / "data"
BACKBONE = "test_resnet"
NUM_CLASSES, NUM_DOMAINS, BATCH, SHAPE = 4, 3, 4, (3, 32, 32)
INIT_SEED = 0  # torch seed the network (and every module a host adds) is initialised under
LR = 1e-3  # DomainBed's small-image default; weight decay 0 likewise
UPDATES = 2
# Adam's epsilon in the tiny case (both sides, every Adam either side makes). At torch's 1e-8, Adam's first step is
# lr * g / (|g| + 1e-8): for the many gradient entries that are rounding residue (|g| ~ 1e-12) it multiplies the
# rounding by lr / eps = 1e5, so two equal rules computed in a different order land 1e-6 apart. At 1e-4 the same
# entries move by lr * g / eps, and equal rules agree to rounding.
ADAM_EPS = 1e-4
# Relative and absolute tolerance on the digests of each tensor's change (relative to the size of the change), by
# the precision the two sides computed in. In float64 equal rules agree to ~1e-12 of a step; where either side
# computes in float32 (regenerate.py: FLOAT32, FLOAT32_TERMS) to ~5e-5 of a step (float32 rounding, amplified by
# penalty weights up to 1000). A changed rule moves some tensor's change by percents.
TOLERANCE = {"float64": (1e-9, 1e-12), "float32": (2e-4, 1e-9)}


@contextlib.contextmanager
def numerics(dtype: str = "float64") -> Iterator[None]:
    """Build and run in ``dtype`` (tensors the algorithms create inherit the default dtype) with Adam's default
    epsilon at ``ADAM_EPS``; restore both after."""
    previous = torch.get_default_dtype()
    defaults = torch.optim.Adam.__init__.__defaults__
    names = list(inspect.signature(torch.optim.Adam.__init__).parameters)[2 : 2 + len(defaults)]
    torch.set_default_dtype(getattr(torch, dtype))
    torch.optim.Adam.__init__.__defaults__ = tuple(ADAM_EPS if n == "eps" else d for n, d in zip(names, defaults))
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
        torch.optim.Adam.__init__.__defaults__ = defaults


def minibatches(
    update: int, num_domains: int = NUM_DOMAINS, batch: int = BATCH
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The fixed (x, y) minibatch of each domain at ``update`` (0, 1, ...): seeded Gaussian images, labels."""
    g = torch.Generator().manual_seed(100 + update)
    return [
        (
            torch.randn(batch, *SHAPE, generator=g, dtype=torch.float64).to(torch.get_default_dtype()),
            torch.randint(0, NUM_CLASSES, (batch,), generator=g),
        )
        for _ in range(num_domains)
    ]


def seed_everything(update: int) -> None:
    """The global RNGs both sides start each update from (dropout, torch.rand in an update, np.random)."""
    torch.manual_seed(1000 + update)
    np.random.seed(1000 + update)
    random.seed(1000 + update)


def digest(tensor: torch.Tensor) -> list[float]:
    """Three numbers that pin a tensor: a position-weighted sum (order and sign), the sum of squares and the sum of
    absolute values (the scale the first is compared at: a sum of entries of both signs cancels)."""
    t = tensor.detach().to(torch.float64).flatten().cpu()
    weights = torch.cos(torch.arange(t.numel(), dtype=torch.float64) * 0.7) + 1.5
    return [float((t * weights).sum()), float((t * t).sum()), float(t.abs().sum())]


def digests(state: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    return {k: digest(v) for k, v in state.items()}


def changes(state: dict[str, torch.Tensor], initial: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """Digests of what the updates changed (``state - initial``, key by key): compared relative to the size of the
    change, so a tolerance says how much of a step may differ, whatever the weights' own scale."""
    return {k: digest(state[k].double() - initial[k].double()) for k in initial if k in state}


def total(state_digests: dict[str, list[float]]) -> list[float]:
    """One digest of a whole state: the sums of its tensors' digests (the initial state's fingerprint)."""
    return [float(sum(d[i] for d in state_digests.values())) for i in range(3)]


def mismatches(expected: dict[str, list[float]], actual: dict[str, list[float]], dtype: str = "float64") -> list[str]:
    """Names (with values) of the digests that differ beyond the tolerance, or that one side lacks."""
    rtol, atol = TOLERANCE[dtype]
    out = [f"{k}: missing" for k in expected if k not in actual]
    for key, (_, squares, l1) in expected.items():
        # Each number may move by rtol of the size of what it sums (2.5 bounds the position weights).
        bound = np.array([2.5 * l1, squares, l1]) * rtol + atol
        if key in actual and not (np.abs(np.subtract(actual[key], expected[key])) <= bound).all():
            out.append(f"{key}: dgzoo {actual[key]} != reference {expected[key]}")
    return out


def load(name: str) -> dict[str, Any]:
    return json.loads((DATA / name).read_text())


def save(name: str, data: dict[str, Any]) -> None:
    DATA.mkdir(parents=True, exist_ok=True)
    (DATA / name).write_text(json.dumps(data, sort_keys=True, separators=(",", ":")) + "\n")


def build_dgzoo(spec: str, hparams: dict[str, Any], num_domains: int = NUM_DOMAINS) -> Any:
    """dgzoo's ``spec`` on the tiny network (seeded), with Adam at ``LR`` as the recipe would make it.
    Call inside :func:`numerics`."""
    from dgzoo.algorithms import create_algorithm
    from dgzoo.models import create_backbone

    torch.manual_seed(INIT_SEED)
    network = create_backbone(BACKBONE, num_classes=NUM_CLASSES)
    return create_algorithm(
        spec,
        network,
        num_domains,
        hparams,
        small_images=True,
        make_optimizer=lambda groups: torch.optim.Adam(groups, lr=LR, weight_decay=0.0),
    )  # eps: numerics()


def state_of(composition: Any) -> dict[str, torch.Tensor]:
    """What the parity data compares: the host's state (``network.*`` and the modules it adds) and, when an add-on
    evaluates another network (an average of weights), that network's state as ``evaluated.*``."""
    state = dict(composition.host.state_dict())
    evaluated = composition.evaluated_network()
    if evaluated is not composition.host.network:
        state.update({f"evaluated.{k}": v for k, v in evaluated.state_dict().items()})
    return state


def run_dgzoo(
    composition: Any, updates: int = UPDATES, num_domains: int = NUM_DOMAINS
) -> list[tuple[dict[str, float], dict[str, torch.Tensor]]]:
    """``updates`` training steps; after each, the metrics and a copy of the compared state (:func:`state_of`)."""
    out = []
    for update in range(updates):
        seed_everything(update)
        metrics = composition.update(minibatches(update, num_domains), update)
        out.append((metrics, {k: v.detach().clone() for k, v in state_of(composition).items()}))
    return out


def drift(
    spec: str, case: dict[str, Any], skipped: tuple[str, ...] = (), losses: dict[str, str] | None = None
) -> list[str]:
    """Build ``spec`` in dgzoo on the tiny case, run its updates and list every way it drifted from the reference
    numbers in ``case`` (an entry of a data file): tensors whose change differs, losses that differ. ``skipped``
    ends the names of state entries not compared (a documented difference); ``losses`` maps dgzoo metrics to the
    reference's (default: ``loss`` to ``loss`` where the reference reported one)."""
    with numerics(case["dtype"]):
        algorithm = build_dgzoo(spec, case["overrides"])
        keys = case["updates"][0]["state"]
        initial = {k: v.clone() for k, v in state_of(algorithm).items() if k in keys}
        if not np.allclose(total(digests(initial)), case["initial"], rtol=1e-12):
            return ["the tiny case's initial weights are not the reference's (regenerate the data)"]
        out = []
        rtol, _ = TOLERANCE[case["tolerance"]]
        for update, (metrics, state) in enumerate(run_dgzoo(algorithm)):
            expected = case["updates"][update]
            reference = {k: v for k, v in expected["state"].items() if not (skipped and k.endswith(skipped))}
            out += [
                f"update {update + 1}: {m}" for m in mismatches(reference, changes(state, initial), case["tolerance"])
            ]
            for ours, theirs in (losses if losses is not None else {"loss": "loss"}).items():
                if theirs in expected["metrics"] and not np.isclose(
                    metrics[ours], expected["metrics"][theirs], rtol=rtol
                ):
                    out.append(f"update {update + 1}: {ours} {metrics[ours]} != {expected['metrics'][theirs]}")
        return out
