"""The ``dgzoo soup`` command: average the weights of runs into one checkpoint (registered through
``dgzoo.cli.COMMAND_MODULES``)."""

from __future__ import annotations

import argparse
from typing import Any

SOUP_METHODS = ("uniform", "greedy", "top-k")  # dgzoo.experiments.soup.SOUP_METHODS, without importing torch


def register_cli(subparsers: Any, groups: dict[str, Any]) -> None:
    """Add ``soup`` to the ``dgzoo`` command."""
    soup = subparsers.add_parser(
        "soup",
        help="average the weights of runs fine-tuned from one init (model soups, DiWA) into one checkpoint",
        description="Average the weights of finished runs (run directories, a sweep's output_dir, Hub repos "
        "REPO@REV) into one timm checkpoint, recompute its BatchNorm statistics on source training "
        "batches, evaluate it on every domain split and write it as a run directory. See docs/soups.md.",
    )
    soup.add_argument(
        "ingredients",
        nargs="+",
        metavar="INGREDIENT",
        help="run directories, a sweep folder (its finished runs of one cell), or Hub repos REPO@REV",
    )
    soup.add_argument("--output-dir", required=True, help="the soup's run directory")
    soup.add_argument(
        "--method",
        choices=SOUP_METHODS,
        default="uniform",
        help="uniform: average every ingredient (DiWA); greedy: best source-validation first, keep each "
        "that does not lower the soup's source validation (model soups); top-k: the k best "
        "(default: uniform)",
    )
    soup.add_argument("--k", type=int, help="top-k: how many ingredients")
    soup.add_argument(
        "--cell",
        help="the cell of a sweep folder holding several: DATASET/ALGORITHM/HELD-OUT/trialN (the error lists them)",
    )
    soup.add_argument(
        "--bn-steps",
        type=int,
        default=500,
        metavar="N",
        help="source training batches over which the soup's BatchNorm statistics are recomputed "
        "(default: 500, as +swad; 0 keeps the averaged statistics)",
    )
    soup.add_argument(
        "--freeze-bn",
        action="store_true",
        default=None,
        help="keep the averaged BatchNorm statistics (for runs trained with --freeze-bn; the default "
        "when every ingredient was)",
    )
    soup.add_argument("--overwrite", action="store_true", help="replace a soup or run already in --output-dir")
    soup.add_argument("--num-workers", type=int, help="data-loading workers (default: 0 on CPU)")
    soup.add_argument("--eval-batch-size", type=int, default=128, help="evaluation batch size (default: 128)")
    soup.set_defaults(handler=_soup)


def _soup(args: argparse.Namespace) -> int:
    from ..experiments.soup import soup

    soup(
        args.ingredients,
        args.output_dir,
        method=args.method,
        k=args.k,
        cell=args.cell,
        bn_steps=args.bn_steps,
        freeze_bn=args.freeze_bn,
        overwrite=args.overwrite,
        eval_batch_size=args.eval_batch_size,
        num_workers=args.num_workers,
    )
    return 0
