"""Unlearning: forget specs, the data split, SURE's gradient reversal, and the unlearned run directory."""

import json
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import plain_timm_logits, record_worker_starts, subprocess_env
from dgzoo.errors import DGZooError
from dgzoo.unlearning import SURE, UnlearnConfig, parse_forget_spec, split_for_unlearning, unlearn
from dgzoo.unlearning.methods import resolve_method_hparams


@pytest.mark.parametrize(
    "text, scenario",
    [
        ("class=3", "full-class"),
        ("class=3:0.1", "partial-class"),
        ("domain=15", "domain"),
        ("class=3 domain=15,30", "class-in-domain"),
        ("indices=4,7,10-12", "random"),
        ("class=3:1", "full-class"),
    ],
)
def test_forget_specs_parse_into_scenarios(text, scenario):
    spec = parse_forget_spec(text)
    assert spec.scenario == scenario
    if scenario == "random":
        assert spec.indices == (4, 7, 10, 11, 12)


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "--forget is empty"),
        ("klass=3", "unknown key 'klass' (did you mean: class?)"),
        ("class", "is not KEY=VALUE"),
        ("class=3:1.5", "must be a number in (0, 1]"),
        ("class=3:half", "must be a number in (0, 1]"),
        ("indices=4,x", "'x' is not a row index"),
        ("indices=9-2", "ends before it starts"),
        ("indices=1 class=3", "cannot be combined"),
        ("class=3 class=4", "gives 'class=' twice"),
        ("indices-file=/no/such/file", "no such file"),
    ],
)
def test_bad_forget_specs_are_one_line_errors(text, message):
    with pytest.raises(DGZooError) as e:
        parse_forget_spec(text)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.fixture(scope="module")
def digits():
    from dgzoo.data import load_dg_dataset, make_splits

    data = load_dg_dataset("rotated-digits")
    return data, make_splits(data, 0.2, 0)


SOURCES, TARGETS = ["0", "15", "30", "45", "60"], ["75"]


def split(digits, text, seed=0):
    data, splits = digits
    return split_for_unlearning(parse_forget_spec(text), data, splits, SOURCES, TARGETS, 0.5, 0, seed)


def test_split_separates_forget_retain_validation_and_test(digits):
    data, splits = digits
    train = np.concatenate([splits.in_rows[d] for d in SOURCES])
    full = split(digits, "class=3")
    assert set(data.labels[full.forget]) == {3} and len(full.forget) == int(np.sum(data.labels[train] == 3))
    assert set(full.forget) | set(full.retain) == set(train) and not set(full.forget) & set(full.retain)
    unseen = set(full.validation) | set(full.test)
    assert unseen == set(np.concatenate([splits.out_rows[d] for d in SOURCES])) and not unseen & set(train)
    assert not set(full.validation) & set(full.test)
    assert set(data.labels[full.matched_test]) == {3} and 3 not in set(data.labels[full.retained_validation])
    partial = split(digits, "class=3:0.1")
    assert len(partial.forget) == round(0.1 * len(full.forget)) and set(partial.forget) < set(full.forget)
    assert np.array_equal(partial.forget, split(digits, "class=3:0.1").forget)  # seeded: every method sees it
    assert not np.array_equal(partial.forget, split(digits, "class=3:0.1", seed=1).forget)
    assert np.array_equal(partial.test, full.test)  # the test set never depends on the forget set
    in_domain = split(digits, "class=3 domain=15")
    assert set(data.domain_of_row[in_domain.forget]) == {data.domains.index("15")}


@pytest.mark.parametrize(
    "text, message",
    [
        ("class=banana", "unknown class 'banana'"),
        ("domain=75", "domain '75' was held out in the source run"),
        ("domain=90", "unknown domain '90'"),
        ("indices=0-5000", "past the end of"),
    ],
)
def test_forget_sets_the_source_run_cannot_have_are_refused(digits, text, message):
    with pytest.raises(DGZooError) as e:
        split(digits, text)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_indices_outside_the_training_rows_are_refused(digits):
    _, splits = digits
    with pytest.raises(DGZooError, match=r"1 of the 2 rows .* were never trained on"):
        split(digits, f"indices={splits.in_rows['0'][0]},{splits.out_rows['0'][0]}")


