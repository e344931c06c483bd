"""Train, evaluate and export one domain-generalization run.

    accelerate launch recipes/train.py                                   # embedded default, offline
    accelerate launch recipes/train.py --config recipes/configs/pacs_resnet50_erm.yaml --target-domains sketch
    accelerate launch --multi_gpu --num_processes 8 recipes/train.py --config ...
    python recipes/train.py --help                                       # every flag

Same flags and code path as `dgzoo train`.
"""
import argparse
import sys

from dgzoo.cli import run
from dgzoo.config import add_train_arguments, config_from_args
from dgzoo.training.engine import train


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(parser)
    args = parser.parse_args()
    return run(lambda a: train(config_from_args(a)) and 0, args)


if __name__ == "__main__":
    sys.exit(main())
