"""Hosts (``erm``, ``coral``, ...) and add-ons (``+gga``, ``+iu``, ...), created by name with :func:`create_algorithm`.

Layers: :mod:`.runtime` (what an algorithm may ask of the distributed runtime) and :mod:`.base` (the contract) at
the bottom, :mod:`.composition` (a host with its add-ons, driven by the engine) and :mod:`.registry` (names,
validation, the factory) above, the per-domain gradient engine (:mod:`.gradients`) and the methods, one module per
family, on top. Importing this package registers every method
and the ``dgzoo.algorithms`` entry points of installed plugins.
"""

from ..hparams import HParam
from . import (  # noqa: F401  (importing registers them)
    adversarial,
    alignment,
    averaging,
    contrastive,
    equilibrium,
    erm,
    gga,
    invariance,
    iu,
    meta,
    miro,
    mixing,
    networks,
    robust,
    sharpness,
    surgery,
)
from .base import (
    AddOn,
    Algorithm,
    EpochContext,
    EvalContext,
    FirstAction,
    LossHost,
    Metrics,
    Minibatches,
    Recipe,
    Schedule,
    StepContext,
    UpdateHost,
)
from .composition import Composition, flat_hparams
from .registry import (
    ADDONS,
    ALGORITHMS,
    AlgorithmInfo,
    check_algorithm,
    create_algorithm,
    describe,
    list_algorithms,
    load_entry_points,
    parse_algorithm,
    register_addon,
    register_algorithm,
    resolve_hparams,
    schedule_warnings,
)
from .runtime import Runtime

load_entry_points()

__all__ = [
    "ADDONS",
    "ALGORITHMS",
    "AddOn",
    "Algorithm",
    "AlgorithmInfo",
    "Composition",
    "EpochContext",
    "EvalContext",
    "FirstAction",
    "HParam",
    "LossHost",
    "Metrics",
    "Minibatches",
    "Recipe",
    "Runtime",
    "Schedule",
    "StepContext",
    "UpdateHost",
    "check_algorithm",
    "create_algorithm",
    "describe",
    "flat_hparams",
    "list_algorithms",
    "load_entry_points",
    "parse_algorithm",
    "register_addon",
    "register_algorithm",
    "resolve_hparams",
    "schedule_warnings",
]
