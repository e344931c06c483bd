"""The algorithm interface, the add-on interface, their registries, and composition.

An :class:`Algorithm` is DomainBed's contract: ``update(minibatches, step)`` receives one ``(x, y)`` minibatch
per source domain, takes its optimisation step, and returns metrics. It gets a model, an optimizer and a
:class:`~dgzoo.runtime.Runtime`, and knows nothing of Accelerate, files or the Hub.

An :class:`AddOn` (GGA, IU) hooks into the engine's events around a host algorithm without changing it:
``before_update`` (e.g. GGA's annealing search during a window of steps), ``after_update``, and
``on_epoch_end`` (e.g. IU's post-epoch unlearning). ``erm+gga+iu`` is therefore a composition, not a class.

Every hyperparameter is declared with :class:`HParam` (default, meaning, allowed values) so that recipes are
validated before training and the documentation lists every choice a paper left open.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence

import torch
from torch import nn

from ..errors import DGZooError, suggest
from ..runtime import Runtime

Minibatches = Sequence[tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class HParam:
    """A declared hyperparameter: its default (which fixes its type), what it means, and allowed values or range."""

    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None

    def coerce(self, value: Any, key: str) -> Any:
        """Convert ``value`` to this hyperparameter's type, or raise a one-line DGZooError."""
        kind = type(self.default)
        try:
            if kind is bool:
                if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
                    value = value.lower() in ("true", "yes", "1")
                elif not isinstance(value, bool):
                    raise ValueError(value)
            elif kind is int:
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise ValueError(value)
                value = int(value)
            elif kind is float:
                if isinstance(value, bool):
                    raise ValueError(value)
                value = float(value)
            elif kind is str:
                value = str(value)
        except (TypeError, ValueError):
            raise DGZooError(f"hparam {key}={value!r} must be {kind.__name__} (default {self.default!r})") from None
        if self.choices is not None and value not in self.choices:
            raise DGZooError(f"hparam {key}={value!r} is not one of {', '.join(map(str, self.choices))}"
                             f"{suggest(str(value), map(str, self.choices))}")
        if self.minimum is not None and value < self.minimum:
            raise DGZooError(f"hparam {key}={value} must be at least {self.minimum}")
        if self.maximum is not None and value > self.maximum:
            raise DGZooError(f"hparam {key}={value} must be at most {self.maximum}")
        return value


class Component:
    """What algorithms and add-ons share: a name, a paper, declared hyperparameters and their recipe-time checks,
    and resumable state and run diagnostics."""

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    citation: ClassVar[str] = ""
    HPARAMS: ClassVar[dict[str, HParam]] = {}

    @classmethod
    def check_hparams(cls, hparams: dict[str, Any]) -> None:
        """Reject combinations of (individually valid) hyperparameters, with a one-line DGZooError.

        Called when a recipe is validated, before anything is written.
        """

    @classmethod
    def check_precision(cls, hparams: dict[str, Any], mixed_precision: str) -> None:
        """Reject a ``--mixed-precision`` mode ('no', 'bf16', 'fp16') this component cannot train under, with a
        one-line DGZooError. Called when the recipe is validated, before anything is written."""

    def state_dict(self) -> dict[str, Any]:
        """State beyond the model and optimizer that a resumed run needs."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def summary(self) -> dict[str, Any]:
        """Run-level diagnostics for results.json (e.g. how often a projection fired)."""
        return {}


class Algorithm(Component):
    """Base class of training algorithms. Subclasses set ``name``, ``HPARAMS`` and implement :meth:`update`."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, num_domains: int,
                 hparams: dict[str, Any], runtime: Runtime):
        self.model = model  # call this for ordinary forward/backward (DDP synchronises its gradients)
        self.module = runtime.unwrap(model)  # the bare timm model, for functional or per-domain work
        self.optimizer = optimizer
        self.num_domains = num_domains
        self.hparams = hparams
        self.runtime = runtime
        self.grad_hooks: list[Callable[[nn.Module], None]] = []

    @classmethod
    def check_recipe(cls, hparams: dict[str, Any], augment: str, num_sources: int) -> None:
        """Reject hyperparameters that do not fit the recipe (its training augmentation, its number of source
        domains), with a one-line DGZooError. Called when the recipe is validated, before anything is written."""

    @classmethod
    def train_transform(cls, preprocessing: dict[str, Any], augment: str, hparams: dict[str, Any],
                        num_sources: int) -> Callable | None:
        """A training transform of the algorithm's own, or None to use the recipe's.

        An algorithm that needs several augmented views of every image (e.g. single-source methods whose
        "domains" are augmentations) returns a transform giving a list of tensors; its minibatches then hold
        ``x`` of shape ``[B, views, C, H, W]``. ``preprocessing`` is the backbone's timm data config.
        """
        return None

    def update(self, minibatches: Minibatches, step: int) -> dict[str, float]:
        """Take one training step on one minibatch per domain and return scalar metrics."""
        raise NotImplementedError

    def step_optimizer(self) -> None:
        """Run the registered gradient hooks (e.g. GGA-L's noise), then ``optimizer.step()``."""
        for hook in self.grad_hooks:
            hook(self.module)
        self.optimizer.step()


