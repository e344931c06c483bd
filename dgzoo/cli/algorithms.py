"""``dgzoo algorithms [NAME ...] [--json]``: every registered host and add-on, its paper and hyperparameters.

Without names, one line per algorithm; with names (or ``--all``), each with its hyperparameters: meaning,
default, allowed values and DomainBed-style search distribution. ``--json`` prints the same as data.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..algorithms import describe, list_algorithms
from ..errors import DGZooError, suggest


def register_cli(subparsers: Any, groups: dict[str, Any]) -> None:
    """Add ``algorithms`` to the ``dgzoo`` parser."""
    parser = subparsers.add_parser(
        "algorithms", help="list the algorithms and add-ons with their papers and hyperparameters"
    )
    parser.add_argument("names", nargs="*", metavar="NAME", help="show these in full (default: a one-line list)")
    parser.add_argument("--all", action="store_true", help="show every algorithm in full")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.set_defaults(handler=_algorithms)


def _algorithms(args: argparse.Namespace) -> int:
    infos = list_algorithms()
    known = [i.name for i in infos]
    for name in args.names:
        if name not in known:
            raise DGZooError(f"unknown algorithm '{name}'{suggest(name, known)}; run `dgzoo algorithms` for the list")
    chosen = [i for i in infos if not args.names or i.name in args.names]
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "name": i.name,
                        "kind": i.kind,
                        "title": i.title,
                        "paper": i.paper,
                        "module": i.module,
                        "hparams": {
                            k: {"default": h.default, "help": h.help, "describe": h.describe()}
                            for k, h in sorted(i.hparams.items())
                        },
                    }
                    for i in chosen
                ],
                indent=2,
                default=str,
            )
        )
    elif args.names or args.all:
        print(describe([i.name for i in chosen]))
    else:
        width = max(len(i.name) for i in chosen)
        for info in chosen:
            paper = f" ({info.paper})" if info.paper else ""
            print(f"{info.name.ljust(width)}  {info.kind.ljust(11)}  {info.title}{paper}")
    return 0
