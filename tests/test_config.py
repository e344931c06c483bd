"""Recipes: YAML + flags merge, validation, and one-line errors for every malformed input."""

import argparse
from pathlib import Path

import pytest

from dgzoo.config import TrainConfig, add_train_arguments, config_from_args, normalize_hparams, parse_scalar
from dgzoo.errors import DGZooError

ROOT = Path(__file__).resolve().parent.parent


def parse(argv):
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    return config_from_args(parser.parse_args(argv))


def test_defaults_are_the_embedded_job():
    cfg = TrainConfig()
    cfg.validate()
    assert cfg.dataset == "rotated-digits" and cfg.algorithm == "erm" and not cfg.pretrained


def test_flags_override_yaml_which_overrides_defaults(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "backbone: resnet50\nlr: 5.0e-5\nsteps: 100\ntarget_domains: [sketch]\nhparams: {gga: {rho: 1.0e-5}}\n"
    )
    cfg = parse(["--config", str(recipe), "--steps", "7", "--no-pretrained", "--hparams", "gga.tau=0.2"])
    assert cfg.backbone == "resnet50"  # from YAML
    assert cfg.lr == 5e-5 and cfg.steps == 7  # flag beats YAML
    assert cfg.target_domains == ["sketch"]
    assert cfg.hparams == {"gga.rho": 1e-5, "gga.tau": 0.2}  # merged key by key


def test_domains_given_as_numbers_or_comma_lists_become_strings(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("target_domains: [75, 60]\n")
    assert parse(["--config", str(recipe)]).target_domains == ["75", "60"]
    assert TrainConfig.from_dict({"source_domains": "0,15"}).source_domains == ["0", "15"]


def test_unknown_yaml_key_is_one_line_error_with_suggestion(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("bakbone: resnet50\n")
    with pytest.raises(DGZooError, match=r"unknown config file .* key 'bakbone' \(did you mean: backbone\?\)") as e:
        parse(["--config", str(recipe)])
    assert "\n" not in str(e.value)


def test_unknown_flag_is_rejected_by_the_parser():
    with pytest.raises(SystemExit):
        parse(["--bakbone", "resnet50"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--steps", "0"], "--steps must be positive"),
        (["--steps", "ten"], "--steps must be int"),
        (["--holdout-fraction", "1.5"], "--holdout-fraction must be in"),
        (["--optimizer", "adma"], "did you mean: adam"),
        (["--resume", "--overwrite"], "contradict"),
        (["--algorithm", "erm+"], "malformed"),
        (["--target-domains", "0", "--source-domains", "0"], "both source and target"),
        (["--hparams", "gga.rho"], "not KEY=VALUE"),
    ],
)
def test_bad_values_fail_with_one_line(argv, message):
    with pytest.raises(DGZooError, match=message) as e:
        parse(argv)
    assert "\n" not in str(e.value)


def test_hparam_values_parse_like_yaml():
    assert parse_scalar("1e-5") == 1e-5
    assert parse_scalar("250") == 250
    assert parse_scalar("true") is True
    assert parse_scalar("fast") == "fast"
    assert normalize_hparams({"iu": {"mode": "fast", "k": 2}, "alpha": 0.5}) == {
        "iu.mode": "fast",
        "iu.k": 2,
        "alpha": 0.5,
    }


def test_named_recipe_resolves_from_recipes_dir():
    cfg = TrainConfig.from_yaml("default")
    assert cfg.dataset == "rotated-digits"
    with pytest.raises(DGZooError, match="not found"):
        TrainConfig.from_yaml("no_such_recipe")


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes" / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_recipe_is_valid(recipe):
    from dgzoo.algorithms import resolve_hparams
    from dgzoo.models import check_backbone

    cfg = TrainConfig.from_yaml(recipe)
    cfg.validate()
    check_backbone(cfg.backbone)
    resolve_hparams(cfg.algorithm, cfg.hparams)
