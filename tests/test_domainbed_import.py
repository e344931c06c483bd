"""dgzoo report on DomainBed sweep output: run directories laid out as DomainBed's train.py writes them give the
same tables as dgzoo runs holding the same evaluations, under all three selection methods."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from dgzoo.cli import main
from dgzoo.experiments.report import load_runs, report_dirs, top_hparams

PACS = ("art_painting", "cartoon", "photo", "sketch")  # dgzoo's names for DomainBed's PACS environments A, C, P, S
STEPS = (0, 300, 600)
HELD_OUT = [(e,) for e in range(4)] + [(a, b) for a in range(4) for b in range(a + 1, 4)]


def evaluations(seed: int):
    """Per step, every environment's (in, out) accuracy: arbitrary but fixed numbers."""
    rng = np.random.RandomState(seed)
    return [
        (step, [(round(float(rng.uniform(0.3, 0.95)), 4), round(float(rng.uniform(0.3, 0.95)), 4)) for _ in PACS])
        for step in STEPS
    ]


def grid():
    """(test_envs, hparams_seed, trial_seed, lr, evaluations) of a DomainBed sweep: singles and pairs, 2 x 2."""
    for trial in range(2):
        for hp in range(2):
            for test_envs in HELD_OUT:
                seed = 1000 * trial + 100 * hp + 10 * test_envs[0] + (test_envs[1] if len(test_envs) > 1 else 9)
                yield list(test_envs), hp, trial, 5e-5 * (hp + 1), evaluations(seed)


def write_domainbed_run(root: Path, test_envs, hp, trial, lr, evals, done=True):
    """A run directory exactly as DomainBed's scripts/train.py leaves it (sweep.py names it by the args' md5)."""
    args = {
        "algorithm": "ERM",
        "checkpoint_freq": 300,
        "data_dir": "/data",
        "dataset": "PACS",
        "holdout_fraction": 0.2,
        "hparams": None,
        "hparams_seed": hp,
        "output_dir": "",
        "save_model_every_checkpoint": False,
        "seed": 12345 + hp + trial,
        "skip_model_save": False,
        "steps": 601,
        "task": "domain_generalization",
        "test_envs": test_envs,
        "trial_seed": trial,
        "uda_holdout_fraction": 0,
    }
    name = hashlib.md5(json.dumps(args, sort_keys=True).encode()).hexdigest()
    out = root / name
    args["output_dir"] = str(out)
    out.mkdir(parents=True)
    hparams = {
        "batch_size": 32,
        "class_balanced": False,
        "data_augmentation": True,
        "lr": lr,
        "nonlinear_classifier": False,
        "resnet18": False,
        "resnet_dropout": 0.0,
        "weight_decay": 0.0,
    }
    with open(out / "results.jsonl", "w") as f:
        for step, accs in evals:
            record = {
                "step": step,
                "epoch": step / 50.0,
                "loss": 0.5,
                "mem_gb": 4.2,
                "step_time": 0.3,
                "hparams": hparams,
                "args": args,
            }
            for i, (acc_in, acc_out) in enumerate(accs):
                record[f"env{i}_in_acc"], record[f"env{i}_out_acc"] = acc_in, acc_out
            f.write(json.dumps(record, sort_keys=True) + "\n")
    (out / "out.txt").write_text("Environment:\n\tPython: 3.8\n")
    (out / "err.txt").write_text("")
    if done:
        (out / "model.pkl").write_bytes(b"\x80\x04N.")
        (out / "done").write_text("done")
    return out


def write_dgzoo_run(root: Path, name: str, test_envs, hp, trial, lr, evals):
    """The dgzoo run directory (the files the report reads) holding the same evaluations."""
    out = root / name
    out.mkdir(parents=True)
    targets = [PACS[e] for e in test_envs]
    results = {
        "dataset": {"name": "pacs", "title": "PACS"},
        "algorithm": "erm",
        "backbone": "resnet50",
        "pretrained": True,
        "steps": 600,
        "seed": 12345 + hp + trial,
        "split_seed": trial,
        "source_domains": [d for d in PACS if d not in targets],
        "target_domains": targets,
        "accuracy": {d: 0.0 for d in PACS},
        "hparams": {"lr": lr},
    }
    (out / "results.json").write_text(json.dumps(results))
    (out / "train_config.json").write_text("{}")
    (out / "records.jsonl").write_text(
        "".join(
            json.dumps({"step": step, "acc": {d: {"in": a, "out": b} for d, (a, b) in zip(PACS, accs)}}) + "\n"
            for step, accs in evals
        )
    )


