"""Composition: a host with its add-ons, the one object the engine drives every step and epoch.

:func:`~dgzoo.algorithms.registry.create_algorithm` builds it from ``host+addon+...``; the engine calls
:meth:`Composition.update` once per step and the events (epoch end, evaluation) in between, and reads what to
evaluate, export and checkpoint from it. It knows no specific method.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .base import AddOn, Algorithm, EpochContext, EvalContext, Metrics, Minibatches, StepContext


def flat_hparams(resolved: dict[str, dict[str, Any]], host: str) -> dict[str, Any]:
    """Flatten resolved hyperparameters for results.json: host keys bare, add-on keys namespaced."""
    flat: dict[str, Any] = {}
    for name, values in resolved.items():
        for key, value in values.items():
            flat[key if name == host else f"{name}.{key}"] = value
    return flat


LossStep = Callable[[Algorithm, Minibatches, int], Metrics]


def plain_loss_step(host: Algorithm, minibatches: Minibatches, step: int) -> Metrics:
    """One optimizer step of a loss host: zero, backward, step (the engine's version adds accumulation and
    clipping)."""
    loss, metrics = host.call("loss", minibatches, step)
    host.optimizer.zero_grad(set_to_none=True)
    host.runtime.backward(loss)
    host.optimizer.step()
    return {"loss": float(loss.detach()), **scalars(metrics)}


def scalars(metrics: dict[str, Any]) -> Metrics:
    """Metrics as Python floats (tensors are detached and read)."""
    return {k: float(v.detach()) if isinstance(v, torch.Tensor) else float(v) for k, v in metrics.items()}


class Composition:
    """A host with its add-ons, driven by the engine one step (and one epoch) at a time."""

    def __init__(
        self,
        host: Algorithm,
        addons: list[AddOn],
        hparams: dict[str, dict[str, Any]],
        loss_step: LossStep = plain_loss_step,
    ):
        self.host, self.addons, self.resolved_hparams, self.loss_step = host, addons, hparams, loss_step

    @property
    def name(self) -> str:
        return "+".join([self.host.name, *[a.name for a in self.addons]])

    @property
    def hparams(self) -> dict[str, Any]:
        return flat_hparams(self.resolved_hparams, self.host.name)

    def update(self, minibatches: Minibatches, step: int) -> Metrics:
        """One training step: add-ons before, the host's step, add-ons after."""
        metrics: Metrics = {}
        context = StepContext(step, minibatches)
        for addon in self.addons:
            metrics.update(_prefixed(addon.name, addon.before_update(context)))
        if self.host.KIND == "loss":
            metrics.update(self.loss_step(self.host, minibatches, step))
        else:
            metrics.update(scalars(self.host.update(minibatches, step)))
        for addon in self.addons:
            metrics.update(_prefixed(addon.name, addon.after_update(context)))
        return metrics

    def on_epoch_end(self, context: EpochContext) -> Metrics:
        metrics: Metrics = {}
        for addon in self.addons:
            metrics.update(_prefixed(addon.name, addon.on_epoch_end(context)))
        return metrics

    def on_evaluate(self, context: EvalContext) -> Metrics:
        """Every add-on's evaluation event (before :meth:`evaluated_network`); their metrics, prefixed."""
        metrics: Metrics = {}
        for addon in self.addons:
            metrics.update(_prefixed(addon.name, addon.on_evaluate(context)))
        return metrics

    def evaluated_network(self) -> nn.Module:
        """What is evaluated, selected and exported: the last add-on's averaged network, else the host's."""
        for addon in reversed(self.addons):
            network = addon.evaluated_network()
            if network is not None:
                return network
        return self.host.network

    def state_dict(self) -> dict[str, Any]:
        """The components' extra state (parameters and optimizers are checkpointed by Accelerate)."""
        return {"host": self.host.extra_state(), **{a.name: a.extra_state() for a in self.addons}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.host.load_extra_state(state.get("host", {}))
        for addon in self.addons:
            addon.load_extra_state(state.get(addon.name, {}))

    def summary(self) -> dict[str, Any]:
        out = {self.host.name: self.host.summary(), **{a.name: a.summary() for a in self.addons}}
        return {k: v for k, v in out.items() if v}

    def citations(self) -> list[tuple[str, str]]:
        """(title, BibTeX) of every component that has a paper."""
        parts: list[Any] = [self.host, *self.addons]
        return [(p.title or p.name, p.citation) for p in parts if p.citation]


def _prefixed(name: str, metrics: Metrics) -> Metrics:
    return {f"{name}/{k}": float(v) for k, v in metrics.items()}
