"""The registries of hosts and add-ons, the ``host+addon+...`` grammar, validation in one place, and the factory.

Hosts register with :func:`register_algorithm`, add-ons with :func:`register_addon`; a name is taken once. Packages
outside dgzoo register theirs through the ``dgzoo.algorithms`` entry-point group (each entry names a module or
class whose import registers it), loaded when :mod:`dgzoo.algorithms` is first imported.

:func:`check_algorithm` is the one place a recipe's algorithm is validated: names, hyperparameters (types, ranges,
combinations) and each component's fit to the recipe (:class:`~dgzoo.algorithms.base.Recipe`). The engine calls
it when it plans a run, before anything is written; :func:`create_algorithm` then builds without checking again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any, cast

import torch
from torch import nn

from ..errors import DGZooError, suggest
from ..hparams import HParam
from ..registry import Registry, RegistryError
from .base import AddOn, Algorithm, Component, Recipe, Schedule
from .composition import Composition, LossStep, plain_loss_step
from .runtime import Runtime

logger = logging.getLogger("dgzoo")


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


ALGORITHMS: Registry[type[Algorithm]] = Registry("algorithm", describe=_qualified)
ADDONS: Registry[type[AddOn]] = Registry("add-on", describe=_qualified)
ENTRY_POINT_GROUP = "dgzoo.algorithms"


def _register(registry: Registry[Any], other: Registry[Any], cls: Any, what: str) -> Any:
    name = cls.name
    if not name or name != name.lower() or "+" in name or "." in name:
        raise ValueError(f"{what} {cls.__qualname__} needs a lower-case name without '+' or '.', got {name!r}")
    fix = f"give {_qualified(cls)} another name"
    taken = other.get(name)
    if taken is not None and taken is not cls:  # a host and an add-on share the `host+addon` namespace
        raise RegistryError(f"{what} '{name}' is already registered ({_qualified(taken)}, an {other.kind}); {fix}")
    registry.add(name, cls, fix=fix)
    return cls


def register_algorithm(cls: type[Algorithm]) -> type[Algorithm]:
    """Class decorator: make a host available by its ``name``. A name already taken is refused."""
    return _register(ALGORITHMS, ADDONS, cls, "algorithm")


def register_addon(cls: type[AddOn]) -> type[AddOn]:
    """Class decorator: make an add-on available by its ``name`` (used as ``host+name``)."""
    return _register(ADDONS, ALGORITHMS, cls, "add-on")


def load_entry_points() -> list[str]:
    """Import every ``dgzoo.algorithms`` entry point (their imports register algorithms); return their names.

    A plugin that fails to import is reported as a warning and skipped: one broken package must not break dgzoo.
    """
    loaded = []
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry.load()
            loaded.append(entry.name)
        except Exception as e:
            logger.warning(
                "dgzoo: skipped the algorithm plugin '%s' (%s): %s: %s", entry.name, entry.value, type(e).__name__, e
            )
    return loaded


def parse_algorithm(spec: str) -> tuple[type[Algorithm], list[type[AddOn]]]:
    """Split ``host+addon+...`` into classes, with suggestions for misspelled names."""
    parts = [p.strip().lower() for p in spec.split("+")]
    host, addons = parts[0], parts[1:]
    if host not in ALGORITHMS:
        hint = " (it is an add-on: write erm+" + host + ")" if host in ADDONS else suggest(host, ALGORITHMS)
        raise DGZooError(f"unknown algorithm '{host}'{hint}; list them with `dgzoo algorithms`")
    for addon in addons:
        if addon not in ADDONS:
            hint = " (it is an algorithm, not an add-on)" if addon in ALGORITHMS else suggest(addon, ADDONS)
            raise DGZooError(
                f"unknown add-on '{addon}' in '{spec}'{hint}; available add-ons: {', '.join(sorted(ADDONS)) or 'none'}"
            )
    if len(set(addons)) != len(addons):
        raise DGZooError(f"add-on listed twice in '{spec}'; list each once")
    classes = [ADDONS[a] for a in addons]
    for i, first in enumerate(classes):
        for second in classes[i + 1 :]:
            # A subclass is a variant of the same method (iue of iu): both would run, one after the other.
            if issubclass(first, second) or issubclass(second, first):
                raise DGZooError(
                    f"'{spec}' lists {first.name} and {second.name}, two variants of one add-on that "
                    f"would both run; keep one"
                )
    return ALGORITHMS[host], classes


def resolve_hparams(spec: str, given: dict[str, Any], small_images: bool = False) -> dict[str, dict[str, Any]]:
    """Validate and fill hyperparameters per component: ``{'erm': {...}, 'gga': {...}}``.

    Host keys may be bare (``alpha=0.5``) or namespaced (``equilibrium.alpha=0.5``); add-on keys must carry the
    add-on's name (``gga.rho=1e-5``). Unknown keys are errors naming the valid ones. Defaults are DomainBed's
    small-image ones when ``small_images``.
    """
    host, addons = parse_algorithm(spec)
    components = {host.name: host.HPARAMS, **{a.name: a.HPARAMS for a in addons}}
    resolved = {
        name: {k: h.default_for(small_images) for k, h in declared.items()} for name, declared in components.items()
    }
    for raw_key, value in given.items():
        namespace, _, key = str(raw_key).rpartition(".")
        namespace = namespace or host.name
        if namespace not in components:
            known = [f"{n}.{k}" for n, d in components.items() for k in d]
            raise DGZooError(
                f"hparam '{raw_key}' does not belong to '{spec}'{suggest(str(raw_key), known)}; "
                f"valid: {', '.join(known) or 'none'}"
            )
        declared = components[namespace]
        if key not in declared:
            # A bare key of an add-on (`rho` for erm+gga) is that add-on's: name it with its namespace.
            owners = [f"{n}.{key}" for n, d in components.items() if n != namespace and key in d]
            hint = f" (did you mean: {', '.join(owners)}?)" if owners else suggest(key, declared)
            raise DGZooError(
                f"unknown hparam '{raw_key}' for {namespace}{hint}; valid: {', '.join(sorted(declared)) or 'none'}"
            )
        resolved[namespace][key] = declared[key].coerce(value, str(raw_key))
    for component in (host, *addons):
        component.check_hparams(resolved[component.name])
    return resolved


def check_algorithm(spec: str, given: dict[str, Any], recipe: Recipe) -> dict[str, dict[str, Any]]:
    """Validate ``spec`` and its hyperparameters against ``recipe`` completely; return the resolved hparams.

    The one validation of an algorithm: everything a constructor could find wrong is found here.
    """
    resolved = resolve_hparams(spec, given, recipe.small_images)
    host, addons = parse_algorithm(spec)
    for component in (host, *addons):
        component.check_recipe(resolved[component.name], recipe)
    return resolved


def schedule_warnings(spec: str, resolved: dict[str, dict[str, Any]], schedule: Schedule) -> list[str]:
    """Each component's :meth:`~dgzoo.algorithms.base.Component.schedule_warnings` for a run of ``schedule``'s
    length: the plan says so before training when a method asked for will not act."""
    host, addons = parse_algorithm(spec)
    return [w for component in (host, *addons) for w in component.schedule_warnings(resolved[component.name], schedule)]


OptimizerFactory = Callable[[list[dict[str, Any]]], torch.optim.Optimizer]
Prepare = Callable[..., Any]


def default_optimizer(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """Adam at lr 1e-3 (dgzoo's recipe default), for algorithms built outside the engine (tests, notebooks)."""
    return torch.optim.Adam(groups, lr=1e-3)


def create_algorithm(
    spec: str,
    network: nn.Module,
    num_domains: int,
    hparams: dict[str, Any] | dict[str, dict[str, Any]] | None = None,
    *,
    num_classes: int | None = None,
    runtime: Runtime | None = None,
    make_optimizer: OptimizerFactory = default_optimizer,
    prepare: Prepare | None = None,
    loss_step: LossStep = plain_loss_step,
    small_images: bool = False,
    resolved: bool = False,
) -> Composition:
    """Build ``host+addon+...`` around the timm ``network`` for ``num_domains`` training domains.

    ``hparams`` are given ones (validated here, with every recipe check that needs no data:
    :func:`check_algorithm` on this network) or, with ``resolved=True``, the output of :func:`check_algorithm`.
    ``num_classes`` defaults to the network's.
    Each optimizer the host declares is made by ``make_optimizer`` from its groups; ``prepare(host, *optimizers)``
    (Accelerate's ``prepare``) wraps them, default none. Add-ons are built last, on the attached host.
    """
    runtime = runtime or Runtime()
    host_cls, addon_classes = parse_algorithm(spec)
    num_classes = network.num_classes if num_classes is None else num_classes
    if not resolved:
        recipe = Recipe(
            num_domains=num_domains,
            num_classes=num_classes,
            small_images=small_images,
            mixed_precision=runtime.mixed_precision(),
            network=network,
        )
        hparams = check_algorithm(spec, hparams or {}, recipe)
    hparams = cast("dict[str, dict[str, Any]]", hparams)  # resolved=True: the caller gives check_algorithm's output
    host = host_cls(network, num_classes, num_domains, hparams[host_cls.name])
    host.to(runtime.device)
    groups = host.optimizer_groups()
    optimizers = [make_optimizer(g) for g in groups.values()]
    prepared = host
    if prepare is not None:
        prepared, *optimizers = prepare(host, *optimizers)
    host.attach(runtime, dict(zip(groups, optimizers)), prepared)
    addons = [cls(host, hparams[cls.name], runtime) for cls in addon_classes]
    return Composition(host, addons, hparams, loss_step)


@dataclass(frozen=True)
class AlgorithmInfo:
    """One entry of :func:`list_algorithms`."""

    name: str
    kind: str  # "loss host", "update host" or "add-on"
    title: str
    paper: str
    hparams: dict[str, HParam]
    module: str


def list_algorithms(kind: str | None = None) -> list[AlgorithmInfo]:
    """Every registered host and add-on (``kind``: 'host' or 'add-on' to list one of them), sorted by name."""
    entries: list[tuple[type[Component], str]] = []
    if kind in (None, "host"):
        entries += [(cls, f"{cls.KIND} host") for cls in ALGORITHMS.values()]
    if kind in (None, "add-on"):
        entries += [(cls, "add-on") for cls in ADDONS.values()]
    return sorted(
        (
            AlgorithmInfo(cls.name, what, cls.title or cls.name, cls.paper, dict(cls.HPARAMS), cls.__module__)
            for cls, what in entries
        ),
        key=lambda info: (info.kind == "add-on", info.name),
    )


def describe(names: Sequence[str] | None = None) -> str:
    """A plain-text listing of algorithms (``names``, or every one) with their papers and hyperparameters."""
    lines = []
    for info in list_algorithms():
        if names and info.name not in names:
            continue
        lines.append(f"{info.name}  [{info.kind}]  {info.title}" + (f" ({info.paper})" if info.paper else ""))
        for key, hp in sorted(info.hparams.items()):
            lines.append(f"    {key}: {hp.help} [{hp.describe()}]")
    return "\n".join(lines)
