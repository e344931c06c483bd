"""Algorithms (``erm``, ...) and add-ons (``+gga``, ``+iu``, ...), created by name with :func:`create_algorithm`."""
from . import erm  # noqa: F401  (registers)
from . import equilibrium, surgery  # noqa: F401  (registers)
from . import gga  # noqa: F401  (registers)
from . import iu  # noqa: F401  (registers)
from .base import (ADDONS, ALGORITHMS, AddOn, Algorithm, Composition, EpochContext, HParam, create_algorithm,
                   parse_algorithm, register_addon, register_algorithm, resolve_hparams)

__all__ = ["ADDONS", "ALGORITHMS", "AddOn", "Algorithm", "Composition", "EpochContext", "HParam",
           "create_algorithm", "parse_algorithm", "register_addon", "register_algorithm", "resolve_hparams"]