def test_unknown_method_and_hparams_are_one_line_errors():
    with pytest.raises(DGZooError, match="unknown unlearning method 'suer' \\(did you mean: sure"):
        resolve_method_hparams("suer", {})
    with pytest.raises(DGZooError, match="unknown hparam 'lamda' for sure \\(did you mean: lambda"):
        resolve_method_hparams("sure", {"lamda": 1})
    with pytest.raises(DGZooError, match="do not apply to --method retrain"):
        resolve_method_hparams("retrain", {"lambda": 1})
    assert resolve_method_hparams("sure", {"sure.lambda": "0.5"})["lambda"] == 0.5


def test_a_taken_unlearning_method_name_is_refused_unless_replaced(monkeypatch):
    """A second ``sure`` would silently change what every later ``--method sure`` runs."""
    from dgzoo.unlearning import methods

    monkeypatch.setattr(methods, "METHODS", methods.METHODS.copy())
    sure = methods.METHODS["sure"]

    class Impostor(sure):
        name = "sure"

    with pytest.raises(DGZooError, match="'sure' is already registered .*replace=True"):
        methods.register_method(Impostor)
    assert methods.METHODS["sure"] is sure
    assert methods.register_method(Impostor, replace=True) is Impostor and methods.METHODS["sure"] is Impostor


def test_forget_set_baselines_ascend_or_relabel_and_add_the_retain_term_only_when_weighted():
    from dgzoo.models import create_backbone
    from dgzoo.unlearning.methods import METHODS

    torch.manual_seed(0)
    model = create_backbone("test_resnet", num_classes=4).eval()
    x, y = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 0, 1])
    batches = {"forget": (x[:3], y[:3]), "retain": (x[3:], y[3:])}
    forget_ce = F.cross_entropy(model(x[:3]), y[:3])
    retain_ce = F.cross_entropy(model(x[3:]), y[3:])

    ascent = METHODS["gradient_ascent"](model, 4, resolve_method_hparams("gradient_ascent", {"forget_bn": "batch"}))
    assert ascent.batches() == ("forget",)
    loss, metrics = ascent(batches, 0.0)
    assert torch.allclose(loss, -forget_ce) and "retain_loss" not in metrics  # NegGrad: minus the forget loss
    plus = METHODS["gradient_ascent"](
        model, 4, resolve_method_hparams("gradient_ascent", {"forget_bn": "batch", "retain_weight": 0.5})
    )
    assert plus.batches() == ("forget", "retain")
    assert torch.allclose(plus(batches, 0.0)[0], -forget_ce + 0.5 * retain_ce)  # NegGrad+

    relabel = METHODS["random_labels"](model, 4, resolve_method_hparams("random_labels", {"forget_bn": "batch"}))
    torch.manual_seed(1)
    loss, metrics = relabel(batches, 0.0)
    torch.manual_seed(1)
    wrong = (y[:3] + torch.randint(1, 4, (3,))) % 4
    assert (wrong != y[:3]).all()  # every forget image is trained towards a label that is not its own
    assert torch.allclose(loss, F.cross_entropy(model(x[:3]), wrong) + retain_ce)  # retain_weight 1 by default
    assert torch.allclose(metrics["retain_loss"], retain_ce)