@dataclass
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


class AddOn(Component):
    """Base class of add-ons that hook into the training of any host algorithm."""

    def __init__(self, host: Algorithm, hparams: dict[str, Any], runtime: Runtime):
        self.host, self.hparams, self.runtime = host, hparams, runtime

    def before_update(self, minibatches: Minibatches, step: int) -> dict[str, float]:
        return {}

    def after_update(self, minibatches: Minibatches, step: int) -> dict[str, float]:
        return {}

    def on_epoch_end(self, context: EpochContext) -> dict[str, float]:
        return {}


ALGORITHMS: dict[str, type[Algorithm]] = {}
ADDONS: dict[str, type[AddOn]] = {}


def register_algorithm(cls: type[Algorithm]) -> type[Algorithm]:
    """Class decorator: make an algorithm available by its ``name``."""
    ALGORITHMS[cls.name] = cls
    return cls


def register_addon(cls: type[AddOn]) -> type[AddOn]:
    """Class decorator: make an add-on available by its ``name`` (used as ``host+name``)."""
    ADDONS[cls.name] = cls
    return cls


def parse_algorithm(spec: str) -> tuple[type[Algorithm], list[type[AddOn]]]:
    """Split ``host+addon+...`` into classes, with suggestions for misspelled names."""
    parts = [p.strip().lower() for p in spec.split("+")]
    host, addons = parts[0], parts[1:]
    if host not in ALGORITHMS:
        hint = " (it is an add-on: write erm+" + host + ")" if host in ADDONS else suggest(host, ALGORITHMS)
        raise DGZooError(f"unknown algorithm '{host}'{hint}; available: {', '.join(sorted(ALGORITHMS))}")
    for addon in addons:
        if addon not in ADDONS:
            hint = " (it is an algorithm, not an add-on)" if addon in ALGORITHMS else suggest(addon, ADDONS)
            raise DGZooError(f"unknown add-on '{addon}' in '{spec}'{hint}; available add-ons: "
                             f"{', '.join(sorted(ADDONS)) or 'none'}")
    if len(set(addons)) != len(addons):
        raise DGZooError(f"add-on listed twice in '{spec}'; list each once")
    classes = [ADDONS[a] for a in addons]
    for i, first in enumerate(classes):
        for second in classes[i + 1:]:
            # A subclass is a variant of the same method (iue of iu): both would run, one after the other.
            if issubclass(first, second) or issubclass(second, first):
                raise DGZooError(f"'{spec}' lists {first.name} and {second.name}, two variants of one add-on that "
                                 f"would both run; keep one")
    return ALGORITHMS[host], classes


