"""``dgzoo zoo list|leaderboard|best``: the published dgzoo checkpoints on the Hub.

    dgzoo zoo list --dataset pacs --held-out sketch
    dgzoo zoo leaderboard --dataset pacs [--format csv] [--plot DIR]
    dgzoo zoo best --dataset pacs --held-out sketch        # prints the repo id to load

A thin layer over :mod:`dgzoo.experiments.zoo`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .hub import TOKEN_HELP

FORMATS = ("markdown", "csv", "latex")


def _filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", help="registry name or Hub dataset repo id the models were trained on")
    parser.add_argument("--held-out", nargs="+", metavar="DOMAIN", help="held-out domain(s), exactly")
    parser.add_argument("--algorithm", help="algorithm as the card names it (e.g. erm, erm+gga)")
    parser.add_argument("--backbone", help="timm backbone name")
    parser.add_argument("--author", help="only models of this user or organisation")
    parser.add_argument("--token", help=TOKEN_HELP)


def register_cli(subparsers: Any, groups: dict[str, Any]) -> None:
    """Add ``zoo list``, ``zoo leaderboard`` and ``zoo best`` to the ``dgzoo`` parser."""
    from ..run.selection import REPORT_SELECTION_METHODS as SELECTION_METHODS

    zoo = subparsers.add_parser("zoo", help="published dgzoo checkpoints on the Hub: list, rank, pick the best")
    sub = zoo.add_subparsers(dest="zoo_command", required=True)
    listing = sub.add_parser("list", help="list published dgzoo checkpoints")
    _filters(listing)
    listing.add_argument("--json", action="store_true", help="print one JSON object per model")
    listing.set_defaults(handler=_list)
    board = sub.add_parser("leaderboard", help="mean ± standard error over trial seeds, as `dgzoo report` gives it")
    _filters(board)
    board.add_argument("--format", choices=FORMATS, default="markdown", help="printed format (default: markdown)")
    board.add_argument(
        "--selection",
        nargs="+",
        choices=SELECTION_METHODS,
        default=list(SELECTION_METHODS),
        metavar="METHOD",
        help="model-selection methods (default: all)",
    )
    board.add_argument("--plot", metavar="DIR", help="also write one accuracy plot per dataset into DIR")
    board.set_defaults(handler=_leaderboard)
    top = sub.add_parser("best", help="print the repo id of the best checkpoint (top row, best trial)")
    _filters(top)
    top.add_argument(
        "--selection",
        choices=SELECTION_METHODS,
        default="training_domain_validation",
        help="model-selection method that ranks (default: training_domain_validation)",
    )
    top.set_defaults(handler=_best)


def _found(args: argparse.Namespace) -> list[Any]:
    from ..experiments.zoo import list_models

    return list_models(
        dataset=args.dataset,
        held_out=args.held_out,
        algorithm=args.algorithm,
        backbone=args.backbone,
        author=args.author,
        token=args.token,
    )


def _list(args: argparse.Namespace) -> int:
    models = _found(args)
    if args.json:
        for m in models:
            print(
                json.dumps(
                    {
                        "repo_id": m.repo_id,
                        "sha": m.sha,
                        "dataset": m.dataset,
                        "held_out": list(m.held_out),
                        "algorithm": m.algorithm,
                        "backbone": m.backbone,
                        "accuracy": m.accuracy,
                    }
                )
            )
        return 0
    rows = [("repo", "dataset", "held-out", "algorithm", "backbone", "accuracy (%)")]
    rows += [(m.repo_id, m.dataset, "+".join(m.held_out), m.algorithm, m.backbone, f"{m.accuracy:.1f}") for m in models]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    if not models:
        print("no published dgzoo model matches", file=sys.stderr)
    return 0


def _leaderboard(args: argparse.Namespace) -> int:
    from ..experiments.zoo import leaderboard

    board = leaderboard(_found(args), args.selection, token=args.token)
    sys.stdout.write(board.report.render(args.format))
    if args.format != "markdown":  # Markdown lists the notes under its tables, as `dgzoo report` does
        for note in board.report.notes:
            print(f"note: {note}", file=sys.stderr)
    if args.plot:
        for path in board.report.plot(args.plot):
            print(f"wrote {path}", file=sys.stderr)
    return 0


def _best(args: argparse.Namespace) -> int:
    from ..experiments.zoo import best, leaderboard

    print(best(leaderboard(_found(args), [args.selection], token=args.token), args.selection))
    return 0
