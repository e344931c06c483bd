"""dgzoo sweep: DomainBed's grid and seeds, resumption after an interruption, commands for a cluster, and the
report of a real (tiny) sweep on rotated-digits."""

import json
import shlex
from pathlib import Path

import numpy as np
import pytest
import yaml

import dgzoo.training.engine
from conftest import TINY_SWEEP_TRAIN
from dgzoo.cli import build_parser, main
from dgzoo.config import config_from_args
from dgzoo.errors import DGZooError
from dgzoo.experiments.launchers import run_sweep, sweep_status
from dgzoo.experiments.report import load_runs, report_dirs
from dgzoo.experiments.sweep import SweepSpec, Uniform, expand, parse_distribution, run_status, seed_hash
from dgzoo.run.rundir import RUN_OUTPUTS, missing_outputs

TINY = TINY_SWEEP_TRAIN


def spec(tmp_path, **values):
    base = dict(
        datasets=["rotated-digits"],
        algorithms=["erm", "equilibrium"],
        output_dir=str(tmp_path / "sw"),
        train=dict(TINY),
    )
    base.update(values)
    return SweepSpec.from_dict(base)


def test_grid_follows_domainbed_semantics(tmp_path):
    s = spec(
        tmp_path,
        test_domains="single_and_pairs",
        n_hparams=3,
        n_trials=2,
        train={**TINY, "hparams": {"equilibrium.alpha": 0.05}},
        search={"equilibrium.alpha": "U(0, 0.2)", "dropout": None},
    )
    runs = expand(s)
    assert len(runs) == 2 * 2 * (6 + 15) * 3  # trials x algorithms x (singles + pairs) x hparam samples
    assert [r.test_domains for r in runs[:6:3]] == [("0",), ("0", "15")]  # DomainBed's order: 0, 0+15, 0+30, ...
    assert len({r.output_dir for r in runs}) == len(runs)
    assert runs[0].output_dir.name == "rotated-digits-erm-0-hp0-trial0"
    for run in runs:
        cfg = run.config
        assert cfg.split_seed == run.trial_seed and cfg.target_domains == list(run.test_domains)
        assert cfg.seed == seed_hash(
            "rotated-digits", run.algorithm, list(run.test_domains), run.hparams_seed, run.trial_seed
        )
        if run.hparams_seed == 0:  # sample 0 is the recipe itself; its namespaced hparams reach their algorithm only
            alpha = {"equilibrium.alpha": 0.05} if run.algorithm == "equilibrium" else {}
            assert run.sampled == {} and (cfg.lr, cfg.batch_size, cfg.hparams) == (3e-3, 8, alpha)
        else:  # rotated-digits searches DomainBed's small-image distributions; dropout was removed from the search
            assert 10**-4.5 <= cfg.lr <= 10**-2.5 and 8 <= cfg.batch_size < 512 and cfg.dropout == 0.0
            assert ("equilibrium.alpha" in run.sampled) == (run.algorithm == "equilibrium")
    by_key = {(r.algorithm, r.test_domains, r.hparams_seed, r.trial_seed): r for r in runs}
    a, b = by_key[("erm", ("0",), 1, 0)], by_key[("equilibrium", ("75",), 1, 0)]
    assert a.config.lr == b.config.lr and a.config.batch_size == b.config.batch_size  # paired draws
    assert by_key[("erm", ("0",), 1, 1)].config.lr != a.config.lr  # the trial seed enters the draws
    assert [r.config.to_dict() for r in expand(s)] == [r.config.to_dict() for r in runs]  # reproducible


def test_distributions_parse_and_sample_in_range():
    lr = parse_distribution("10**U(-5, -3.5)", "lr")
    assert lr == Uniform(-5, -3.5, base=10) and str(lr) == "10**U(-5, -3.5)"
    batch = parse_distribution("int(2**U(3, 5.5))", "batch_size")
    assert str(batch) == "int(2**U(3, 5.5))"
    rng = np.random.RandomState(0)
    assert all(8 <= batch.sample(rng) <= 45 for _ in range(100))
    assert parse_distribution("choice(0, 0.1, 0.5)", "dropout").values == (0, 0.1, 0.5)
    assert parse_distribution([1, 2], "x").values == (1, 2) and parse_distribution(None, "x") is None
    with pytest.raises(DGZooError, match="write U\\(a, b\\), 10\\*\\*U\\(a, b\\)"):
        parse_distribution("loguniform(1e-5, 1e-3)", "lr")


