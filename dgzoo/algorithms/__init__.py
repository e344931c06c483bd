"""Hosts (``erm``, ``coral``, ...) and add-ons (``+gga``, ``+iu``, ...), created by name with :func:`create_algorithm`.

Layers: :mod:`.runtime` (what an algorithm may ask of the distributed runtime) and :mod:`.base` (the contract) at
the bottom, :mod:`.registry` (names, validation, composition) above, the per-domain gradient engine
(:mod:`.gradients`) and the methods, one module per family, on top. Importing this package registers every method
and the ``dgzoo.algorithms`` entry points of installed plugins.
"""
from . import (adversarial, alignment, averaging, contrastive, equilibrium, erm, gga, invariance, iu,  # noqa: F401
               meta, miro, mixing, networks, robust, sharpness, surgery)  # importing registers them
from .base import (AddOn, Algorithm, EpochContext, EvalContext, FirstAction, LossHost, Metrics, Minibatches, Recipe,
                   Schedule, UpdateHost)
from .registry import (ADDONS, ALGORITHMS, AlgorithmInfo, Composition, check_algorithm, create_algorithm, describe,
                       flat_hparams, list_algorithms, load_entry_points, parse_algorithm, register_addon,
                       register_algorithm, resolve_hparams, schedule_warnings)
from .runtime import Runtime
from ..hparams import HParam

load_entry_points()

__all__ = ["ADDONS", "ALGORITHMS", "AddOn", "Algorithm", "AlgorithmInfo", "Composition", "EpochContext", "EvalContext",
           "FirstAction", "HParam", "LossHost", "Metrics", "Minibatches", "Recipe", "Runtime", "Schedule",
           "UpdateHost", "check_algorithm", "create_algorithm", "describe", "flat_hparams", "list_algorithms",
           "load_entry_points", "parse_algorithm", "register_addon", "register_algorithm", "resolve_hparams",
           "schedule_warnings"]
