"""dgzoo report on hand-made run directories: selection methods, standard errors, table layout and formats."""

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest

from dgzoo.cli import main
from dgzoo.errors import DGZooError
from dgzoo.experiments.report import build_report, load_runs, mean_and_standard_error, report_dirs, select_groups

DOMAINS = ("A", "B", "C")


def acc(in_=None, out=None, **per_domain):
    """Evaluation accuracies of every domain: ``acc(A=(in, out), ...)``; unlisted domains get 0.5/0.5."""
    return {d: dict(zip(("in", "out"), per_domain.get(d, (0.5, 0.5)))) for d in DOMAINS}


def make_run(
    root: Path,
    name: str,
    targets,
    records,
    algorithm="erm",
    seed=0,
    split_seed=None,
    lr=1e-3,
    dataset="toy",
    domains=DOMAINS,
):
    """Write a finished run directory: results.json (the fields the report reads) and records.jsonl."""
    run = root / name
    run.mkdir(parents=True)
    results = {
        "dataset": {"name": dataset, "title": dataset.title()},
        "algorithm": algorithm,
        "backbone": "resnet18",
        "pretrained": False,
        "steps": records[-1]["step"],
        "seed": seed,
        "split_seed": seed if split_seed is None else split_seed,
        "source_domains": [d for d in domains if d not in targets],
        "target_domains": list(targets),
        "accuracy": {d: 0.0 for d in domains},
        "hparams": {"lr": lr},
    }
    (run / "results.json").write_text(json.dumps(results))
    (run / "train_config.json").write_text("{}")
    (run / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


def write_manifest(root: Path, entries):
    """A sweep manifest mapping run directories to their trial seed and hyperparameter sample."""
    runs = [{"run_dir": name, "trial_seed": trial, "hparams_seed": hp} for name, trial, hp in entries]
    (root / "sweep.json").write_text(json.dumps({"runs": runs}))


def test_training_domain_validation_picks_the_best_step_then_the_best_sample(tmp_path):
    # hp0 peaks on source validation at step 2 (0.7); hp1 peaks at step 1 (0.8) and is the better sample there.
    make_run(
        tmp_path,
        "hp0",
        ["A"],
        [
            {"step": 1, "acc": acc(A=(0.10, 0.9), B=(0.5, 0.6), C=(0.5, 0.6))},
            {"step": 2, "acc": acc(A=(0.20, 0.9), B=(0.5, 0.7), C=(0.5, 0.7))},
            {"step": 3, "acc": acc(A=(0.99, 0.9), B=(0.5, 0.5), C=(0.5, 0.5))},
        ],
    )
    make_run(
        tmp_path,
        "hp1",
        ["A"],
        [
            {"step": 1, "acc": acc(A=(0.30, 0.1), B=(0.5, 0.8), C=(0.5, 0.8))},
            {"step": 2, "acc": acc(A=(0.40, 0.1), B=(0.5, 0.8), C=(0.5, 0.8))},  # a tie: the earlier step wins
            {"step": 3, "acc": acc(A=(0.50, 0.2), B=(0.5, 0.6), C=(0.5, 0.6))},
        ],
        lr=1e-2,
    )
    write_manifest(tmp_path, [("hp0", 0, 0), ("hp1", 0, 1)])
    runs, _ = load_runs([tmp_path])
    [pick] = select_groups(runs, "training_domain_validation").values()
    assert (pick.run.path.name, pick.run.hparams_seed, pick.step) == ("hp1", 1, 1)
    assert pick.val == pytest.approx(0.8) and pick.test == pytest.approx(0.30)
    # The oracle uses each run's last step and ranks samples by the held-out domain's out split.
    [oracle] = select_groups(runs, "oracle").values()
    assert (oracle.run.path.name, oracle.step, oracle.test) == ("hp0", 3, pytest.approx(0.99))


def test_leave_one_domain_out_validates_on_the_domain_the_pair_runs_held_out(tmp_path):
    # Held-out A. For each sample, the runs holding out {A,B} and {A,C} score a step by their accuracy on B and C.
    for hp, steps in ((0, ((1, 0.6, 0.6), (2, 0.9, 0.7))), (1, ((1, 0.5, 0.5), (2, 0.6, 0.6)))):
        make_run(
            tmp_path,
            f"A-hp{hp}",
            ["A"],
            [{"step": s, "acc": acc(A=(0.1 * s + hp / 10, 0.5))} for s, _, _ in steps],
            lr=10.0**-hp,
        )
        make_run(
            tmp_path, f"AB-hp{hp}", ["A", "B"], [{"step": s, "acc": acc(B=(b, 0.0))} for s, b, _ in steps], lr=10.0**-hp
        )
        make_run(
            tmp_path, f"AC-hp{hp}", ["A", "C"], [{"step": s, "acc": acc(C=(c, 0.0))} for s, _, c in steps], lr=10.0**-hp
        )
    write_manifest(tmp_path, [(f"{s}-hp{hp}", 0, hp) for s in ("A", "AB", "AC") for hp in (0, 1)])
    runs, _ = load_runs([tmp_path])
    picks = select_groups(runs, "leave_one_domain_out")
    # Only the single-domain run is a column; hp0 at step 2 has the best mean validation accuracy (0.9+0.7)/2.
    assert list(picks) == [("toy", "erm", ("A",), "0")]
    pick = picks[("toy", "erm", ("A",), "0")]
    assert (pick.run.path.name, pick.step) == ("A-hp0", 2)
    assert pick.val == pytest.approx(0.8) and pick.test == pytest.approx(0.2)
    # Training-domain validation ignores the pair runs: every score there is 0.5, so the tie goes to hp0, step 1.
    [iid] = select_groups(runs, "training_domain_validation").values()
    assert (iid.run.path.name, iid.step) == ("A-hp0", 1)


def test_standard_error_is_population_std_over_sqrt_n():
    mean, se = mean_and_standard_error([80.0, 85.0, 87.0])
    # by hand: mean 84; squared deviations 16 + 1 + 9 = 26; population variance 26/3; se = sqrt(26/3) / sqrt(3)
    assert mean == pytest.approx(84.0) and se == pytest.approx((26 / 3) ** 0.5 / 3**0.5)
    assert mean_and_standard_error([70.0]) == (70.0, 0.0)


def _three_trials(root: Path, dataset="toy"):
    """erm on held-out A and B over 3 trial seeds (plain runs, no manifest: trial = seed)."""
    held_out = {"A": (0.80, 0.85, 0.87), "B": (0.60, 0.70, 0.65)}
    for domain, values in held_out.items():
        for seed, value in enumerate(values):
            make_run(
                root,
                f"{dataset}-{domain}-seed{seed}",
                [domain],
                [{"step": 5, "acc": acc(**{domain: (value, 0.5)})}],
                seed=seed,
                dataset=dataset,
            )
    return held_out


def test_tables_show_mean_and_standard_error_over_trial_seeds(tmp_path):
    held_out = _three_trials(tmp_path)
    report = report_dirs([tmp_path], ["training_domain_validation"])
    table, averages = report.tables
    assert table.columns == ["A", "B", "Avg"] and list(table.rows) == ["erm"]
    a, b, avg = table.rows["erm"]
    assert (a.mean, a.se, a.n) == (pytest.approx(84.0), pytest.approx(1.6997, abs=1e-4), 3)
    assert (b.mean, b.se) == (pytest.approx(65.0), pytest.approx(np.std([60, 70, 65]) / 3**0.5))
    per_trial = [100 * (x + y) / 2 for x, y in zip(held_out["A"], held_out["B"])]
    assert (avg.mean, avg.se) == (pytest.approx(np.mean(per_trial)), pytest.approx(np.std(per_trial) / 3**0.5))
    markdown = report.markdown()
    assert "| erm | 84.0 ± 1.7 | 65.0 ± 2.4 | 74.5 ± 1.9 |" in markdown
    assert "standard error" in markdown and "n = 3 trial seeds" in markdown
    assert averages.columns == ["Toy", "Avg"] and averages.rows["erm"][0] == avg
    assert "leave-one-domain-out" not in markdown  # not asked for


def test_averages_table_spans_datasets_and_marks_missing_cells(tmp_path):
    _three_trials(tmp_path / "one", dataset="toy")
    _three_trials(tmp_path / "two", dataset="other")
    make_run(
        tmp_path / "two",
        "only-on-other",
        ["A"],
        [{"step": 5, "acc": acc(A=(0.5, 0.5))}],
        algorithm="erm+x",
        dataset="other",
    )
    report = report_dirs([tmp_path])
    methods = [t.method for t in report.tables]
    assert "leave_one_domain_out" not in methods
    assert any("single_and_pairs" in note for note in report.notes)
    averages = next(t for t in report.tables if t.dataset is None and t.method == "oracle")
    assert averages.columns == ["Other", "Toy", "Avg"]
    assert averages.rows["erm"][2].mean == pytest.approx(74.5) and averages.rows["erm"][2].se is None
    assert averages.rows["erm+x"] == [None, None, None]  # only one held-out domain of one dataset
    other = next(t for t in report.tables if t.dataset == "other" and t.method == "oracle")
    assert other.rows["erm+x"][0].n == 1 and other.rows["erm+x"][1] is None
    assert "| erm+x | 50.0 ± 0.0 | X | X |" in report.markdown()


def test_latex_csv_plot_and_cli(tmp_path, capsys):
    _three_trials(tmp_path / "runs")
    assert (
        main(
            [
                "report",
                str(tmp_path / "runs"),
                "--format",
                "latex",
                "--selection",
                "oracle",
                "--output-dir",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    latex = capsys.readouterr().out
    assert "\\toprule" in latex and "erm & 84.0 $\\pm$ 1.7 & 65.0 $\\pm$ 2.4 & 74.5 $\\pm$ 1.9 \\\\" in latex
    assert "standard error" in latex
    rows = list(csv.DictReader(io.StringIO((tmp_path / "out" / "report.csv").read_text())))
    cell = next(r for r in rows if r["dataset"] == "toy" and r["column"] == "A")
    assert (float(cell["mean"]), int(cell["n_trials"]), cell["selection"]) == (84.0, 3, "oracle")
    selected = list(csv.DictReader(io.StringIO((tmp_path / "out" / "selected_runs.csv").read_text())))
    assert len(selected) == 6 and {r["step"] for r in selected} == {"5"}
    assert (tmp_path / "out" / "accuracy_toy.png").stat().st_size > 0
    assert (tmp_path / "out" / "report.md").read_text().startswith("6 finished runs. Accuracy (%)")


def test_runs_outside_a_sweep_group_by_split_seed_and_seed(tmp_path):
    # Two init seeds on the same split are two trials, not two hyperparameter samples of one trial.
    for seed in (0, 1):
        make_run(
            tmp_path, f"s{seed}", ["A"], [{"step": 1, "acc": acc(A=(0.5 + seed / 10, 0.5))}], seed=seed, split_seed=0
        )
    runs, _ = load_runs([tmp_path])
    assert sorted(r.trial for r in runs) == ["0", "0/1"]
    cell = build_report(runs, ["training_domain_validation"]).tables[0].rows["erm"][0]
    assert (cell.n, cell.mean) == (2, pytest.approx(55.0))


def test_unfinished_runs_are_skipped_and_empty_dirs_fail(tmp_path):
    _three_trials(tmp_path)
    (tmp_path / "running").mkdir()
    (tmp_path / "running" / "train_config.json").write_text("{}")
    runs, notes = load_runs([tmp_path])
    assert len(runs) == 6 and notes == ["1 unfinished run(s) skipped"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DGZooError, match="no finished run"):
        load_runs([tmp_path / "empty"])
    with pytest.raises(DGZooError, match="does not exist"):
        load_runs([tmp_path / "nope"])


def test_unlearning_runs_are_not_mixed_into_dg_tables(tmp_path):
    _three_trials(tmp_path)
    unlearned = make_run(tmp_path, "unlearned", ["C"], [{"step": 5, "acc": acc()}])
    results = json.loads((unlearned / "results.json").read_text())
    (unlearned / "results.json").write_text(json.dumps({**results, "kind": "unlearning"}))
    runs, notes = load_runs([tmp_path])
    assert len(runs) == 6 and notes == [f"{unlearned.resolve()} is an unlearning run; skipped"]


def test_a_broken_run_directory_is_skipped_with_one_line_naming_it(tmp_path, capsys):
    _three_trials(tmp_path)
    bad_json = make_run(tmp_path, "bad-json", ["C"], [{"step": 5, "acc": acc()}])
    (bad_json / "results.json").write_text('{"dataset": ')  # truncated by a full disk, say
    no_domain = make_run(tmp_path, "no-domain", ["C"], [{"step": 5, "acc": {"A": {"in": 0.5, "out": 0.5}}}], seed=9)
    no_key = make_run(tmp_path, "no-key", ["C"], [{"step": 5, "acc": acc()}], seed=8)
    results = json.loads((no_key / "results.json").read_text())
    del results["target_domains"]
    (no_key / "results.json").write_text(json.dumps(results))
    runs, notes = load_runs([tmp_path])
    assert len(runs) == 6
    assert sorted(notes) == sorted(
        [
            f"skipped broken run {bad_json.resolve()}: results.json: invalid JSON (Expecting value: line 1 column 13 "
            "(char 12))",
            f"skipped broken run {no_domain.resolve()}: records.jsonl: missing 'B'",
            f"skipped broken run {no_key.resolve()}: results.json: missing 'target_domains'",
        ]
    )
    assert main(["report", str(tmp_path), "--selection", "oracle"]) == 0
    out = capsys.readouterr().out
    for broken in (bad_json, no_domain, no_key):
        assert sum(str(broken.resolve()) in line for line in out.splitlines()) == 1
    assert "| erm | 84.0 ± 1.7 | 65.0 ± 2.4 | 74.5 ± 1.9 |" in out  # the good runs' table is unchanged


def test_identical_runs_count_once_with_a_warning(tmp_path):
    import shutil

    _three_trials(tmp_path)
    alone = report_dirs([tmp_path], ["oracle"]).tables[0].rows["erm"]
    original = tmp_path / "toy-A-seed1"
    shutil.copytree(original, tmp_path / "copy-of-A-seed1")  # a copied run directory
    rerun = make_run(tmp_path, "rerun-B-seed2", ["B"], [{"step": 5, "acc": acc(B=(0.99, 0.5))}], seed=2)  # same run
    runs, notes = load_runs([tmp_path])
    assert len(runs) == 6
    assert notes == [
        f"warning: {(tmp_path / 'toy-A-seed1').resolve()} is identical to {(tmp_path / 'copy-of-A-seed1').resolve()} "
        "(same recipe, seeds, data and code); counted once",
        f"warning: {(tmp_path / 'toy-B-seed2').resolve()} is identical to {rerun.resolve()} (same recipe, seeds, "
        "data and code); counted once",
    ]
    report = report_dirs([tmp_path], ["oracle"])
    a, b, _ = report.tables[0].rows["erm"]
    assert (a, a.n) == (alone[0], 3)  # the copy adds no trial: same mean, same standard error
    assert b.n == 3 and b.mean == pytest.approx(100 * (0.60 + 0.70 + 0.99) / 3)  # the first in path order is kept
    # Another seed is another trial, not a duplicate.
    make_run(tmp_path, "toy-A-seed3", ["A"], [{"step": 5, "acc": acc(A=(0.5, 0.5))}], seed=3)
    assert report_dirs([tmp_path], ["oracle"]).tables[0].rows["erm"][0].n == 4


@pytest.mark.parametrize(
    "field, other",
    [
        ("code", {"dgzoo_version": "0.2.0", "git_commit": "b" * 40, "git_dirty": False}),
        ("dataset", {"name": "toy", "title": "Toy", "repo_id": "me/toy", "revision": "c" * 40}),
    ],
)
def test_runs_of_other_code_or_data_are_not_the_same_run(tmp_path, field, other):
    """Identity by content (dgzoo.run.identity): a run equal in recipe and seeds but trained by other code or on
    another commit of the data is another run, counted, not dropped as a copy of the first."""
    from dgzoo.run.identity import same_run

    first = make_run(tmp_path / "a", "toy-A-seed1", ["A"], [{"step": 5, "acc": acc(A=(0.9, 0.5))}], seed=1)
    second = make_run(tmp_path / "b", "toy-A-seed1", ["A"], [{"step": 5, "acc": acc(A=(0.7, 0.5))}], seed=1)
    results = json.loads((first / "results.json").read_text())
    results[field] = (
        {"dgzoo_version": "0.2.0", "git_commit": "a" * 40, "git_dirty": False}
        if field == "code"
        else {"name": "toy", "title": "Toy", "repo_id": "me/toy", "revision": "a" * 40}
    )
    (first / "results.json").write_text(json.dumps(results))
    assert same_run(results, results)
    changed = {**results, field: other}
    (second / "results.json").write_text(json.dumps(changed))
    assert not same_run(results, changed)
    runs, notes = load_runs([tmp_path])
    assert len(runs) == 2 and not any("identical" in n for n in notes)
