"""The ``dgzoo`` command: ``dgzoo train|datasets ...`` on the same code paths as the recipes."""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable, Sequence

from .errors import DGZooError

Handler = Callable[[argparse.Namespace], int]

# Modules that add sub-commands. Each defines ``register_cli(subparsers, groups)``, where ``groups`` maps a
# command group name (e.g. "datasets") to its sub-parsers, and sets ``handler`` on the parsers it adds.
COMMAND_MODULES: tuple[str, ...] = ("dgzoo.hub_cli", "dgzoo.unlearning.cli", "dgzoo.sweep_cli")


def _train(args: argparse.Namespace) -> int:
    from .config import config_from_args
    from .engine import train

    train(config_from_args(args))
    return 0


def _datasets_list(args: argparse.Namespace) -> int:
    from .data.registry import REGISTRY

    rows = [("name", "kind", "source", "domains")]
    for spec in REGISTRY.values():
        rows.append((spec.name, spec.kind, spec.repo_id or ("embedded" if spec.kind == "builtin" else "image folders"),
                     ", ".join(spec.domains)))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3])
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The full ``dgzoo`` argument parser (sub-commands register their own flags)."""
    from .config import add_train_arguments

    parser = argparse.ArgumentParser(prog="dgzoo", description="Domain generalization with timm, Accelerate and the Hub.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train, evaluate and export one run (same flags as recipes/train.py)")
    add_train_arguments(train)
    train.set_defaults(handler=_train)
    datasets = sub.add_parser("datasets", help="known DG datasets")
    datasets_sub = datasets.add_subparsers(dest="datasets_command", required=True)
    datasets_sub.add_parser("list", help="list the datasets dgzoo knows by name").set_defaults(handler=_datasets_list)
    for module in COMMAND_MODULES:
        importlib.import_module(module).register_cli(sub, {"datasets": datasets_sub})
    return parser


def run(handler: Handler, args: argparse.Namespace) -> int:
    """Run a command, turning user errors into one line on stderr and exit status 2."""
    try:
        return handler(args)
    except DGZooError as e:
        print(f"dgzoo: error: {e}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run(args.handler, args)


if __name__ == "__main__":
    sys.exit(main())