def test_gradient_reversal_flips_the_discriminator_gradient_into_the_encoder():
    import timm

    from dgzoo.models import features, featurizer_parameters

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10).eval()  # eval: both passes normalise identically
    sure = SURE(model, 10, SURE.resolve_hparams(resolve_method_hparams("sure", {"lambda": 0.3}), "full-class"))
    x_forget, x_validation = torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)

    def gradients(reversed_features: bool) -> tuple[list, list]:
        sure.zero_grad()
        z = features(model, torch.cat([x_forget, x_validation]))
        if reversed_features:
            loss, _ = sure.domain_loss(z, 4, sure.reversal_scale(0.5))
        else:  # the same loss with the features fed straight into the domain classifier
            target = torch.cat([torch.ones(4), torch.zeros(4)])
            loss = F.binary_cross_entropy_with_logits(sure.discriminator(z).squeeze(1), target)
        loss.backward()
        encoder = [p.grad.clone() for _, p in featurizer_parameters(model)]
        return encoder, [p.grad.clone() for p in sure.discriminator.parameters()]

    encoder_reversed, disc_reversed = gradients(True)
    encoder_plain, disc_plain = gradients(False)
    assert any(g.abs().sum() > 0 for g in encoder_plain)
    for a, b in zip(encoder_reversed, encoder_plain):
        torch.testing.assert_close(a, -0.3 * b)  # the encoder climbs the domain loss, scaled by lambda
    for a, b in zip(disc_reversed, disc_plain):
        torch.testing.assert_close(a, b)  # the domain classifier itself still descends it