def resolve_hparams(spec: str, given: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Validate and fill hyperparameters per component: ``{'erm': {...}, 'gga': {...}}``.

    Host keys may be bare (``alpha=0.5``) or namespaced (``equilibrium.alpha=0.5``); add-on keys must carry
    the add-on's name (``gga.rho=1e-5``). Unknown keys are errors naming the valid ones.
    """
    host, addons = parse_algorithm(spec)
    components = {host.name: host.HPARAMS, **{a.name: a.HPARAMS for a in addons}}
    resolved = {name: {k: h.default for k, h in declared.items()} for name, declared in components.items()}
    for raw_key, value in given.items():
        namespace, _, key = str(raw_key).rpartition(".")
        namespace = namespace or host.name
        if namespace not in components:
            known = [f"{n}.{k}" for n, d in components.items() for k in d]
            raise DGZooError(f"hparam '{raw_key}' does not belong to '{spec}'{suggest(str(raw_key), known)}; "
                             f"valid: {', '.join(known) or 'none'}")
        declared = components[namespace]
        if key not in declared:
            raise DGZooError(f"unknown hparam '{raw_key}' for {namespace}{suggest(key, declared)}; "
                             f"valid: {', '.join(sorted(declared)) or 'none'}")
        resolved[namespace][key] = declared[key].coerce(value, str(raw_key))
    for component in (host, *addons):
        component.check_hparams(resolved[component.name])
    return resolved


def flat_hparams(resolved: dict[str, dict[str, Any]], host: str) -> dict[str, Any]:
    """Flatten resolved hyperparameters for results.json: host keys bare, add-on keys namespaced."""
    flat: dict[str, Any] = {}
    for name, values in resolved.items():
        for key, value in values.items():
            flat[key if name == host else f"{name}.{key}"] = value
    return flat


class Composition:
    """A host algorithm with its add-ons, driven by the engine one step (and one epoch) at a time."""

    def __init__(self, host: Algorithm, addons: list[AddOn], hparams: dict[str, dict[str, Any]]):
        self.host, self.addons, self.resolved_hparams = host, addons, hparams

    @property
    def name(self) -> str:
        return "+".join([self.host.name, *[a.name for a in self.addons]])

    @property
    def hparams(self) -> dict[str, Any]:
        return flat_hparams(self.resolved_hparams, self.host.name)

    def update(self, minibatches: Minibatches, step: int) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for addon in self.addons:
            metrics.update(_prefixed(addon.name, addon.before_update(minibatches, step)))
        metrics.update(self.host.update(minibatches, step))
        for addon in self.addons:
            metrics.update(_prefixed(addon.name, addon.after_update(minibatches, step)))
        return metrics

    def on_epoch_end(self, context: EpochContext) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for addon in self.addons:
            metrics.update(_prefixed(addon.name, addon.on_epoch_end(context)))
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {"host": self.host.state_dict(), **{a.name: a.state_dict() for a in self.addons}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.host.load_state_dict(state.get("host", {}))
        for addon in self.addons:
            addon.load_state_dict(state.get(addon.name, {}))

    def summary(self) -> dict[str, Any]:
        out = {self.host.name: self.host.summary(), **{a.name: a.summary() for a in self.addons}}
        return {k: v for k, v in out.items() if v}

    def citations(self) -> list[tuple[str, str]]:
        """(title, BibTeX) of every component that has a paper."""
        parts: list[Any] = [self.host, *self.addons]
        return [(p.title or p.name, p.citation) for p in parts if p.citation]


def _prefixed(name: str, metrics: dict[str, float]) -> dict[str, float]:
    return {f"{name}/{k}": v for k, v in metrics.items()}


def create_algorithm(spec: str, model: nn.Module, optimizer: torch.optim.Optimizer, num_domains: int,
                     hparams: dict[str, Any], runtime: Runtime | None = None) -> Composition:
    """Build ``host+addon+...`` around ``model`` and ``optimizer``; hyperparameters are validated first."""
    runtime = runtime or Runtime()
    resolved = resolve_hparams(spec, hparams)
    host_cls, addon_classes = parse_algorithm(spec)
    host = host_cls(model, optimizer, num_domains, resolved[host_cls.name], runtime)
    addons = [cls(host, resolved[cls.name], runtime) for cls in addon_classes]
    return Composition(host, addons, resolved)
