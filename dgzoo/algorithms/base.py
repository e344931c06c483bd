"""The algorithm contract: hosts (loss hosts and full-update hosts) and add-ons.

An :class:`Algorithm` is a ``torch.nn.Module`` that owns the timm backbone (``self.network``) and every module it adds
(a discriminator, extra heads, a second network). The engine prepares it whole with Accelerate, so under DDP every
forward pass an algorithm makes through :meth:`Algorithm.call` (its loss, its features, its discriminator) is
synchronised, and the exported model is still ``self.network``: the plain timm backbone with plain keys.

Two ways to write a host, as DomainBed's ``update(minibatches)``:

- :class:`LossHost`: ``loss(minibatches, step) -> (loss, metrics)``. The engine runs it through the prepared
  module, then does the backward pass, gradient accumulation, clipping and the optimizer step. Most DomainBed
  methods are a few lines of this (CORAL, MMD, IRM, VREx, GroupDRO, Mixup ...).
- :class:`UpdateHost`: ``update(minibatches, step) -> metrics`` takes its own steps with ``self.optimizer`` (and
  any optimizer it declared): per-domain gradients, MLDG's meta step, SAM's two passes, Fish's inner loop.

An :class:`AddOn` (GGA, IU, weight averaging) composes with any host. Its events share one signature,
``event(self, context) -> metrics``, one frozen context object per event (as transformers' ``TrainerCallback``):
``before_update`` / ``after_update`` around every step (:class:`StepContext`), ``on_epoch_end``
(:class:`EpochContext`) and ``on_evaluate`` (:class:`EvalContext`). Beside them: hooks on the host's optimizer step
(:meth:`Algorithm.hook_optimizer_step`, so no host can step around them), and :meth:`AddOn.evaluated_network` to
supply the weights that are evaluated, selected and exported.

Every component declares its hyperparameters with :class:`~dgzoo.hparams.HParam` and checks a recipe in
:meth:`Component.check_hparams` and :meth:`Component.check_recipe`, both called when the recipe is planned, before
anything is written. Constructors do not validate.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..hparams import HParam
from .runtime import Runtime

Minibatches = Sequence[tuple[torch.Tensor, torch.Tensor]]
Metrics = dict[str, float]


@dataclass(frozen=True)
class Recipe:
    """What a component's recipe check may look at, resolved before anything is written.

    ``network`` is the backbone as the run will build it, but on the meta device (names and shapes, no values), or
    None where it could not be built so; checks that need it then run on the real network at construction time.
    """

    num_domains: int
    num_classes: int
    augment: str = "none"
    mixed_precision: str = "no"
    small_images: bool = False
    network: nn.Module | None = None
    pretrained: bool | None = None  # None: not known (an algorithm built outside a run: a test, a notebook)


@dataclass(frozen=True)
class Schedule:
    """The run's length as a schedule check sees it, known when the recipe is planned."""

    steps: int
    eval_every: int
    steps_per_epoch: int  # DomainBed's epoch: the smallest source domain's training split once

    @property
    def evaluations(self) -> list[int]:
        """The steps at which the run evaluates (every ``eval_every`` steps, and at the last step)."""
        return sorted({*range(self.eval_every, self.steps + 1, self.eval_every), self.steps})


@dataclass(frozen=True)
class FirstAction:
    """The first step (1-based) at which a component can change the run, why there, and how to bring it closer."""

    step: int
    reason: str  # e.g. "its annealing window starts at step 101 (gga.start=100)"
    fix: str  # e.g. "lower gga.start and gga.end"
    otherwise: str = "the run is its host alone"  # what the run is when the component never acts


