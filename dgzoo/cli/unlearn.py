"""``dgzoo unlearn SOURCE --forget SPEC --method sure|retrain|finetune|gradient_ascent|random_labels``.

The same flags back ``recipes/unlearn.py`` (for ``accelerate launch``) and the ``dgzoo`` command.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..config import UnlearnConfig, add_dataclass_arguments, normalize_hparams
from ..unlearning.methods import METHOD_CHOICES

EXAMPLES = """examples:
  dgzoo unlearn runs/my-run --forget class=3 --method retrain --output-dir runs/retrain-3
  dgzoo unlearn runs/my-run --forget class=3 --method sure --reference runs/retrain-3
  dgzoo unlearn me/pacs-resnet50-erm --forget class=dog:0.1 --hparams lambda=0.5 --push-to-hub me/pacs-forget-dogs
"""


def add_unlearn_arguments(parser: argparse.ArgumentParser) -> None:
    """Every ``dgzoo unlearn`` flag, one per :class:`UnlearnConfig` field. Unset optional values fall back to the
    source run's recipe."""
    parser.add_argument("source", help="run directory or Hub repo id of a finished dgzoo run")
    parser.add_argument(
        "--forget",
        required=True,
        action="append",
        metavar="CLAUSE",
        help="what to forget: class=C, class=C:FRACTION, domain=D, indices=I,J,K-L, "
        "indices-file=PATH; repeat the flag to intersect class and domain clauses "
        "(--forget class=3 --forget domain=15)",
    )
    add_dataclass_arguments(parser, UnlearnConfig, skip=("source", "forget"), choices={"method": METHOD_CHOICES})


def config_from_args(args: argparse.Namespace) -> UnlearnConfig:
    """Build an :class:`UnlearnConfig` from parsed flags."""
    values: dict[str, Any] = {k: v for k, v in vars(args).items() if k in UnlearnConfig.__dataclass_fields__}
    values["forget"] = " ".join(args.forget)
    values["hparams"] = normalize_hparams(args.hparams, "command line")
    return UnlearnConfig(**values)


def _unlearn(args: argparse.Namespace) -> int:
    from ..unlearning.recipe import unlearn

    unlearn(config_from_args(args))
    return 0


def register_cli(subparsers: Any, groups: dict[str, Any]) -> None:
    """Add ``dgzoo unlearn`` (called by ``dgzoo.cli`` through ``COMMAND_MODULES``)."""
    parser = subparsers.add_parser(
        "unlearn",
        help="remove a forget set from a trained run (SURE and baselines)",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_unlearn_arguments(parser)
    parser.set_defaults(handler=_unlearn)
