"""The ``dgzoo`` command: ``dgzoo train|datasets ...`` on the same code paths as the recipes."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence

from ..errors import DGZooError, write_error

Handler = Callable[[argparse.Namespace], int]

# Modules that add sub-commands, with the commands (or command groups) they add. Each defines
# ``register_cli(subparsers, groups)``, where ``groups`` maps a group name ("datasets") to its sub-parsers, and sets
# ``handler`` on the parsers it adds. Only the module of the command being run is imported (some import torch,
# which takes seconds), except for ``--help``, which lists them all.
COMMAND_MODULES: dict[str, tuple[str, ...]] = {
    "dgzoo.cli.hub": ("push", "eval", "datasets"),
    "dgzoo.cli.unlearn": ("unlearn",),
    "dgzoo.cli.sweep": ("sweep", "report"),
    "dgzoo.cli.soup": ("soup",),
    "dgzoo.cli.algorithms": ("algorithms",),
    "dgzoo.cli.zoo": ("zoo",),
    "dgzoo.cli.datasets": ("datasets",),
    "dgzoo.cli.doctor": ("doctor",),
}


def train_command(args: argparse.Namespace) -> int:
    """``dgzoo train`` and ``recipes/train.py``: train one run, or with ``--dry-run`` print its plan."""
    from ..config import config_from_args

    cfg = config_from_args(args)
    if cfg.dry_run:
        from ..training.dryrun import dry_run, format_plan

        plan = dry_run(cfg)
        if plan["is_main_process"]:
            print(format_plan(plan))
        return 0
    from ..training.engine import train

    train(cfg)
    return 0


def _datasets_list(args: argparse.Namespace) -> int:
    from ..data.registry import REGISTRY

    rows = [("name", "kind", "source", "domains")]
    for spec in REGISTRY.values():
        rows.append(
            (
                spec.name,
                spec.kind,
                spec.repo_id or ("embedded" if spec.kind == "builtin" else "image folders"),
                ", ".join(spec.domains),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3])
    return 0


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``dgzoo`` argument parser; with ``command``, only the modules providing that command are loaded."""
    from ..config import add_train_arguments

    parser = argparse.ArgumentParser(
        prog="dgzoo", description="Domain generalization with timm, Accelerate and the Hub."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train, evaluate and export one run (same flags as recipes/train.py)")
    add_train_arguments(train)
    train.set_defaults(handler=train_command)
    datasets = sub.add_parser("datasets", help="known DG datasets")
    datasets_sub = datasets.add_subparsers(dest="datasets_command", required=True)
    datasets_sub.add_parser("list", help="list the datasets dgzoo knows by name").set_defaults(handler=_datasets_list)
    known = {c for commands in COMMAND_MODULES.values() for c in commands} | {"train"}
    for module, commands in COMMAND_MODULES.items():
        if command is None or command not in known or command in commands:
            importlib.import_module(module).register_cli(sub, {"datasets": datasets_sub})
    return parser


def run(handler: Handler, args: argparse.Namespace) -> int:
    """Run a command, turning user errors into one line on stderr and an exit status (2; 75 for a run directory
    held by another process; 130 for Ctrl-C)."""
    try:
        return handler(args)
    except DGZooError as e:
        print(f"dgzoo: error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:  # no space, read-only, permission, a too-long name: wherever a file is written
        failed = write_error(e)
        if failed is None:
            raise
        print(f"dgzoo: error: {failed}", file=sys.stderr)
        return failed.exit_code
    except KeyboardInterrupt:  # a command without its own resume advice: nothing it wrote is left half-done
        print("dgzoo: interrupted", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    """The ``dgzoo`` command; ``argv`` None is the process's own command line (then a dry run ends the process)."""
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    status = run(args.handler, args)
    if from_command_line and getattr(args, "dry_run", False):
        exit_now(status)
    return status


def exit_now(status: int) -> None:
    """End the process at once with ``status``, once its output is flushed: what a dry run does after printing.

    A normal interpreter exit then tears down torch and the data libraries, which costs seconds (more on a busy
    machine) and does nothing a dry run needs: it has written nothing that could be left half-done.
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    sys.exit(main())