class Component:
    """What hosts and add-ons share: a name, a paper, declared hyperparameters and their checks, resumable state,
    run diagnostics."""

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    paper: ClassVar[str] = ""  # short reference, e.g. "Sun & Saenko, ECCV-W 2016"
    citation: ClassVar[str] = ""
    HPARAMS: ClassVar[dict[str, HParam]] = {}
    # Whether it may run on a network compiled with torch.compile (``--compile``); if not, COMPILE_REFUSAL says why
    # (the recipe is refused with it when planned). What was tried: docs/performance.md.
    COMPILABLE: ClassVar[bool] = True
    COMPILE_REFUSAL: ClassVar[str] = ""

    @classmethod
    def check_hparams(cls, hparams: dict[str, Any]) -> None:
        """Reject combinations of (individually valid) hyperparameters with a one-line DGZooError."""

    @classmethod
    def check_recipe(cls, hparams: dict[str, Any], recipe: Recipe) -> None:
        """Reject hyperparameters that do not fit the recipe (augmentation, number of domains, precision, the
        backbone's layers), with a one-line DGZooError."""

    @classmethod
    def first_action(cls, hparams: dict[str, Any], schedule: Schedule) -> FirstAction | None:
        """The first step at which this component can change the run (its window, its first call), or None when it
        acts from the first step. :meth:`schedule_warnings` compares it with the run's length."""
        return None

    @classmethod
    def schedule_warnings(cls, hparams: dict[str, Any], schedule: Schedule) -> list[str]:
        """Warnings, said when the run is planned, for a component that cannot act (or hardly acts) within the
        run's steps: a user who asked for it would otherwise get the run without it, silently."""
        first = cls.first_action(hparams, schedule)
        if first is None or first.step <= schedule.steps:
            return []
        return [
            f"{cls.name} never acts in this run: {first.reason}, after its {schedule.steps} steps, so "
            f"{first.otherwise}; raise --steps to at least {first.step} or {first.fix}"
        ]

    def extra_state(self) -> dict[str, Any]:
        """State beyond parameters, buffers and optimizers that a resumed run needs (plain Python values)."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def summary(self) -> dict[str, Any]:
        """Run-level diagnostics for results.json (e.g. how often a projection fired)."""
        return {}

    def diagnostics(self) -> dict[str, float]:
        """A few run-level numbers that show whether the method changed the training at all ("does it act"):
        results.json lists them under ``diagnostics.<name>.acts`` and the model card shows them. {} = nothing to
        report (a plain loss)."""
        return {}


def with_acts(summary: dict[str, Any], components: Sequence[Component]) -> dict[str, Any]:
    """``summary`` (component name -> its :meth:`Component.summary`) with each component's
    :meth:`Component.diagnostics` added under ``<name>.acts``: results.json's ``diagnostics``."""
    out = {name: dict(value) for name, value in summary.items()}
    for component in components:
        acts = component.diagnostics()
        if acts:
            out.setdefault(component.name, {})["acts"] = {k: float(v) for k, v in acts.items()}
    return out


