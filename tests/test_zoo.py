"""The zoo on the Hub, end to end against the local Hub server: a sweep of six runs (two algorithms x three trial
seeds) is published with one `dgzoo push SWEEP_DIR PREFIX`; `dgzoo zoo leaderboard` then prints exactly what
`dgzoo report` prints for the local run directories, `dgzoo zoo best` names the repo of the best checkpoint and
plain timm loads it; every card written validates through the server's metadata check and `ModelCard`.

The Hub clients read HF_ENDPOINT at import time, so the Hub side runs in one fresh subprocess (one JSON line).
"""

import contextlib
import io
import json
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from dgzoo.cli import main
from hub_server import HubServer

TINY = dict(
    backbone="test_resnet",
    image_size=8,
    steps=2,
    eval_every=2,
    checkpoint_every=2,
    batch_size=8,
    lr=3e-3,
    eval_batch_size=512,
    log_with="none",
    num_workers=0,
)

ZOO = r"""
import contextlib, io, json, sys, torch, timm
sweep_dir, prefix, x_path = sys.argv[1:4]
x = torch.load(x_path)
from huggingface_hub import DatasetCard, HfApi, ModelCard
import dgzoo
from dgzoo.cli import main

def cli(*args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()

result = {"push": cli("push", sweep_dir, prefix)}
result["leaderboard"] = cli("zoo", "leaderboard", "--dataset", "rotated-digits", "--author", "testuser")
result["csv"] = cli("zoo", "leaderboard", "--format", "csv")
result["best"] = cli("zoo", "best", "--dataset", "rotated-digits", "--held-out", "75")
result["list"] = cli("zoo", "list", "--algorithm", "pcgrad", "--json")
result["python_list"] = sorted(m.repo_id for m in dgzoo.list_models(algorithm="erm", held_out="75"))
result["none"] = cli("zoo", "list", "--dataset", "pacs")
best = result["best"][1].strip()
plain = timm.create_model("hf-hub:" + best, pretrained=True).eval()
with torch.no_grad():
    result["best_logits"] = plain(x).tolist()
api = HfApi()
models = sorted(m.id for m in api.list_models(author="testuser"))
result["models"] = models
cards, problems = {}, []
for repo in models:
    card = ModelCard.load(repo)
    try:
        card.validate()
    except ValueError as e:
        problems.append(f"{repo}: {e}")
    cards[repo] = card.data.to_dict()
results_repo = prefix + "-results"
dataset_card = DatasetCard.load(results_repo, repo_type="dataset")
try:
    dataset_card.validate()
except ValueError as e:
    problems.append(f"{results_repo}: {e}")
result["problems"] = problems
result["cards"] = cards
result["results_files"] = sorted(api.list_repo_files(results_repo, repo_type="dataset"))
result["results_readme"] = dataset_card.text
result["published_config"] = json.load(open(api.hf_hub_download(models[0], "config.json")))
print(json.dumps(result))
"""


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """erm and pcgrad x held-out 75 x 3 trial seeds on rotated-digits: six tiny finished runs and sweep.json."""
    from dgzoo.experiments.launchers import run_sweep
    from dgzoo.experiments.sweep import SweepSpec

    root = tmp_path_factory.mktemp("zoo") / "sweep"
    spec = SweepSpec.from_dict(
        dict(
            datasets=["rotated-digits"],
            algorithms=["erm", "pcgrad"],
            test_domains=["75"],
            n_trials=3,
            output_dir=str(root),
            train=dict(TINY),
        )
    )
    outcome = run_sweep(spec, log=lambda line: None)
    assert len(outcome.trained) == 6 and not outcome.failed
    return root


