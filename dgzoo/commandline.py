"""One way to write a recipe back as a command line: a flag for every setting that differs from its default.

Sweeps (the command each run trains with), model cards (the command that reproduces a run) and unlearning cards
all write a config as flags; they share this one serializer so every value is shell-quoted alike (``shlex``) and
the command reads back, through the same CLI, as the config it came from.
"""

from __future__ import annotations

import shlex
from collections.abc import Collection, Mapping
from typing import Any


def _text(value: Any) -> str:
    # repr keeps every digit of a float (str does too on Python 3, but repr says so)
    return repr(value) if isinstance(value, float) else str(value)


def flag_groups(
    values: Mapping[str, Any],
    defaults: Mapping[str, Any],
    skip: Collection[str] = (),
    always: Collection[str] = (),
    omit_empty: bool = False,
) -> list[list[str]]:
    """The flags that set ``values`` over ``defaults``, one argument list per setting (``['--lr', '0.0003']``).

    A setting equal to its default is left out unless it is in ``always``; ``skip`` settings never appear;
    ``omit_empty`` leaves out ``None``, ``[]`` and ``{}`` (otherwise ``None`` is written ``none``, which the CLI
    reads back as None). Booleans are ``--flag`` / ``--no-flag``, lists one argument per item, mappings one
    ``KEY=VALUE`` argument per entry (the ``--hparams`` form)."""
    groups: list[list[str]] = []
    for key, value in values.items():
        if key in skip or (key not in always and value == defaults.get(key)):
            continue
        if omit_empty and (value is None or (isinstance(value, (list, dict)) and not value)):
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            groups.append([flag if value else "--no-" + key.replace("_", "-")])
        elif value is None:
            groups.append([flag, "none"])
        elif isinstance(value, (list, tuple)):
            groups.append([flag, *(str(v) for v in value)])
        elif isinstance(value, dict):
            groups.append([flag, *(f"{k}={_text(v)}" for k, v in value.items())])
        else:
            groups.append([flag, _text(value)])
    return groups


def config_argv(
    values: Mapping[str, Any],
    defaults: Mapping[str, Any],
    skip: Collection[str] = (),
    always: Collection[str] = (),
    omit_empty: bool = False,
) -> list[str]:
    """The flags of :func:`flag_groups` as one argument list (what ``parse_args`` takes)."""
    return [arg for group in flag_groups(values, defaults, skip, always, omit_empty) for arg in group]


def command_line(head: str, groups: list[list[str]], separator: str = " ") -> str:
    """``head`` (a shell fragment such as ``accelerate launch recipes/train.py``, written as is) followed by every
    group shell-quoted, the groups joined by ``separator`` (a backslash, newline and indent: one setting a line)."""
    return separator.join([head, *(shlex.join(group) for group in groups)])
