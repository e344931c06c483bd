"""The trust chain (issue 23): a published run can be repeated from what it published, its card points at what was
pushed, and no local path leaves the machine. Against the local Hub server, with the real clients.

- A Hub dataset whose ``main`` moves after training: ``dgzoo train --config train_config.json`` (and the card's
  command) still train on the commit the run read, and give identical weights.
- A push to a branch: the card's loading code and ``dgzoo eval`` command name that branch, and work.
- A local dataset given by absolute path, trained, pushed and swept: the path is in no file the Hub stores.
"""

import json
import logging
import shlex
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT
from test_hub import dgzoo_cli, last_json, make_image_folders, ok, run

TRAIN = [
    "--backbone",
    "test_resnet",
    "--image-size",
    "16",
    "--steps",
    "2",
    "--eval-every",
    "2",
    "--batch-size",
    "4",
    "--log-with",
    "none",
    "--num-workers",
    "0",
]

CARD = r"""
import json, sys, timm, torch
model_id, branch = sys.argv[1:3]
from huggingface_hub import HfApi, ModelCard
card = ModelCard.load(HfApi().hf_hub_download(model_id, "README.md", revision=branch))
plain = timm.create_model(f"hf-hub:{model_id}@{branch}", pretrained=True)  # what the card tells timm users
print(json.dumps({"text": card.text, "main_files": sorted(HfApi().list_repo_files(model_id)),
                  "config": json.load(open(HfApi().hf_hub_download(model_id, "config.json", revision=branch))),
                  "params": sum(p.numel() for p in plain.parameters())}))
"""


def _weights_equal(a, b):
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_a_run_repeats_after_the_datasets_main_moved_and_its_card_names_the_pushed_branch(hub_server, tmp_path):
    dataset_id, model_id = hub_server.unique_repo_id("moving-set"), hub_server.unique_repo_id("branch-model")
    folders = make_image_folders(tmp_path / "folders")
    ok(run(hub_server, tmp_path / "hf", dgzoo_cli("datasets", "convert", folders, "--push-to-hub", dataset_id)))
    first = tmp_path / "first"
    ok(
        run(
            hub_server,
            tmp_path / "hf",
            dgzoo_cli(
                "train",
                "--dataset",
                dataset_id,
                "--target-domains",
                "c",
                *TRAIN,
                "--output-dir",
                first,
                "--push-to-hub",
                model_id,
                "--hub-revision",
                "exp",
            ),
        )
    )
    results = json.loads((first / "results.json").read_text())
    sha = results["dataset"]["revision"]
    saved = json.loads((first / "train_config.json").read_text())
    assert saved["revision"] == sha and len(sha) == 40  # the commit, not `null` (which means "main, whenever")
    assert saved["provenance"]["given"]["revision"] is None and saved["provenance"]["dataset"]["revision"] == sha
    assert saved["provenance"]["code"]["dgzoo_version"] == results["code"]["dgzoo_version"]

    # main moves: half of domain "a" is gone, the images of "b" change.
    for image in sorted((folders / "a").rglob("*.png"))[::2]:
        image.unlink()
    for image in sorted((folders / "b").rglob("*.png")):
        image.write_bytes((folders / "c" / image.parent.name / image.name).read_bytes())
    ok(run(hub_server, tmp_path / "hf", dgzoo_cli("datasets", "convert", folders, "--push-to-hub", dataset_id)))
    moved = json.loads(
        ok(
            run(
                hub_server,
                tmp_path / "hf",
                [
                    sys.executable,
                    "-c",
                    f"import json; from huggingface_hub import HfApi; "
                    f"print(json.dumps(HfApi().dataset_info({dataset_id!r}).sha))",
                ],
            )
        ).stdout
    )
    assert moved != sha

    # The run's own recipe repeats it, bit for bit, on the commit it read.
    again = tmp_path / "again"
    ok(
        run(
            hub_server,
            tmp_path / "hf-again",
            dgzoo_cli("train", "--config", first / "train_config.json", "--output-dir", again),
        )
    )
    assert json.loads((again / "results.json").read_text())["dataset"]["revision"] == sha
    assert _weights_equal(first, again)
    # So does the card's command (the one `accelerate launch recipes/train.py` runs, here in one process).
    card_local = (first / "README.md").read_text()
    command = card_local.split("## Training recipe")[1].split("```bash\n")[1].split("\n```")[0]
    argv = shlex.split(command.replace("\\\n", " "))
    assert argv[:3] == ["accelerate", "launch", "recipes/train.py"] and f"--revision {sha}" in " ".join(argv)
    from_card = tmp_path / "from-card"
    ok(
        run(
            hub_server,
            tmp_path / "hf-card",
            [
                sys.executable,
                str(ROOT / "recipes" / "train.py"),
                *argv[3:],
                "--dataset",
                dataset_id,
                "--log-with",
                "none",
                "--num-workers",
                "0",
                "--output-dir",
                str(from_card),
            ],
        )
    )
    assert _weights_equal(first, from_card)

    # The card on the branch: plain timm, dgzoo and `dgzoo eval` all load the branch, not main (which has no model).
    out = last_json(
        ok(run(hub_server, tmp_path / "hf-load", [sys.executable, "-c", CARD, model_id, "exp"], token=False)).stdout
    )
    assert "model.safetensors" not in out["main_files"]
    text = out["text"]
    assert f'timm.create_model("hf-hub:{model_id}@exp"' in text
    assert f'dgzoo.from_pretrained("{model_id}", revision="exp")' in text
    eval_line = next(line for line in text.splitlines() if line.startswith(f"dgzoo eval {model_id}"))
    assert "--revision exp" in eval_line and f"--dataset-revision {sha}" in eval_line
    assert sha in text and out["config"]["dgzoo"]["dataset_revision"] == sha
    assert out["config"]["dgzoo"]["code"] == results["code"]  # the code version travels with the weights
    evaluated = tmp_path / "eval.json"
    ok(
        run(
            hub_server,
            tmp_path / "hf-load",
            [sys.executable, "-m", "dgzoo.cli", *shlex.split(eval_line)[1:], "--output", str(evaluated)],
            token=False,
        )
    )
    assert json.loads(evaluated.read_text())["accuracy"]["c"] == pytest.approx(results["accuracy_splits"]["c"]["in"])
    assert hub_server.errors == []