def test_forget_minibatches_leave_batchnorm_running_statistics_alone():
    import timm

    from dgzoo.unlearning.methods import batchnorm_mode

    model = timm.create_model("test_resnet", num_classes=10).train()
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    with batchnorm_mode(model, "batch"):
        model(torch.randn(4, 3, 32, 32) + 3.0)  # one class only: statistics far from the retain set's
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items() if k in before)
    assert all(m.momentum == 0.1 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    with batchnorm_mode(model, "train"):
        model(torch.randn(4, 3, 32, 32) + 3.0)
    assert not all(torch.equal(before[k], v) for k, v in model.state_dict().items() if k in before)


@pytest.fixture(scope="module")
def unlearned(trained_run, tmp_path_factory):
    """A retrained reference and a SURE run, both forgetting class 3 from the shared tiny run."""
    run_dir, _ = trained_run
    tmp = tmp_path_factory.mktemp("unlearn")
    retrain = unlearn(
        UnlearnConfig(str(run_dir), "class=3", method="retrain", output_dir=str(tmp / "retrain"), num_workers=0)
    )
    results = unlearn(
        UnlearnConfig(
            str(run_dir),
            "class=3",
            method="sure",
            steps=3,
            hparams={"disc_hidden": 16},
            reference=str(tmp / "retrain"),
            output_dir=str(tmp / "sure"),
            num_workers=0,
        )
    )
    return tmp, retrain, results


def test_the_discriminator_never_reaches_the_published_weights(unlearned):
    import timm
    from safetensors.torch import load_file

    tmp, _, _ = unlearned
    saved = load_file(tmp / "sure" / "model.safetensors")
    assert set(saved) == set(timm.create_model("test_resnet", num_classes=10).state_dict())
    assert not any("discriminator" in key for key in saved)


def test_an_unlearned_run_loads_with_plain_timm_in_a_fresh_process(unlearned, tmp_path):
    tmp, _, _ = unlearned
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    expected = plain_timm_logits(tmp / "sure", x, tmp_path)
    import dgzoo

    model, _ = dgzoo.from_pretrained(tmp / "sure")
    with torch.no_grad():
        assert torch.allclose(model(x), expected, atol=1e-6)


def test_results_compare_every_metric_with_the_retrained_model(unlearned):
    from huggingface_hub import ModelCard

    tmp, retrain, results = unlearned
    saved = json.loads((tmp / "sure" / "results.json").read_text())
    info = saved["unlearning"]
    assert saved["kind"] == "unlearning" and saved["algorithm"] == "sure" and saved["target_domains"] == ["75"]
    assert info["scenario"] == "full-class" and info["forget_classes"] == ["3"]
    assert info["sizes"]["forget"] == len(info["forgotten_rows"]) > 0
    assert saved["hparams"]["validation"] == "retained" and saved["hparams"]["forget_bn"] == "train"  # auto
    for key, row in info["comparison"].items():
        assert row["retrain"] == retrain["unlearning"]["comparison"][key]["unlearned"], key
        if row["unlearned"] is not None and row["retrain"] is not None:
            assert row["gap_to_retrain"] == pytest.approx(row["unlearned"] - row["retrain"])
    attack = info["evaluation"]["unlearned"]["attacks"]["representation_knn"]
    assert 0.0 <= attack["accuracy"] <= 1.0
    assert attack["n"] == min(info["sizes"]["forget"], info["sizes"]["matched_test"])
    assert info["time_fraction_of_retrain"] > 0
    # the code it was computed with, as every training run records (the trust chain of an unlearned model)
    assert saved["code"]["dgzoo_version"] == saved["dgzoo_version"] and "git_commit" in saved["code"]
    assert {"first_steps", "last_steps"} <= set(saved["diagnostics"])
    assert "domain_acc" in saved["diagnostics"]["last_steps"]
    card = ModelCard.load(tmp / "sure" / "README.md")
    assert card.data.library_name == "timm" and "machine-unlearning" in card.data.tags
    assert "`--forget class=3` (full-class unlearning)" in card.text and "Gap to retrained" in card.text


def test_unlearning_an_unlearned_run_keeps_the_first_forget_set_out(unlearned):
    tmp, _, first = unlearned
    second = unlearn(
        UnlearnConfig(
            str(tmp / "sure"), "class=5", method="finetune", steps=1, output_dir=str(tmp / "then-5"), num_workers=0
        )
    )
    rows_first = set(first["unlearning"]["forgotten_rows"])
    assert rows_first < set(second["unlearning"]["forgotten_rows"])
    assert (
        second["unlearning"]["sizes"]["retain"]
        == first["unlearning"]["sizes"]["retain"] - second["unlearning"]["sizes"]["forget"]
    )


def test_a_reference_for_another_forget_set_is_refused(unlearned, trained_run):
    tmp, _, _ = unlearned
    with pytest.raises(DGZooError, match="forgot a different set"):
        unlearn(
            UnlearnConfig(
                str(trained_run[0]),
                "class=4",
                method="finetune",
                reference=str(tmp / "retrain"),
                output_dir=str(tmp / "never"),
            )
        )
    assert not (tmp / "never").exists()


def test_cli_reports_a_bad_forget_set_as_one_line(trained_run, tmp_path, capsys):
    from dgzoo.cli import main

    code = main(["unlearn", str(trained_run[0]), "--forget", "class=banana", "--output-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("dgzoo: error: --forget: unknown class 'banana'") and "\n" not in err
    assert not (tmp_path / "out").exists()


def _files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("diverge", ["huge_lr", "infinite_loss"])
def test_a_loss_that_is_not_finite_stops_unlearning_at_that_step_with_one_line(
    diverge, trained_run, tmp_path, monkeypatch
):
    from dgzoo.unlearning.methods import METHODS

    source = trained_run[0]
    source_files = _files(source)
    out = tmp_path / "out"
    cfg = dict(source=str(source), forget="class=3", method="gradient_ascent", steps=3, output_dir=str(out))
    if diverge == "huge_lr":
        given = dict(cfg, lr=1e30)
    else:  # an infinite loss whose gradients stay finite (as under fp16 loss scaling): the weights never show it
        real = METHODS["gradient_ascent"].forward

        def infinite(self, batches, progress):
            loss, metrics = real(self, batches, progress)
            loss = loss + float("inf")
            return loss, {**metrics, "loss": loss.detach()}

        monkeypatch.setattr(METHODS["gradient_ascent"], "forward", infinite)
        given = cfg
    with pytest.raises(DGZooError) as error:
        unlearn(UnlearnConfig(**given, num_workers=0))
    message = str(error.value)
    assert "\n" not in message
    assert re.fullmatch(
        r"unlearning diverged: the training loss became (nan|inf) at step [12] \((\w+, )*loss(, \w+)*\); nothing was "
        r"exported; lower --lr \(or --steps\) and run again with --overwrite",
        message,
    ), message
    # As a diverged training run leaves it: its recipe and log, nothing exported, the source untouched.
    assert sorted(p.name for p in out.iterdir()) == ["unlearn.log", "unlearn_config.json"]
    assert _files(source) == source_files
    if diverge == "infinite_loss":  # the fix it names works (once is enough)
        monkeypatch.undo()
        assert unlearn(UnlearnConfig(**cfg, overwrite=True, num_workers=0))["steps"] == 3


HUB_ROUND_TRIP = r"""
import json, sys
from dgzoo.run.hub import push_run
from dgzoo.unlearning import UnlearnConfig, unlearn
source, out, source_repo, target_repo = sys.argv[1:5]
push_run(source, source_repo)
results = unlearn(UnlearnConfig(source_repo, "class=3:0.5", method="gradient_ascent", steps=1, output_dir=out,
                                num_workers=0))
push_run(out, target_repo)
import timm
from huggingface_hub import ModelCard
model = timm.create_model(f"hf-hub:{target_repo}", pretrained=True)
card = ModelCard.load(target_repo)
print(json.dumps({"source": results["unlearning"]["source"], "base_model": card.data.base_model,
                  "hub_load": f"hf-hub:{target_repo}" in card.text, "classes": model.num_classes}))
"""


@pytest.mark.slow
def test_unlearning_a_hub_repo_and_pushing_the_result(trained_run, hub_server, tmp_path):
    source_repo, target_repo = hub_server.unique_repo_id("source"), hub_server.unique_repo_id("unlearned")
    out = hub_server.run_python(
        HUB_ROUND_TRIP.replace(
            "sys.argv[1:5]", repr([str(trained_run[0]), str(tmp_path / "out"), source_repo, target_repo])
        ),
        tmp_path / "hf",
        PYTHONPATH=subprocess_env()["PYTHONPATH"],
        DGZOO_CACHE=subprocess_env()["DGZOO_CACHE"],
    )
    report = json.loads(out.strip().splitlines()[-1])
    assert report["source"]["repo_id"] == source_repo and report["base_model"] == source_repo
    assert report["hub_load"] and report["classes"] == 10


def test_the_unlearned_card_carries_the_data_licence_unless_the_publisher_overrides_it(unlearned):
    from huggingface_hub import ModelCard

    from dgzoo.run.unlearning_card import render_unlearn_card

    tmp, _, results = unlearned
    assert ModelCard((tmp / "sure" / "README.md").read_text()).data.license == "bsd-3-clause"  # rotated-digits'
    overridden = ModelCard(render_unlearn_card(results, repo_id="me/x", run_dir=tmp / "sure", license="mit"))
    assert overridden.data.license == "mit"  # dgzoo push --license


def test_cli_forget_flags_combine_and_the_card_repeats_them():
    from dgzoo.cli import build_parser
    from dgzoo.cli.unlearn import config_from_args
    from dgzoo.run.unlearning_card import reproduce_command

    args = build_parser().parse_args(
        ["unlearn", "--forget", "class=3", "runs/x", "--forget", "domain=15", "--hparams", "lambda=0.5"]
    )
    cfg = config_from_args(args)
    assert (cfg.source, cfg.forget, cfg.hparams) == ("runs/x", "class=3 domain=15", {"lambda": 0.5})
    assert parse_forget_spec(cfg.forget).scenario == "class-in-domain"
    command = reproduce_command(cfg.to_dict())
    assert command.startswith("dgzoo unlearn runs/x --forget class=3 --forget domain=15") and "lambda=0.5" in command


def _unlearn_parser():
    import argparse

    from dgzoo.cli.app import build_parser

    sub = next(a for a in build_parser("unlearn")._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["unlearn"]


def test_unlearn_flags_are_generated_from_the_dataclass_and_keep_their_names_types_and_defaults():
    """The flags `dgzoo unlearn` had when they were written by hand: same names, conversions, choices, defaults."""
    import dataclasses

    from dgzoo.config import OPTIMIZERS, PRECISIONS
    from dgzoo.unlearning import METHOD_CHOICES

    before = {  # flag: (type, default, choices)
        "--method": (None, "sure", METHOD_CHOICES),
        "--revision": (None, None, None),
        "--steps": (int, None, None),
        "--batch-size": (int, None, None),
        "--forget-batch-size": (int, None, None),
        "--lr": (float, None, None),
        "--optimizer": (None, None, OPTIMIZERS),
        "--weight-decay": (float, None, None),
        "--seed": (int, None, None),
        "--validation-fraction": (float, 0.5, None),
        "--hparams": (None, [], None),
        "--reference": (None, None, None),
        "--output-dir": (None, None, None),
        "--overwrite": (None, False, None),
        "--eval-batch-size": (int, 128, None),
        "--num-workers": (int, None, None),
        "--mixed-precision": (None, "no", PRECISIONS),
        "--push-to-hub": (None, None, None),
        "--hub-private": (None, False, None),
        "--forget": (None, None, None),
    }
    actions = {
        a.option_strings[0]: a
        for a in _unlearn_parser()._actions
        if a.option_strings[:1] != ["-h"] and a.option_strings
    }
    assert set(actions) == set(before)
    for flag, (tp, default, choices) in before.items():
        action = actions[flag]
        got = (action.type, action.default, tuple(action.choices) if action.choices else None)
        assert got == (tp, default, choices), flag
    assert actions["--overwrite"].nargs == 0 and actions["--hparams"].nargs == "+" and actions["--forget"].required
    # every field but the positional source and the repeated --forget is a generated flag
    fields = {f.name for f in dataclasses.fields(UnlearnConfig)} - {"source", "forget"}
    assert {a.dest for a in actions.values()} - {"forget"} == fields


def test_unlearn_command_line_builds_the_config():
    from dgzoo.cli.unlearn import config_from_args

    args = _unlearn_parser().parse_args(
        [
            "runs/a",
            "--forget",
            "class=3",
            "--forget",
            "domain=15",
            "--steps",
            "7",
            "--lr",
            "1e-4",
            "--optimizer",
            "sgd",
            "--hparams",
            "lambda=0.5",
            "--overwrite",
            "--push-to-hub",
            "me/x",
        ]
    )
    assert config_from_args(args) == UnlearnConfig(
        source="runs/a",
        forget="class=3 domain=15",
        steps=7,
        lr=1e-4,
        optimizer="sgd",
        hparams={"lambda": 0.5},
        overwrite=True,
        push_to_hub="me/x",
    )
    with pytest.raises(SystemExit):
        _unlearn_parser().parse_args(["runs/a", "--forget", "class=3", "--steps", "many"])


def test_an_unlearning_run_starts_its_evaluation_workers_once(trained_run, tmp_path, monkeypatch):
    """The original and the unlearned model are read, set by set, through one evaluation loader whose workers start
    once per run (before: a loader and its workers per set at each of the two evaluations)."""
    started = record_worker_starts(monkeypatch)
    results = unlearn(
        UnlearnConfig(
            str(trained_run[0]), "class=3", method="finetune", steps=1, output_dir=str(tmp_path / "u"), num_workers=1
        )
    )
    assert results["unlearning"]["sizes"]["forget"] > 0
    assert started.count("SplitsDataset") == 1 and "DomainImages" not in started, started