@pytest.mark.parametrize(
    "values, message",
    [
        ({"algorithm": ["erm"]}, "unknown key 'algorithm' in sweep spec (did you mean: algorithms?)"),
        ({"train": {"seed": 3}}, "'seed' cannot be set in the train section"),
        ({"train": {"stepz": 3}}, "unknown sweep spec train key 'stepz' (did you mean: steps?)"),
        ({"test_domains": ["90"]}, "test_domains names '90', not a domain of rotated-digits"),
        ({"test_domains": "pairs"}, "test_domains 'pairs' in sweep spec is not one of single, single_and_pairs"),
        # an empty YAML value (`test_domains:`) or list: every run needs a held-out domain, so say so (it crashed, or
        # expanded to no run at all)
        ({"test_domains": None}, "test_domains in sweep spec is empty; a sweep holds out a domain in every run"),
        ({"test_domains": []}, "test_domains in sweep spec is empty; a sweep holds out a domain in every run"),
        ({"search": {"lrr": "U(0, 1)"}}, "search key 'lrr' in sweep spec is neither a training setting (did you mean"),
        (
            {"search": {"equilibrium.alpah": "U(0, 1)"}},
            "equilibrium has no hyperparameter 'alpah' (did you mean: alpha?)",
        ),
        (
            {"train": {"hparams": {"gga2.rho": 1}}},
            "hparam 'gga2.rho': 'gga2' is not part of any algorithm of the sweep",
        ),
        ({"n_trials": 0}, "must be >= 1"),
    ],
)
def test_bad_specs_fail_before_anything_runs(tmp_path, values, message):
    with pytest.raises(DGZooError) as e:
        expand(spec(tmp_path, **values))
    assert message in str(e.value)
    assert not (tmp_path / "sw").exists()