LOAD_RESULTS = r"""
import json, sys, datasets
repo = sys.argv[1]
report = datasets.load_dataset(repo, split="train")
picked = datasets.load_dataset(repo, "selected_runs", split="train")
print(json.dumps({"report_columns": report.column_names, "report_rows": len(report), "picked_rows": len(picked)}))
"""


@pytest.mark.slow
def test_an_absolute_dataset_path_is_in_no_published_file(hub_server, tmp_path):
    from dgzoo.experiments.launchers import run_sweep
    from dgzoo.experiments.sweep import SweepSpec

    data = make_image_folders(tmp_path / "private-home" / "my-data", per_class=3)
    secret = str(tmp_path / "private-home")
    sweep_dir = tmp_path / "private-home" / "sweep"
    spec = SweepSpec.from_dict(
        dict(
            datasets=[str(data)],
            algorithms=["erm"],
            test_domains=["c"],
            n_trials=1,
            output_dir=str(sweep_dir),
            train=dict(
                backbone="test_resnet",
                image_size=16,
                steps=2,
                eval_every=2,
                batch_size=4,
                lr=3e-3,
                log_with="none",
                num_workers=0,
            ),
        )
    )
    outcome = run_sweep(spec, log=lambda line: None)
    assert len(outcome.trained) == 1 and not outcome.failed
    [run_dir] = [p for p in sweep_dir.iterdir() if (p / "results.json").is_file()]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["dataset"]["name"] == "my-data" and len(results["dataset"]["fingerprint"]) == 16
    assert results["dataset"]["path"] == str(data)  # kept on this machine: the run can be repeated here

    # A run started from that run's weights by absolute path (--init-from) names it in its recipe and command.
    from dgzoo.config import TrainConfig
    from dgzoo.training.engine import train

    child = tmp_path / "private-home" / "child"
    train(
        TrainConfig.from_dict(
            dict(dataset=str(data), target_domains=["c"], init_from=str(run_dir), output_dir=str(child), **spec.train)
        )
    )
    assert str(run_dir) in (child / "README.md").read_text()  # the local card keeps it: it works on this machine

    prefix = "testuser/" + hub_server.unique_repo_id("abs").split("/")[1]
    single = hub_server.unique_repo_id("abs-single")
    ok(run(hub_server, tmp_path / "hf", dgzoo_cli("push", run_dir, single)))
    ok(run(hub_server, tmp_path / "hf", dgzoo_cli("push", sweep_dir, prefix)))
    ok(run(hub_server, tmp_path / "hf", dgzoo_cli("push", child, hub_server.unique_repo_id("abs-child"))))
    stored = [p for p in hub_server.storage_dir.rglob("*") if p.is_file()]
    assert len(stored) > 20
    leaks = [str(p) for p in stored if secret.encode() in p.read_bytes()]
    assert leaks == []
    card = json.loads(
        ok(
            run(
                hub_server,
                tmp_path / "hf",
                [
                    sys.executable,
                    "-c",
                    "import json, sys; from huggingface_hub import ModelCard; "
                    "print(json.dumps(ModelCard.load(sys.argv[1]).text))",
                    single,
                ],
            )
        ).stdout
    )
    assert results["dataset"]["fingerprint"] in card and "--dataset my-data" in card

    # The sweep's results repo is a dataset `datasets` can load: the report table, and the selected runs.
    loaded = last_json(
        ok(run(hub_server, tmp_path / "hf", [sys.executable, "-c", LOAD_RESULTS, f"{prefix}-results"])).stdout
    )
    assert loaded["report_rows"] >= 1 and loaded["picked_rows"] >= 1
    assert hub_server.errors == []


