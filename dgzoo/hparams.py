"""Declared hyperparameters and their random-search distributions.

Every tunable value of dgzoo is declared once, where it is used, with :class:`HParam`: its default (which fixes its
type), what it means, the values it may take, and the distribution a random search draws it from. That is
DomainBed's ``_hparam(name, default, random_fn)``, with DomainBed's distinction between image datasets and small
images (its MNIST-like datasets) kept as a second default and distribution. The sweep reads the distributions from
these declarations; per-dataset exceptions stay with the sweep.

Distributions print and parse as text (``10**U(-5, -3.5)``, ``int(2**U(3, 9))``, ``choice(0, 0.1, 0.5)``), so a
sweep spec can override one and a manifest records what was searched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import yaml

from .errors import DGZooError, suggest


@dataclass(frozen=True)
class Uniform:
    """``U(low, high)``, optionally as an exponent (``10**U(-5, -3.5)``) and truncated to int (``int(2**U(3, 9))``)."""

    low: float
    high: float
    base: float | None = None
    integer: bool = False

    def sample(self, rng: np.random.RandomState) -> float | int:
        value = rng.uniform(self.low, self.high)
        value = self.base**value if self.base is not None else value
        return int(value) if self.integer else float(value)

    def __str__(self) -> str:
        text = f"U({_num(self.low)}, {_num(self.high)})"
        text = f"{_num(self.base)}**{text}" if self.base is not None else text
        return f"int({text})" if self.integer else text


@dataclass(frozen=True)
class Choice:
    """``choice(a, b, ...)``: one of the values, each equally likely."""

    values: tuple[Any, ...]

    def sample(self, rng: np.random.RandomState) -> Any:
        return self.values[rng.randint(len(self.values))]

    def __str__(self) -> str:
        return f"choice({', '.join(map(str, self.values))})"


Distribution = Uniform | Choice
_UNIFORM = re.compile(r"^(int\()?\s*(?:([0-9.eE+-]+)\s*\*\*\s*)?U\(\s*([^,()]+?)\s*,\s*([^,()]+?)\s*\)\s*(\))?$")


def parse_distribution(text: Any, key: str) -> Distribution | None:
    """Parse ``U(a, b)``, ``10**U(a, b)``, ``int(2**U(a, b))``, ``choice(a, b, ...)`` or a YAML list (a choice).

    ``None`` (YAML ``null``) means "not searched": the key keeps the recipe's value in every sample.
    """
    if text is None or isinstance(text, (Uniform, Choice)):
        return text
    if isinstance(text, (list, tuple)):
        return Choice(tuple(text))
    raw = str(text).strip()
    if raw.startswith("choice(") and raw.endswith(")"):
        return Choice(tuple(parse_scalar(v) for v in raw[len("choice(") : -1].split(",")))
    match = _UNIFORM.match(raw)
    if match and bool(match.group(1)) == bool(match.group(5)):  # int( ... ) opened and closed
        try:
            return Uniform(
                float(match.group(3)),
                float(match.group(4)),
                float(match.group(2)) if match.group(2) else None,
                integer=bool(match.group(1)),
            )
        except ValueError:  # bounds that are not numbers: the error below says what to write
            pass
    raise DGZooError(
        f"search distribution for '{key}' is '{raw}'; write U(a, b), 10**U(a, b), int(2**U(a, b)), "
        f"choice(a, b, ...) or null"
    )


def _num(value: float) -> str:
    return f"{value:g}"


def parse_scalar(raw: str) -> Any:
    """Parse a command-line value the way YAML would ('1e-5' -> 1e-05, 'true' -> True, 'a,b' stays text)."""
    raw = raw.strip()
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value):
        return float(value)  # YAML 1.1 reads 1e-5 (no dot) as a string
    return value if isinstance(value, (int, float, bool, str, list)) or value is None else raw


class _Same:
    """Marker: the small-images value is the image-dataset one."""

    def __repr__(self) -> str:
        return "SAME"


SAME: Any = _Same()


@dataclass(frozen=True)
class HParam:
    """A declared hyperparameter: default (which fixes its type), meaning, allowed values, search distribution.

    ``search`` is the random-search distribution on image datasets (None: not searched); ``small_default`` and
    ``small_search`` are DomainBed's values for small-image datasets (rotated/colored digits), when they differ.
    """

    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    search: Distribution | None = None
    small_default: Any = SAME
    small_search: Distribution | None | _Same = SAME

    def default_for(self, small_images: bool) -> Any:
        """The default on small-image datasets (``small_images``) or image datasets."""
        return self.default if not small_images or self.small_default is SAME else self.small_default

    def search_for(self, small_images: bool) -> Distribution | None:
        """The random-search distribution on small-image or image datasets (None: not searched)."""
        small = self.small_search
        return self.search if not small_images or isinstance(small, _Same) else small

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
        if kind is float and not np.isfinite(value):
            raise DGZooError(f"hparam {key}={value} is not a finite number; give a finite value")
        if self.choices is not None and value not in self.choices:
            raise DGZooError(
                f"hparam {key}={value!r} is not one of {', '.join(map(str, self.choices))}"
                f"{suggest(str(value), map(str, self.choices))}"
            )
        if self.minimum is not None and value < self.minimum:
            raise DGZooError(f"hparam {key}={value} must be at least {self.minimum}")
        if self.maximum is not None and value > self.maximum:
            raise DGZooError(f"hparam {key}={value} must be at most {self.maximum}")
        return value

    def describe(self) -> str:
        """One line for listings: default, allowed values and search distribution."""
        parts = [f"default {self.default!r}"]
        if self.small_default is not SAME:
            parts.append(f"small images {self.small_default!r}")
        if self.choices is not None:
            parts.append("one of " + ", ".join(map(str, self.choices)))
        elif self.minimum is not None or self.maximum is not None:
            low = "-inf" if self.minimum is None else _num(self.minimum)
            high = "inf" if self.maximum is None else _num(self.maximum)
            parts.append(f"in [{low}, {high}]")
        if self.search is not None:
            parts.append(f"search {self.search}")
        if self.small_search is not SAME:
            parts.append(f"small-images search {self.small_search or 'none'}")
        return "; ".join(parts)
