"""User-facing errors.

Every mistake a user can make in a recipe (a misspelled backbone, a domain that does not exist, an output
directory that holds another run) is raised as :class:`DGZooError` with a one-line message that names the
problem and the fix. The command line prints that line and exits with status 2, before any training starts.
"""
from __future__ import annotations

import difflib
from typing import Iterable


class DGZooError(Exception):
    """A problem with the user's input, reported as one line that says how to fix it."""

    exit_code = 2  # what the command line exits with

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def suggest(word: str, choices: Iterable[str], n: int = 3) -> str:
    """Return a ' (did you mean: a, b?)' hint for ``word`` among ``choices``, or '' when nothing is close."""
    choices = [str(c) for c in choices]
    close = difflib.get_close_matches(str(word), choices, n=n, cutoff=0.6)
    if not close:
        lowered = {c.lower(): c for c in choices}
        close = [lowered[c] for c in difflib.get_close_matches(str(word).lower(), list(lowered), n=n, cutoff=0.6)]
    return f" (did you mean: {', '.join(close)}?)" if close else ""


class Interrupted(DGZooError):
    """The user stopped a command (Ctrl-C); the message says how to continue where it stopped."""

    exit_code = 130  # the shell's convention for SIGINT