def test_printed_commands_rebuild_the_planned_runs(tmp_path, capsys):
    (tmp_path / "spec.yaml").write_text(
        yaml.safe_dump(
            {
                "datasets": ["rotated-digits"],
                "algorithms": ["erm", "equilibrium"],
                "test_domains": ["75", ["0", "15"]],
                "n_hparams": 2,
                "n_trials": 1,
                "train": TINY,
                "search": {"equilibrium.alpha": "U(0, 0.2)"},
            }
        )
    )
    assert (
        main(["sweep", str(tmp_path / "spec.yaml"), "--launcher", "print", "--output-dir", str(tmp_path / "sw")]) == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("# sweep ") and "8 runs: 0 done" in lines[0]
    commands = lines[1:]
    planned = expand(SweepSpec.from_yaml(tmp_path / "spec.yaml", output_dir=str(tmp_path / "sw")))
    assert len(commands) == len(planned) == 8
    parser = build_parser()
    for command, run in zip(commands, planned):
        words = shlex.split(command)
        assert words[:3] == ["accelerate", "launch", "recipes/train.py"]
        assert config_from_args(parser.parse_args(["train", *words[3:]])).to_dict() == run.config.to_dict()
    manifest = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert [r["run_dir"] for r in manifest["runs"]] == [r.output_dir.name for r in planned]
    assert manifest["spec"]["search"] == {"equilibrium.alpha": "U(0, 0.2)"}


def test_dry_run_lists_runs_and_search_spaces_and_writes_nothing(tmp_path, capsys):
    (tmp_path / "spec.yaml").write_text(
        yaml.safe_dump(
            {
                "datasets": ["rotated-digits"],
                "algorithms": ["erm", "equilibrium"],
                "test_domains": ["75"],
                "n_hparams": 2,
                "n_trials": 1,
                "output_dir": str(tmp_path / "sw"),
                "train": TINY,
            }
        )
    )
    assert main(["sweep", str(tmp_path / "spec.yaml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "4 runs: 0 done, 0 to resume, 0 to restart, 4 to start" in out
    assert (
        "search space of erm on rotated-digits: lr 10**U(-4.5, -2.5), batch_size int(2**U(3, 9)), "
        "dropout choice(0.0, 0.1, 0.5)"
    ) in out
    [unsearched] = [line for line in out.splitlines() if "not searched" in line]
    assert "(every sample keeps the recipe's value): equilibrium.domains," in unsearched
    assert "equilibrium.pgd_steps" in unsearched and "equilibrium.alpha" not in unsearched
    assert "search space of equilibrium on rotated-digits:" in out and "equilibrium.alpha choice(0.3, 0.5, 0.7)" in out
    assert "rotated-digits-erm-75-hp0-trial0  (defaults)" in out
    assert not (tmp_path / "sw").exists()


def test_run_status_reads_the_run_directory(tmp_path):
    [run] = expand(spec(tmp_path, algorithms=["erm"], test_domains=["75"], n_trials=1))
    out = run.output_dir
    assert run_status(run) == "new"
    out.mkdir(parents=True)
    (out / "train.log").write_text("")
    assert run_status(run) == "restart"  # started, no checkpoint
    (out / "train_config.json").write_text(json.dumps(run.config.to_dict()))
    (out / "checkpoints" / "step_1").mkdir(parents=True)
    assert run_status(run) == "resume"
    (out / "results.json").write_text("{}")
    assert run_status(run) == "resume"  # finished, but its card, weights, plots... were never written: finish it
    for name in RUN_OUTPUTS:
        if name != "train_config.json":
            (out / name).write_text("")
    assert run_status(run) == "done"
    longer = expand(spec(tmp_path, algorithms=["erm"], test_domains=["75"], n_trials=1, train={**TINY, "steps": 4}))
    assert run_status(longer[0]) == "resume"  # more steps asked: train further from the checkpoint
    changed = expand(spec(tmp_path, algorithms=["erm"], test_domains=["75"], n_trials=1, train={**TINY, "lr": 0.1}))
    with pytest.raises(DGZooError, match=r"holds a run trained with other settings than this sweep \(lr: 0.003 -> 0.1"):
        run_status(changed[0])


class SimulatedKill(BaseException):
    """Stops the sweep mid-run the way a kill would: no handler in dgzoo catches it."""


@pytest.fixture(scope="module")
def interrupted_sweep(tmp_path_factory):
    """erm and pcgrad x 2 held-out domains x 2 trial seeds on rotated-digits, killed in its 3rd run, then rerun."""
    tmp = tmp_path_factory.mktemp("sweep")
    s = spec(tmp, algorithms=["erm", "pcgrad"], test_domains=["0", "75"], n_trials=2)
    planned = expand(s)
    victim = planned[2].output_dir
    save_checkpoint, train = dgzoo.training.engine._save_checkpoint, dgzoo.training.engine.train

    def killed_after_first_checkpoint(accelerator, out, step, keep, *more):
        save_checkpoint(accelerator, out, step, keep, *more)
        if Path(out) == victim and step == 1:
            raise SimulatedKill

    mp = pytest.MonkeyPatch()
    mp.setattr(dgzoo.training.engine, "_save_checkpoint", killed_after_first_checkpoint)
    with pytest.raises(SimulatedKill):
        run_sweep(s, log=lambda line: None)
    mp.undo()
    first = {r.output_dir: (r.output_dir / "results.json").stat().st_mtime_ns for r in planned[:2]}
    statuses = [run_status(r) for r in planned]
    calls = []

    def spy(cfg):
        calls.append((Path(cfg.output_dir), cfg.resume, cfg.overwrite))
        return train(cfg)

    mp.setattr(dgzoo.training.engine, "train", spy)
    outcome = run_sweep(s, log=lambda line: None)
    mp.undo()
    return dict(spec=s, planned=planned, statuses=statuses, calls=calls, outcome=outcome, first=first)


def test_rerun_of_an_interrupted_sweep_completes_only_what_is_missing(interrupted_sweep):
    planned, calls = interrupted_sweep["planned"], interrupted_sweep["calls"]
    assert interrupted_sweep["statuses"] == ["done", "done", "resume"] + ["new"] * 5
    assert calls == [(planned[2].output_dir, True, False)] + [(r.output_dir, False, False) for r in planned[3:]]
    assert not interrupted_sweep["outcome"].failed
    for run_dir, mtime in interrupted_sweep["first"].items():
        assert (run_dir / "results.json").stat().st_mtime_ns == mtime  # finished runs untouched
    resumed = planned[2].output_dir
    assert "resumed from" in (resumed / "train.log").read_text()
    assert json.loads((resumed / "results.json").read_text())["steps"] == 2
    assert all(run_status(r) == "done" for r in planned)
    assert run_sweep(interrupted_sweep["spec"], log=lambda line: None).trained == []  # a third call does nothing


def test_report_of_a_real_sweep_has_the_right_shape_and_numbers(interrupted_sweep, tmp_path):
    root = Path(interrupted_sweep["spec"].output_dir)
    runs, notes = load_runs([root])
    assert len(runs) == 8 and notes == [] and {r.hparams_seed for r in runs} == {0}
    report = report_dirs([root])
    assert [(t.method, t.dataset) for t in report.tables] == [
        ("training_domain_validation", "rotated-digits"),
        ("training_domain_validation", None),
        ("oracle", "rotated-digits"),
        ("oracle", None),
    ]
    assert any("single_and_pairs" in note for note in report.notes)  # no pairs: no leave-one-domain-out table
    table = report.tables[0]
    assert table.columns == ["0", "75", "Avg"] and list(table.rows) == ["erm", "pcgrad"]
    markdown = report.markdown()
    for algorithm, cells in table.rows.items():
        per_domain = []
        for domain, cell in zip(("0", "75"), cells):
            accs = [
                json.loads((r.output_dir / "results.json").read_text())["accuracy"][domain]
                for r in interrupted_sweep["planned"]
                if r.algorithm == algorithm and r.test_domains == (domain,)
            ]
            per_domain.append(accs)
            mean, se = 100 * (accs[0] + accs[1]) / 2, 100 * abs(accs[0] - accs[1]) / 2 / 2**0.5
            assert (cell.mean, cell.se, cell.n) == (pytest.approx(mean), pytest.approx(se), 2)
        trial_avgs = [100 * (a + b) / 2 for a, b in zip(*per_domain)]
        assert cells[2].mean == pytest.approx(sum(trial_avgs) / 2)
        row = " | ".join([algorithm, *(f"{c.mean:.1f} ± {c.se:.1f}" for c in cells)])
        assert f"| {row} |" in markdown
    assert main(["report", str(root), "--format", "csv", "--output-dir", str(tmp_path / "out")]) == 0
    assert len((tmp_path / "out" / "report.csv").read_text().splitlines()) == 1 + 2 * (2 * 3 + 2 * 2)
    assert (tmp_path / "out" / "accuracy_rotated-digits.png").exists()


def test_slurm_section_of_a_spec_is_validated(tmp_path):
    with pytest.raises(
        DGZooError,
        match=r"unknown key 'partion' in the slurm section of sweep spec \(did you mean: "
        r"partition\?\)",
    ):
        spec(tmp_path, slurm={"partion": "gpu"})
    with pytest.raises(DGZooError, match="time in the slurm section of sweep spec .* must be an integer >= 1"):
        spec(tmp_path, slurm={"time": "4h"})
    assert spec(tmp_path, slurm={"partition": "gpu", "time": 240, "gpus": 0}).slurm == {
        "partition": "gpu",
        "time": 240,
        "gpus": 0,
    }


@pytest.mark.slow
def test_more_trials_retrain_the_selected_sample_on_new_trial_seeds(tmp_path, capsys):
    s = spec(tmp_path, algorithms=["erm"], test_domains=["75"], n_hparams=2, n_trials=1)
    with pytest.raises(DGZooError, match="--more-trials selects among finished runs, and 2 of 2 runs"):
        run_sweep(s, more_trials=1, log=lambda line: None)
    assert not (tmp_path / "sw" / "more_trials.json").exists()
    run_sweep(s, log=lambda line: None)
    grid = {r.hparams_seed: r for r in expand(s)}
    outcome = run_sweep(s, more_trials=1, log=lambda line: None)
    report = report_dirs([tmp_path / "sw"], ["training_domain_validation"])
    [(_, pick)] = [(key, p) for key, p in report.picks["training_domain_validation"].items() if key[3] == "0"]
    chosen = grid[pick.run.hparams_seed]  # the sample training-domain validation chose on trial 0
    assert sorted(r.output_dir.name for r in outcome.trained) == [
        f"rotated-digits-erm-75-hp{chosen.hparams_seed}-trial1-more"
    ]
    for run in outcome.trained:
        cfg = run.config
        assert run.hparams_seed == chosen.hparams_seed and run.kind == "more_trials"
        assert (cfg.lr, cfg.batch_size, cfg.dropout) == (
            chosen.config.lr,
            chosen.config.batch_size,
            chosen.config.dropout,
        )  # its values, not a new draw
        assert cfg.split_seed == run.trial_seed and cfg.seed == seed_hash(
            "rotated-digits", "erm", ["75"], chosen.hparams_seed, run.trial_seed
        )
    assert report.tables[0].rows["erm"][0].n == 2  # trial 0 (selected among 2 samples) + the new trial
    assert run_sweep(s, more_trials=1, log=lambda line: None).trained == []  # idempotent
    assert main(["sweep", str(tmp_path / "sw"), "--top-hparams", "--selection", "training_domain_validation"]) == 0
    listing = capsys.readouterr().out
    assert [line.split(":")[0] for line in listing.splitlines() if line.startswith("  trial")] == [
        "  trial 0",
        "  trial 1",
    ]
    assert listing.count(f": hp{chosen.hparams_seed} val") == 2 and f"lr={chosen.config.lr:.4g}" in listing


class CardKill(BaseException):
    """A kill while the run directory is being finalised (after the last step and checkpoint, before the card)."""


def test_a_run_killed_while_finalising_is_not_done_and_the_rerun_finishes_it(tmp_path, monkeypatch):
    s = spec(tmp_path, algorithms=["erm"], test_domains=["75"], n_trials=1)
    [run] = expand(s)
    out = run.output_dir

    def killed(*args, **kwargs):
        raise CardKill

    monkeypatch.setattr(dgzoo.training.engine, "render_card", killed)
    with pytest.raises(CardKill):
        run_sweep(s, log=lambda line: None)
    monkeypatch.undo()
    assert not (out / "README.md").exists() and missing_outputs(out) != []
    assert run_status(run) == "resume"  # never "done" without its card
    with pytest.raises(DGZooError, match="no finished run"):
        load_runs([tmp_path / "sw"])  # the report does not count it either
    status = []
    sweep_status(s, log=status.append)
    assert status[0].endswith("1 runs: 0 done, 1 to resume, 0 to restart, 0 to start")  # --status agrees
    outcome = run_sweep(s, log=lambda line: None)
    assert [r.output_dir for r in outcome.trained] == [out]
    assert "resumed from" in (out / "train.log").read_text()
    assert missing_outputs(out) == [] and run_status(run) == "done"
    assert json.loads((out / "results.json").read_text())["steps"] == TINY["steps"]
    assert len(load_runs([tmp_path / "sw"])[0]) == 1


def test_a_finished_run_missing_a_file_is_finished_by_the_rerun(tmp_path):
    """Runs finished before results.json was written last, or with a file deleted since, are completed."""
    s = spec(tmp_path, algorithms=["erm"], test_domains=["75"], n_trials=1)
    [run] = expand(s)
    assert not run_sweep(s, log=lambda line: None).failed
    weights = (run.output_dir / "model.safetensors").read_bytes()
    for name in ("README.md", "training_curves.png"):
        (run.output_dir / name).unlink()
    assert missing_outputs(run.output_dir) == ["README.md", "training_curves.png"]
    assert run_status(run) == "resume"
    assert [r.output_dir for r in run_sweep(s, log=lambda line: None).trained] == [run.output_dir]
    assert run_status(run) == "done" and (run.output_dir / "model.safetensors").read_bytes() == weights