@pytest.fixture
def both(tmp_path):
    domainbed, dgzoo = tmp_path / "domainbed_sweep", tmp_path / "dgzoo_sweep"
    entries = []
    for i, (test_envs, hp, trial, lr, evals) in enumerate(grid()):
        write_domainbed_run(domainbed, test_envs, hp, trial, lr, evals)
        name = f"run{i}"
        write_dgzoo_run(dgzoo, name, test_envs, hp, trial, lr, evals)
        entries.append({"run_dir": name, "trial_seed": trial, "hparams_seed": hp})
    (dgzoo / "sweep.json").write_text(json.dumps({"runs": entries}))
    return domainbed, dgzoo


def cells(report, rename=None):
    return [
        (t.method, t.dataset, t.title, t.columns, {(rename or {}).get(r, r): c for r, c in t.rows.items()})
        for t in report.tables
    ]


def test_domainbed_runs_give_the_same_tables_as_the_matching_dgzoo_runs(both):
    domainbed, dgzoo = both
    runs, notes = load_runs([domainbed])
    assert len(runs) == 40 and notes == []
    run = next(r for r in runs if r.targets == ("sketch",) and r.trial == "1" and r.hparams_seed == 1)
    assert run.dataset == "pacs" and run.domains == PACS and run.sources == PACS[:3]
    assert run.records[1]["acc"]["cartoon"] == {
        "in": evaluations(1100 + 39)[1][1][1][0],
        "out": evaluations(1100 + 39)[1][1][1][1],
    }
    ours, theirs = report_dirs([dgzoo]), report_dirs([domainbed])
    assert [t.method for t in theirs.tables] == [
        "training_domain_validation",
        "training_domain_validation",
        "leave_one_domain_out",
        "leave_one_domain_out",
        "oracle",
        "oracle",
    ]
    assert cells(theirs, {"ERM": "erm"}) == cells(ours)
    assert theirs.tables[0].columns == [*PACS, "Avg"] and theirs.tables[0].rows["ERM"][0].n == 2


def test_domainbed_and_dgzoo_runs_share_one_table(both, capsys):
    domainbed, dgzoo = both
    assert main(["report", str(domainbed), str(dgzoo), "--format", "csv"]) == 0
    rows = capsys.readouterr().out.splitlines()
    mine = {tuple(r.split(",")[i] for i in (0, 1, 3)): r.split(",")[4:] for r in rows if ",erm (resnet50)," in r}
    theirs = {
        tuple(r.split(",")[i] for i in (0, 1, 3)): r.split(",")[4:] for r in rows if ",ERM (DomainBed ResNet-50)," in r
    }
    assert len(mine) == 3 * (5 + 2) and mine == theirs  # same cells, two rows of one table


def test_unfinished_domainbed_runs_are_skipped_and_top_hparams_lists_the_choice(both):
    domainbed, dgzoo = both
    write_domainbed_run(domainbed, [0], 7, 0, 1e-3, evaluations(7), done=False)  # still training: no done file
    runs, notes = load_runs([domainbed])
    assert len(runs) == 40 and notes == ["1 unfinished run(s) skipped"]
    listing = top_hparams([domainbed], ["training_domain_validation"]).splitlines()
    assert listing[0] == "# training-domain validation set"
    block = listing[listing.index("pacs ERM held-out art_painting") + 1 :][:4]
    picks = report_dirs([dgzoo], ["training_domain_validation"]).picks["training_domain_validation"]
    for trial in (0, 1):
        pick = picks[("pacs", "erm", ("art_painting",), str(trial))]
        line, values = block[2 * trial], block[2 * trial + 1]
        assert line.startswith(
            f"  trial {trial}: hp{pick.run.hparams_seed} val {100 * pick.val:.1f} "
            f"test {100 * pick.test:.1f} step {pick.step}  {domainbed}"
        )
        assert f"lr={5e-5 * (pick.run.hparams_seed + 1):.4g}" in values and "resnet18=False" in values