@pytest.mark.slow
def test_sweep_published_as_a_zoo_ranks_like_the_local_report(sweep, tmp_path):
    local = io.StringIO()
    with contextlib.redirect_stdout(local):
        assert main(["report", str(sweep)]) == 0
    local_csv = io.StringIO()
    with contextlib.redirect_stdout(local_csv):
        assert main(["report", str(sweep), "--format", "csv"]) == 0
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.save(x, tmp_path / "x.pt")
    with HubServer(tmp_path / "storage") as server:  # its own Hub: no other test's models in the listing
        prefix = "testuser/rd-sweep"
        proc = subprocess.run(
            [sys.executable, "-c", ZOO, str(sweep), prefix, str(tmp_path / "x.pt")],
            env=server.env(tmp_path / "hf", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"),
            capture_output=True,
            text=True,
            timeout=600,
            cwd=tmp_path,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        assert server.errors == []
        collections = list((server.storage_dir / "collections").glob("*.json"))
        assert len(collections) == 1
        collection = json.loads(collections[0].read_text())
    for name in ("push", "leaderboard", "csv", "best", "list", "none"):
        assert out[name][0] == 0, (name, out[name])

    # The leaderboard from the Hub is the local report, to the character (mean ± SE over the three trial seeds).
    assert out["leaderboard"][1] == local.getvalue()
    assert out["csv"][1] == local_csv.getvalue()
    assert "| erm | " in local.getvalue() and "n = 3 trial seeds" in local.getvalue()

    # Six model repos plus the results repo, all in one collection whose first item is the report.
    runs = sorted(p.name for p in sweep.iterdir() if (p / "results.json").is_file())
    expected = sorted(f"{prefix}-{r}" for r in runs)
    assert out["models"] == expected
    manifest_order = [r["run_dir"] for r in json.loads((sweep / "sweep.json").read_text())["runs"]]
    assert [(i["type"], i["id"]) for i in collection["items"]] == [("dataset", f"{prefix}-results")] + [
        ("model", f"{prefix}-{r}") for r in manifest_order
    ]
    assert {
        "README.md",
        "report.md",
        "report.csv",
        "selected_runs.csv",
        "sweep.json",
        "accuracy_rotated-digits.png",
    } <= set(out["results_files"])
    assert local.getvalue() in out["results_readme"]

    # `best`: the top row by mean over trials, then its best trial, as the local report's picks say.
    from dgzoo.experiments.report import report_dirs

    picks = report_dirs([sweep]).picks["training_domain_validation"]
    rows = {}
    for (_, row, _, _), pick in picks.items():
        rows.setdefault(row, []).append(pick)
    top = max(rows, key=lambda r: sum(p.test for p in rows[r]) / 3)
    best_run = max(rows[top], key=lambda p: p.test).run.path
    assert out["best"][1].strip() == f"{prefix}-{best_run.name}"
    import timm

    with torch.no_grad():
        expected_logits = timm.create_model(f"local-dir:{best_run}", pretrained=True).eval()(x)
    assert torch.allclose(torch.tensor(out["best_logits"]), expected_logits, atol=1e-5)

    # Filters: by algorithm (CLI and Python), and nothing for a dataset no run used.
    listed = [json.loads(line) for line in out["list"][1].splitlines()]
    assert sorted(m["repo_id"] for m in listed) == [r for r in expected if "pcgrad" in r]
    assert out["python_list"] == [r for r in expected if "-erm-" in r]
    assert out["none"][1].splitlines()[1:] == [] and "no published dgzoo model" in out["none"][2]

    # Every card written passes the server's metadata check and huggingface_hub's parser; the zoo block records
    # the sweep, and the published config describes the fine-tuned weights.
    assert out["problems"] == []
    for repo, card in out["cards"].items():
        meta = card["dgzoo"]
        assert meta["run"] == repo[len(prefix) + 1 :] and meta["trial_seed"] in (0, 1, 2) and meta["hparams_seed"] == 0
        assert len({c["dgzoo"]["sweep"] for c in out["cards"].values()}) == 1
    cfg = out["published_config"]["pretrained_cfg"]
    assert cfg["hf_hub_id"] == out["models"][0] and "tag" not in cfg and "paper_ids" not in cfg
    assert cfg["license"] == "bsd-3-clause" and cfg["notes"] == ["trained from random initialisation"]


TWO_SWEEPS = r"""
import contextlib, io, json, sys
from dgzoo.cli import main

def cli(*args):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = main(list(args))
    return code, out.getvalue()

first, second = sys.argv[1:3]
result = {"push_one": cli("push", first, "testuser/one"), "push_two": cli("push", second, "testuser/two")}
result["leaderboard"] = cli("zoo", "leaderboard", "--dataset", "rotated-digits")
print(json.dumps(result))
"""


@pytest.mark.slow
def test_two_published_sweeps_of_one_spec_are_not_merged_and_the_leaderboard_is_the_report(tmp_path):
    """Two sweeps of one spec (same sweep id on their cards) that trained with other code are two sets of runs to
    `dgzoo report` and to the leaderboard alike (dgzoo.run.identity), not one set counted once."""
    import shutil

    from dgzoo.experiments.launchers import run_sweep
    from dgzoo.experiments.sweep import SweepSpec

    first = tmp_path / "a" / "sweep"
    spec = SweepSpec.from_dict(
        dict(
            datasets=["rotated-digits"],
            algorithms=["erm"],
            test_domains=["75"],
            n_trials=2,
            output_dir=str(first),
            train=dict(TINY),
        )
    )
    assert len(run_sweep(spec, log=lambda line: None).trained) == 2
    second = tmp_path / "b" / "sweep"  # the same spec, run again by other code: other numbers
    shutil.copytree(first, second)
    for results_path in second.glob("*/results.json"):
        results = json.loads(results_path.read_text())
        results["code"] = {**results["code"], "git_commit": "f" * 40, "git_dirty": False}
        results_path.write_text(json.dumps(results))
        records = [json.loads(line) for line in (results_path.parent / "records.jsonl").read_text().splitlines()]
        for record in records:
            record["acc"] = {d: {"in": 0.99, "out": 0.99} for d in record["acc"]}
        (results_path.parent / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))

    def report(*dirs):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main(["report", *map(str, dirs)]) == 0
        return out.getvalue()

    both, alone = report(first, second), report(first)
    assert both != alone and "99.0" in both  # the second sweep's runs count: not dropped as copies of the first
    with HubServer(tmp_path / "storage") as server:
        proc = subprocess.run(
            [sys.executable, "-c", TWO_SWEEPS, str(first), str(second)],
            env=server.env(tmp_path / "hf", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"),
            capture_output=True,
            text=True,
            timeout=600,
            cwd=tmp_path,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["push_one"][0] == 0 and out["push_two"][0] == 0 and out["leaderboard"][0] == 0
    assert out["leaderboard"][1] == both
