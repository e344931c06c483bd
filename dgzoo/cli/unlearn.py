"""``dgzoo unlearn SOURCE --forget SPEC --method sure|retrain|finetune|gradient_ascent|random_labels``.

The same flags back ``recipes/unlearn.py`` (for ``accelerate launch``) and the ``dgzoo`` command.
"""
from __future__ import annotations

import argparse
from typing import Any

from ..config import OPTIMIZERS, PRECISIONS, UnlearnConfig, normalize_hparams
from ..unlearning.methods import METHOD_CHOICES

EXAMPLES = """examples:
  dgzoo unlearn runs/my-run --forget class=3 --method retrain --output-dir runs/retrain-3
  dgzoo unlearn runs/my-run --forget class=3 --method sure --reference runs/retrain-3
  dgzoo unlearn me/pacs-resnet50-erm --forget class=dog:0.1 --hparams lambda=0.5 --push-to-hub me/pacs-forget-dogs
"""


def add_unlearn_arguments(parser: argparse.ArgumentParser) -> None:
    """Every ``dgzoo unlearn`` flag. Unset optional values fall back to the source run's recipe."""
    parser.add_argument("source", help="run directory or Hub repo id of a finished dgzoo run")
    parser.add_argument("--forget", required=True, action="append", metavar="CLAUSE",
                        help="what to forget: class=C, class=C:FRACTION, domain=D, indices=I,J,K-L, "
                             "indices-file=PATH; repeat the flag to intersect class and domain clauses "
                             "(--forget class=3 --forget domain=15)")
    parser.add_argument("--method", default="sure", choices=METHOD_CHOICES,
                        help="unlearning method; retrain is the gold standard (default: sure)")
    parser.add_argument("--revision", help="revision of a Hub source (branch, tag or commit sha)")
    parser.add_argument("--steps", type=int, help="unlearning steps (default: 10%% of the source run's; "
                                                  "retrain: all of them)")
    parser.add_argument("--batch-size", type=int, help="retain images per source domain per step "
                                                       "(default: the source run's)")
    parser.add_argument("--forget-batch-size", type=int, help="forget (and validation) images per step "
                                                              "(default: --batch-size)")
    parser.add_argument("--lr", type=float, help="learning rate (default: the source run's)")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, help="optimizer (default: the source run's)")
    parser.add_argument("--weight-decay", type=float, help="weight decay (default: the source run's)")
    parser.add_argument("--seed", type=int, help="seed of the data order and of fractional forget sets "
                                                 "(default: the source run's)")
    parser.add_argument("--validation-fraction", type=float, default=0.5,
                        help="share of the unseen source images given to the methods as validation; the rest is "
                             "the untouched test set (default: 0.5)")
    parser.add_argument("--hparams", nargs="+", metavar="KEY=VALUE", default=[],
                        help="method hyperparameters, e.g. lambda=0.5 disc_hidden=0 (see docs/unlearning.md)")
    parser.add_argument("--reference", help="run directory of `--method retrain` for the same source and forget "
                                            "set: every metric is compared with it")
    parser.add_argument("--output-dir", help="run directory (default: runs/<source>-unlearn-<method>-<forget>)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run in --output-dir")
    parser.add_argument("--eval-batch-size", type=int, default=128, help="evaluation batch size (default: 128)")
    parser.add_argument("--num-workers", type=int, help="data-loading workers (default: 0 on CPU, 4 on GPU)")
    parser.add_argument("--mixed-precision", default="no", choices=PRECISIONS, help="passed to Accelerate")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="publish the unlearned run to this Hub repo")
    parser.add_argument("--hub-private", action="store_true", help="create the Hub repo as private")


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
    parser = subparsers.add_parser("unlearn", help="remove a forget set from a trained run (SURE and baselines)",
                                   epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_unlearn_arguments(parser)
    parser.set_defaults(handler=_unlearn)