class Algorithm(Component, nn.Module):
    """Base of hosts. Subclass :class:`LossHost` or :class:`UpdateHost`, not this class."""

    KIND: ClassVar[str] = ""
    # DDP must look for parameters a step did not use (a host whose modules are not all in every loss).
    FIND_UNUSED_PARAMETERS: ClassVar[bool] = False

    # Set by attach() through object.__setattr__, which keeps them out of the module tree (the prepared module may be
    # a DDP wrapper of self: no cycle, no state-dict keys); declared here so that type checkers see them.
    runtime: Runtime
    optimizers: dict[str, torch.optim.Optimizer]
    _prepared: nn.Module

    def __init__(self, network: nn.Module, num_classes: int, num_domains: int, hparams: dict[str, Any]):
        nn.Module.__init__(self)
        self.network = network
        self.num_classes, self.num_domains, self.hparams = num_classes, num_domains, dict(hparams)
        object.__setattr__(self, "runtime", Runtime())
        object.__setattr__(self, "optimizers", {})
        object.__setattr__(self, "_prepared", self)

    # -- wiring, done once by the engine (or a test)

    def optimizer_groups(self) -> dict[str, list[dict[str, Any]]]:
        """Parameter groups of each optimizer, by name. ``main`` is the recipe's optimizer (``--optimizer``,
        ``--lr``, ``--weight-decay``) and gets every trainable parameter by default; a host with a second optimizer
        (DANN's discriminator) returns it under another name, and a group may set its own ``lr``,
        ``weight_decay`` or ``betas``."""
        return {"main": [{"params": [p for p in self.parameters() if p.requires_grad]}]}

    def attach(
        self, runtime: Runtime, optimizers: dict[str, torch.optim.Optimizer], prepared: nn.Module | None = None
    ) -> None:
        """Give the algorithm its runtime, optimizers and prepared (DDP-wrapped) self."""
        object.__setattr__(self, "runtime", runtime)
        object.__setattr__(self, "optimizers", dict(optimizers))
        object.__setattr__(self, "_prepared", prepared if prepared is not None else self)
        self.setup()

    def setup(self) -> None:
        """Runtime-dependent initialisation, once the algorithm is on its device and attached: buffers on the
        parameters' device, seeds shared by every process."""

    @property
    def prepared(self) -> nn.Module:
        """The module the engine prepared (DDP-wrapped on several processes; ``self`` otherwise)."""
        return self._prepared

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The main optimizer."""
        return self.optimizers["main"]

    def hook_optimizer_step(self, hook: Callable[[], None], name: str = "main") -> Any:
        """Run ``hook`` right before every real step of optimizer ``name`` (not on accumulation micro-steps); an
        add-on's way to act on each step whatever the host does. Returns torch's removable handle."""
        optimizer = getattr(self.optimizers[name], "optimizer", self.optimizers[name])  # under Accelerate's wrapper
        return optimizer.register_step_pre_hook(lambda *_: hook())

    # -- forward passes

    def forward(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Dispatch to ``self.<method>``: the prepared module's one entry point, so DDP sees every pass."""
        return getattr(self, method)(*args, **kwargs)

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run ``self.<method>(*args)`` through the prepared module (DDP synchronises the gradients it produces)."""
        return self.prepared(method, *args, **kwargs)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the backbone."""
        return self.network(x)

    def featurize(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features (DomainBed's featurizer): pooled, after dropout, before the classifier."""
        return self.network.forward_head(self.network.forward_features(x), pre_logits=True)

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Logits from penultimate features (DomainBed's classifier)."""
        return self.network.get_classifier()(features)

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Penultimate features and logits of one pass."""
        features = self.featurize(x)
        return features, self.classify(features)

    @classmethod
    def train_transform(
        cls, preprocessing: dict[str, Any], augment: str, hparams: dict[str, Any], num_sources: int
    ) -> Callable | None:
        """A training transform of the algorithm's own, or None to use the recipe's.

        An algorithm that needs several augmented views of every image (single-source methods whose "domains" are
        augmentations) returns a transform giving a list of tensors; its minibatches then hold ``x`` of shape
        ``[B, views, C, H, W]``. ``preprocessing`` is the backbone's timm data config.
        """
        return None


class LossHost(Algorithm):
    """A host that is a loss: the engine does backward, accumulation, clipping and the optimizer step."""

    KIND = "loss"

    def loss(self, minibatches: Minibatches, step: int) -> tuple[torch.Tensor, Metrics]:
        """The loss of one step on one ``(x, y)`` minibatch per source domain, and scalar metrics."""
        raise NotImplementedError


class UpdateHost(Algorithm):
    """A host that takes its own optimizer steps."""

    KIND = "update"

    def update(self, minibatches: Minibatches, step: int) -> Metrics:
        """Take one training step on one minibatch per domain and return scalar metrics."""
        raise NotImplementedError

    def backward_step(self, loss: torch.Tensor, name: str = "main") -> None:
        """Zero optimizer ``name``'s gradients, backpropagate ``loss`` and step: the plain step of an update host."""
        optimizer = self.optimizers[name]
        optimizer.zero_grad(set_to_none=True)
        self.runtime.backward(loss)
        optimizer.step()


@dataclass(frozen=True)
class StepContext:
    """What an add-on sees around one training step: the step (0-based: the host's ``update``/``loss`` argument)
    and its minibatches, one ``(x, y)`` per source domain."""

    step: int
    minibatches: Minibatches


@dataclass(frozen=True)
class EpochContext:
    """What a post-epoch add-on may use: the source data (evaluation transform) and a loader factory."""

    epoch: int
    step: int
    steps_per_epoch: int
    source_domains: list[str]
    source_train: list[Any]  # DomainImages of each source domain's in split
    source_val: list[Any]  # DomainImages of each source domain's out split
    make_loader: Callable[[Any, int], Any]  # (dataset, batch_size) -> sequential DataLoader
    batch_size: int


@dataclass(frozen=True)
class EvalContext:
    """What an add-on may use at each evaluation, before the evaluated network is chosen (SWAD's loss valley)."""

    step: int
    last: bool  # the run's final evaluation
    source_val_loss: Callable[[nn.Module], float]  # mean over source domains of a network's CE on their out split
    source_batches: Callable[[int], Iterator[torch.Tensor]]  # n pooled training batches (training transform)


_EVENTS = {
    "before_update": "StepContext",
    "after_update": "StepContext",
    "on_epoch_end": "EpochContext",
    "on_evaluate": "EvalContext",
}


class AddOn(Component):
    """Base of add-ons that hook into the training of any host algorithm.

    Every event takes one context object and returns scalar metrics (logged as ``<name>/<key>``).
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Refuse an event written with another signature (dgzoo 0.1's ``(minibatches, step)``) when the class is
        defined, rather than with a TypeError in the middle of a run."""
        super().__init_subclass__(**kwargs)
        for event, context in _EVENTS.items():
            method = cls.__dict__.get(event)
            if method is None:
                continue
            params = list(inspect.signature(method).parameters.values())[1:]
            if len(params) != 1 or params[0].kind not in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
                raise TypeError(
                    f"add-on {cls.__qualname__}.{event} must take one argument, (self, context: "
                    f"{context}); read context.step and context.minibatches instead of separate arguments"
                )

    def __init__(self, host: Algorithm, hparams: dict[str, Any], runtime: Runtime):
        self.host, self.hparams, self.runtime = host, hparams, runtime

    def before_update(self, context: StepContext) -> Metrics:
        """Called before the host's step (GGA moves the weights here)."""
        return {}

    def after_update(self, context: StepContext) -> Metrics:
        """Called after the host's step (weight averages take in the new weights here)."""
        return {}

    def on_epoch_end(self, context: EpochContext) -> Metrics:
        """Called after every DomainBed epoch (``context.steps_per_epoch`` steps) with the source data."""
        return {}

    def on_evaluate(self, context: EvalContext) -> Metrics:
        """Called at every evaluation, right before :meth:`evaluated_network` is asked for the weights to evaluate."""
        return {}

    def evaluated_network(self) -> nn.Module | None:
        """The network to evaluate, select and export instead of the host's (an average of weights), or None."""
        return None
