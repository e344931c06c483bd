"""The one config -> command line serializer (dgzoo.commandline): what a sweep runs, a model card and an
unlearning card print reads back, through the same CLI, as the config it came from."""

import shlex

from dgzoo.cli.app import build_parser
from dgzoo.cli.unlearn import config_from_args as unlearn_config_from_args
from dgzoo.config import TrainConfig, UnlearnConfig, config_from_args
from dgzoo.experiments.sweep import train_command
from dgzoo.run.cards import reproduce_command
from dgzoo.run.unlearning_card import reproduce_command as unlearn_command


def _parse_train(command: str, head_words: int) -> TrainConfig:
    argv = shlex.split(command)[head_words:]
    return config_from_args(build_parser("train").parse_args(["train", *argv]))


AWKWARD = TrainConfig(
    dataset='my data/it\'s "here"',
    target_domains=["art painting", "photo"],
    source_domains=None,
    algorithm="erm+gga",
    hparams={"gga.rho": 1e-5, "note": "a b;c", "gga.window": 3},
    lr=3.14159e-4,
    pretrained=True,
    output_dir="runs/with space/$HOME",
    seed=7,
    split_seed=3,
    backbone="resnet18",
    holdout_fraction=0.25,
    augment="none",
)


def test_sweep_command_round_trips_awkward_values():
    cfg = AWKWARD
    assert _parse_train(train_command(cfg, "accelerate launch recipes/train.py"), 3) == cfg


def test_sweep_command_keeps_defaults_it_always_writes():
    cfg = TrainConfig(target_domains=["0"], output_dir="runs/x", eval_batch_size=64, pretrained=False)
    back = _parse_train(train_command(cfg, "dgzoo train"), 2)
    assert back == cfg


def test_card_command_round_trips_every_setting_it_keeps():
    command = reproduce_command(AWKWARD.to_dict())
    assert command.startswith("accelerate launch recipes/train.py \\\n    ")
    back = _parse_train(command.replace("\\\n", " "), 3)
    # the card leaves out where and how the run was written, nothing else
    assert back == TrainConfig.from_dict({**AWKWARD.to_dict(), "output_dir": None})


def test_unlearning_card_command_round_trips():
    cfg = UnlearnConfig(
        source="runs/my run",
        forget="class=3 domain=art",
        method="sure",
        lr=1e-4,
        hparams={"lambda": 0.5, "tag": "x y"},
        seed=2,
        validation_fraction=0.3,
    )
    command = unlearn_command(cfg.to_dict()).replace("\\\n", " ")
    argv = shlex.split(command)[1:]
    back = unlearn_config_from_args(build_parser("unlearn").parse_args(argv))
    assert back == cfg