def test_a_cpu_run_records_its_compute_threads_and_a_repeat_with_others_is_named(trained_run):
    """On a CPU the thread count fixes the order of torch's parallel sums, so the same code, data and machine give
    other weights with another count (e.g. `accelerate launch`, one thread by default, against `python`, a thread
    per core): a CPU run records it, and repeating its recipe with another count says so and how to match it."""
    from dgzoo.data import load_dg_dataset
    from dgzoo.run.provenance import repeat_differences

    run_dir, results = trained_run
    recorded = json.loads((run_dir / "train_config.json").read_text())["provenance"]
    threads = recorded["cpu_threads"]  # the count when the shared run trained (other tests change it later)
    assert isinstance(threads, int) and threads >= 1
    assert json.loads((run_dir / "results.json").read_text())["cpu_threads"] == threads
    info = load_dg_dataset("rotated-digits").info()
    assert repeat_differences(recorded, info, threads) == []
    assert repeat_differences(recorded, info, None) == []  # repeated on an accelerator: the count plays no part
    assert repeat_differences(recorded, info, threads + 1) == [
        f"CPU compute threads {threads} -> {threads + 1} (set OMP_NUM_THREADS={threads} to match)"
    ]


@pytest.mark.slow
def test_repeating_a_recorded_run_with_other_code_or_data_says_so_in_one_line_before_training(tmp_path):
    """`dgzoo train --config RUN/train_config.json`: silent when the code and data are the ones the run recorded,
    one warning line naming each difference (code commit, local fingerprint, Hub commit) before the first step."""
    from conftest import tiny_config
    from dgzoo.config import TrainConfig
    from dgzoo.run.provenance import code_version, repeat_differences
    from dgzoo.training.engine import plan_run, train

    first = tiny_config(tmp_path, output_dir=str(tmp_path / "first"), steps=2, eval_every=2)
    train(first)
    recorded = tmp_path / "first" / "train_config.json"
    same = TrainConfig.from_yaml(recorded)
    same.output_dir = str(tmp_path / "same")
    assert repeat_differences(same.recorded_provenance, plan_run(same).data.info()) == []

    saved = json.loads(recorded.read_text())
    saved["provenance"]["code"] = {**code_version(), "git_commit": "f" * 40, "dgzoo_version": "0.0.1"}
    saved["provenance"]["dataset"] = {**saved["provenance"]["dataset"], "fingerprint": "0" * 16}
    saved["provenance"]["cpu_threads"] = torch.get_num_threads() + 3
    saved["output_dir"] = str(tmp_path / "moved")
    (tmp_path / "moved.json").write_text(json.dumps(saved))
    logger, records = logging.getLogger("dgzoo"), []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append  # (the dgzoo logger stops propagating once a run has set it up)
    logger.addHandler(handler)
    try:
        train(TrainConfig.from_yaml(tmp_path / "moved.json"))
    finally:
        logger.removeHandler(handler)
    lines = [r.getMessage() for r in records]
    warned = [i for i, line in enumerate(lines) if "repeats a recorded run" in line]
    assert len(warned) == 1 and "\n" not in lines[warned[0]]
    assert "dgzoo 0.0.1 (commit ffffffffffff" in lines[warned[0]] and "0" * 16 in lines[warned[0]]
    assert f"CPU compute threads {torch.get_num_threads() + 3} -> {torch.get_num_threads()}" in lines[warned[0]]
    # The run's own logging replaces the handler: what it caught was said before the run set up, let alone trained.
    assert not any(line.startswith("step ") for line in lines)

    # A Hub dataset: its recorded commit against the one this run resolved.
    hub = {"source": "hub", "repo_id": "user/pacs", "revision": "a" * 40, "fingerprint": None}
    moved = repeat_differences({"dataset": hub}, {**hub, "revision": "b" * 40})
    assert moved == [f"data user/pacs at commit {'a' * 40} -> user/pacs at commit {'b' * 40}"]
    assert repeat_differences({"dataset": hub}, hub) == []
