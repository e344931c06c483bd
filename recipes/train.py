"""Train, evaluate and export one domain-generalization run.

    accelerate launch recipes/train.py                                   # embedded default, offline
    accelerate launch recipes/train.py --config recipes/configs/pacs_resnet50_erm.yaml --target-domains sketch
    accelerate launch --multi_gpu --num_processes 8 recipes/train.py --config ...
    python recipes/train.py --dry-run                                    # the plan and its time, nothing run
    python recipes/train.py --help                                       # every flag

Same flags and code path as `dgzoo train`.
"""

import argparse
import sys

from dgzoo.cli import run
from dgzoo.cli.app import exit_now, train_command
from dgzoo.config import add_train_arguments


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_arguments(parser)
    args = parser.parse_args()
    status = run(train_command, args)
    if getattr(args, "dry_run", False):  # the flag's default is suppressed: absent unless given
        exit_now(status)  # printed is done: skip the interpreter's seconds-long teardown of torch
    return status


if __name__ == "__main__":
    sys.exit(main())
