"""Unlearn a forget set from a finished dgzoo run, and evaluate how well it was forgotten.

    accelerate launch recipes/unlearn.py runs/my-run --forget class=3 --method retrain --output-dir runs/r3
    accelerate launch recipes/unlearn.py runs/my-run --forget class=3:0.1 --method sure --reference runs/r3
    accelerate launch --multi_gpu --num_processes 8 recipes/unlearn.py me/pacs-resnet50-erm --forget domain=photo
    python recipes/unlearn.py --help                                       # every flag

Same flags and code path as `dgzoo unlearn`.
"""

import argparse
import sys

from dgzoo.cli import run
from dgzoo.cli.unlearn import add_unlearn_arguments, config_from_args
from dgzoo.unlearning.recipe import unlearn


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_unlearn_arguments(parser)
    args = parser.parse_args()
    return run(lambda a: unlearn(config_from_args(a)) and 0, args)


if __name__ == "__main__":
    sys.exit(main())
