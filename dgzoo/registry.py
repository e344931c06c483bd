"""One policy for every name registry (algorithms and add-ons, datasets, unlearning methods).

A registry maps a name to an entry. Names are normalised once, by the registry, on the way in and on every
lookup, so an entry is found by the name it was given. A name already taken is refused unless the caller says
``replace=True``: silently replacing an entry would change what every later use of that name means.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from .errors import DGZooError

T = TypeVar("T")


class RegistryError(DGZooError, ValueError):
    """A registration that would replace an entry, or a name the registry cannot hold.

    A :class:`ValueError` too, as registering a malformed class is a programming error as much as a user's."""


def _same(name: str) -> str:
    return name


class Registry(dict[str, T]):
    """A ``dict`` of name -> entry whose :meth:`add` follows the one registration policy.

    ``kind`` names the entries in messages (``dataset``); ``normalize`` turns a name into its key (default: as
    given); ``describe`` says what an entry is, so a refusal names what holds the name."""

    def __init__(
        self, kind: str, normalize: Callable[[str], str] = _same, describe: Callable[[Any], str] = repr
    ) -> None:
        super().__init__()
        self.kind = kind
        self.normalize = normalize
        self.describe = describe

    def copy(self) -> Registry[T]:
        """A registry with the same policy and entries (a ``dict``'s copy would lose the policy)."""
        twin: Registry[T] = Registry(self.kind, self.normalize, self.describe)
        twin.update(self)
        return twin

    def key(self, name: str) -> str:
        """The key ``name`` is stored and looked up under."""
        return self.normalize(str(name))

    def add(
        self,
        name: str,
        entry: T,
        replace: bool = False,
        fix: str = "register it under another name, or pass replace=True to replace the entry",
    ) -> str:
        """Store ``entry`` under ``name``'s key and return the key. A key held by another entry is refused (one
        line ending with ``fix``) unless ``replace``; registering the same entry again is a no-op."""
        key = self.key(name)
        if not key or key.strip() != key:
            raise RegistryError(
                f"{self.kind} name '{name}' is empty or has surrounding spaces; give a name such "
                f"as my-{self.kind.replace(' ', '-')}"
            )
        taken = self.get(key)
        if taken is not None and taken is not entry and not replace:
            raise RegistryError(f"{self.kind} '{key}' is already registered ({self.describe(taken)}); {fix}")
        self[key] = entry
        return key
