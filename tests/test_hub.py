"""The Hub, for real: convert and push a dataset, train from it by repo id, publish the run, load it back.

Everything runs against the local Hub-compatible server (tests/hub_server.py) with the real huggingface_hub,
datasets and timm clients. Hub clients read HF_ENDPOINT at import time, so every Hub-facing step runs in a
fresh subprocess; each script prints one JSON line that the test asserts on.
"""

import hashlib
import json
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, tiny_config

DOMAINS, CLASSES = ("a", "b", "c"), ("x", "y", "z")


def make_image_folders(root, per_class=4):
    """root/<domain>/<class>/<i>.png: 16x16 images whose colour depends on the class (learnable) and domain."""
    rng = np.random.default_rng(0)
    for d, domain in enumerate(DOMAINS):
        for c, cls in enumerate(CLASSES):
            (root / domain / cls).mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 60, (16, 16, 3)) + 70 * c + 15 * d
                Image.fromarray(pixels.astype(np.uint8)).save(root / domain / cls / f"{i}.png")
    return root


def snapshot(folder):
    """sha256 of every file under ``folder``: equal snapshots mean nothing was added, removed or changed."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def files_containing(folder, secret):
    return [str(p) for p in folder.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


def run(server, hf_home, args, token=True, **env):
    """Run a command with the Hub client environment; return the finished process (output captured)."""
    return subprocess.run(
        args,
        env=server.env(hf_home, token=token, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **env),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=hf_home.parent,
    )


def dgzoo_cli(*args):
    return [sys.executable, "-m", "dgzoo.cli", *map(str, args)]


def last_json(stdout):
    return json.loads(stdout.strip().splitlines()[-1])


def ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


LOAD = r"""
import contextlib, io, json, sys, torch, timm
model_id, x_path, dataset_id, out_path = sys.argv[1:5]
x = torch.load(x_path)
# First plain timm, before anything imports dgzoo: what any user without dgzoo gets.
plain = timm.create_model("hf-hub:" + model_id, pretrained=True).eval()
with torch.no_grad():
    out = {"timm_logits": plain(x).tolist(), "timm_labels": plain.pretrained_cfg["label_names"],
           "dgzoo_imported": "dgzoo" in sys.modules}
from PIL import Image
from huggingface_hub import HfApi, ModelCard
import dgzoo
from dgzoo.cli import main
loaded = dgzoo.from_pretrained(model_id)
with torch.no_grad():
    out["logits"] = loaded.model(x).tolist()
card = ModelCard.load(model_id)
out["eval_results"] = [{"config": r.dataset_config, "type": r.dataset_type, "value": r.metric_value,
                        "revision": r.dataset_revision} for r in card.data.eval_results]
table = io.StringIO()
with contextlib.redirect_stdout(table):
    out["eval_code"] = main(["eval", model_id, "--dataset", dataset_id, "--domains", "c", "a", "--split", "in",
                             "--split-seed", "0", "--output", out_path])
out.update(files=sorted(HfApi().list_repo_files(model_id)), class_names=loaded.class_names,
           training=loaded.model.training, eval_table=table.getvalue(),
           transform_shape=list(loaded.transform(Image.new("L", (9, 9))).shape),
           card={"library": card.data.library_name, "tags": card.data.tags, "license": card.data.license,
                 "datasets": card.data.datasets, "text": card.text})
print(json.dumps(out))
"""


@pytest.mark.slow
def test_dataset_to_hub_to_training_to_hub_to_timm(hub_server, tmp_path):
    dataset_id, model_id = hub_server.unique_repo_id("dg-set"), hub_server.unique_repo_id("dg-model")
    folders = make_image_folders(tmp_path / "folders")
    hf_home = tmp_path / "hf"
    convert = ok(
        run(
            hub_server,
            hf_home,
            dgzoo_cli(
                "datasets", "convert", folders, "--push-to-hub", dataset_id, "--output-dir", tmp_path / "parquet"
            ),
        )
    )
    assert "36 images, 3 classes" in convert.stdout and f"--dataset {dataset_id}" in convert.stdout

    # The real recipe on two processes (gloo): both read the dataset by repo id, only the main process pushes.
    run_dir = tmp_path / "run"
    first_request = len(hub_server.requests)
    train = ok(
        run(
            hub_server,
            tmp_path / "hf-train",
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node=2",
                str(ROOT / "recipes" / "train.py"),
                "--dataset",
                dataset_id,
                "--target-domains",
                "c",
                "--backbone",
                "test_resnet",
                "--image-size",
                "32",
                "--steps",
                "4",
                "--eval-every",
                "2",
                "--batch-size",
                "4",
                "--log-with",
                "none",
                "--num-workers",
                "0",
                "--output-dir",
                str(run_dir),
                "--push-to-hub",
                model_id,
            ],
        )
    )
    results = json.loads((run_dir / "results.json").read_text())
    assert results["dataset"]["repo_id"] == dataset_id and len(results["dataset"]["revision"]) == 40
    assert results["class_names"] == list(CLASSES) and results["source_domains"] == ["a", "b"]
    assert results["num_processes"] == 2 and f"published to {hub_server.endpoint}/{model_id}/commit/" in train.stdout
    during = [(method, path) for method, path, _ in hub_server.requests[first_request:]]
    assert len([1 for method, path in during if method == "POST" and f"{model_id}/commit/" in path]) == 1
    assert len([1 for _, path in during if path.startswith("/api/whoami")]) == 2  # rank 0 at start and at push

    import timm

    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        expected = timm.create_model(f"local-dir:{run_dir}", pretrained=True).eval()(x)
    # A fresh process, anonymous: plain timm `hf-hub:` first, then dgzoo (from_pretrained, the card, dgzoo eval).
    out = last_json(
        ok(
            run(
                hub_server,
                tmp_path / "hf-load",
                [sys.executable, "-c", LOAD, model_id, str(tmp_path / "x.pt"), dataset_id, str(tmp_path / "eval.json")],
                token=False,
            )
        ).stdout
    )
    assert not out["dgzoo_imported"] and out["timm_labels"] == list(CLASSES)
    assert torch.allclose(torch.tensor(out["timm_logits"]), expected, atol=1e-5)
    assert torch.allclose(torch.tensor(out["logits"]), expected, atol=1e-5)
    assert out["class_names"] == list(CLASSES) and out["training"] is False and out["transform_shape"] == [3, 32, 32]
    assert out["files"] == sorted(
        [
            ".gitattributes",
            "README.md",
            "config.json",
            "model.safetensors",
            "results.json",
            "records.jsonl",
            "train_config.json",
            "accuracy_per_domain.png",
            "training_curves.png",
            "samples_per_domain.png",
        ]
    )  # no checkpoints, no logs
    [held_out] = out["eval_results"]
    assert held_out["config"] == "default" and held_out["type"] == dataset_id
    assert held_out["value"] == pytest.approx(100 * results["accuracy"]["c"], abs=0.01)
    assert held_out["revision"] == results["dataset"]["revision"]
    card = out["card"]
    assert card["library"] == "timm" and "domain-generalization" in card["tags"] and card["datasets"] == [dataset_id]
    assert card["license"] == "unknown"  # a dataset dgzoo has no licence for
    assert f'timm.create_model("hf-hub:{model_id}"' in card["text"] and f"dgzoo eval {model_id}" in card["text"]
    # dgzoo eval with the run's split reproduces the run's held-out accuracy, and says which domains it trained on.
    assert out["eval_code"] == 0
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    assert evaluated["accuracy"]["c"] == pytest.approx(results["accuracy_splits"]["c"]["in"])
    assert evaluated["roles"] == {"c": "held-out", "a": "source"} and "trained on" in out["eval_table"]

    # The local parquet copy trains too, and the token is nowhere: not in the run, its output or the Hub's files.
    from dgzoo.data import load_dg_dataset

    local = load_dg_dataset(str(tmp_path / "parquet"))
    assert local.domains == list(DOMAINS) and local.class_names == list(CLASSES)
    assert files_containing(run_dir, hub_server.token) == []
    assert files_containing(hub_server.storage_dir, hub_server.token) == []
    assert hub_server.token not in train.stdout + train.stderr + convert.stdout + convert.stderr
    assert hub_server.errors == []


FAILURES = r"""
import contextlib, io, json, os, shlex, sys, timm
from huggingface_hub import HfApi, create_repo
from dgzoo.cli import main
from dgzoo.errors import DGZooError
import dgzoo
run_dir, repo, dataset_repo, bare_repo, token = sys.argv[1:6]
out = {}
# A timm repo holding only pickled weights (config.json + pytorch_model.bin), and an empty dataset repo.
folder = os.path.join(os.path.dirname(run_dir), "pickled")
timm.models.save_for_hf(timm.create_model("test_resnet", num_classes=3), folder, safe_serialization=False)
create_repo(bare_repo)
HfApi().upload_folder(repo_id=bare_repo, folder_path=folder)
create_repo(dataset_repo, repo_type="dataset")

def call(name, *args, env_token=token):
    os.environ.pop("HF_TOKEN", None)
    if env_token:
        os.environ["HF_TOKEN"] = env_token
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(list(args))
        except SystemExit as e:  # argparse rejects its input this way
            code = e.code
    out[name] = [code, err.getvalue()]
    return err.getvalue()

train = ["train", "--backbone", "test_resnet", "--steps", "2", "--log-with", "none", "--output-dir",
         os.path.join(os.path.dirname(run_dir), "never")]
call("push_no_token", "push", run_dir, repo, env_token=None)
call("train_no_token", *train, "--push-to-hub", repo, env_token=None)
call("push_bad_token", "push", run_dir, repo, env_token="hf_not_the_right_token_123")
call("push_invalid_id", "push", run_dir, "me/bad id!")
call("train_invalid_id", *train, "--push-to-hub", "me/bad..name")
failed = call("push_server_error", "push", run_dir, repo)  # the test armed a 500 on this repo's commit endpoint
retry = shlex.split(failed.split("retry with: ")[1])
assert retry[:2] == ["dgzoo", "push"], retry
call("retry", *retry[1:])
call("private_into_public", "push", run_dir, repo, "--private")
call("eval_missing_revision", "eval", repo, "--revision", "no-such-branch", "--dataset", "rotated-digits")
call("train_missing_dataset_revision", *train, "--dataset", dataset_repo, "--revision", "no-such-branch")
try:
    dgzoo.from_pretrained(bare_repo)
except DGZooError as e:
    out["pickle_only"] = [2, str(e)]
print(json.dumps(out))
"""


@pytest.mark.slow
def test_hub_failures_are_one_line_and_leave_the_run_intact(hub_server, trained_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run[0], run_dir)
    before = snapshot(run_dir)
    repo, bare_repo = hub_server.unique_repo_id("fail"), hub_server.unique_repo_id("pickled")
    dataset_repo = hub_server.unique_repo_id("empty-set")
    hub_server.fail_next("POST", f"/api/models/{repo}/commit/", status=500, message="Injected storage failure")
    proc = ok(
        run(
            hub_server,
            tmp_path / "hf",
            [sys.executable, "-c", FAILURES, str(run_dir), repo, dataset_repo, bare_repo, hub_server.token],
        )
    )
    out = last_json(proc.stdout)

    for name, (code, message) in out.items():
        if name == "retry":
            continue
        assert code == 2, (name, message)
        assert len(message.strip().splitlines()) == 1, (name, message)
        assert hub_server.token not in message and "hf_not_the_right_token_123" not in message, name
    assert "hf auth login" in out["push_no_token"][1] and "retry with: dgzoo push" in out["push_no_token"][1]
    assert "needs a Hugging Face token" in out["train_no_token"][1]
    assert "HTTP 401" in out["push_bad_token"][1] and "token is invalid or expired" in out["push_bad_token"][1]
    assert "'me/bad id!' is invalid" in out["push_invalid_id"][1]
    assert "'me/bad..name' is invalid" in out["train_invalid_id"][1]
    assert "HTTP 500: Injected storage failure" in out["push_server_error"][1]
    assert "The run directory is intact" in out["push_server_error"][1]
    assert out["retry"][0] == 0, out["retry"]
    assert "exists and is public" in out["private_into_public"][1]
    assert "revision 'no-such-branch' does not exist" in out["eval_missing_revision"][1]
    assert "revision 'no-such-branch' does not exist" in out["train_missing_dataset_revision"][1]
    assert f"{bare_repo} has no model.safetensors (only pytorch_model.bin)" in out["pickle_only"][1]

    assert snapshot(run_dir) == before
    assert not (tmp_path / "never").exists()  # the recipe failed before writing anything
    assert files_containing(tmp_path, hub_server.token) == []
    assert hub_server.token not in proc.stdout + proc.stderr
    downloads = [path for _, path, _ in hub_server.requests if bare_repo in path and "/resolve/" in path]
    assert not any(path.endswith(".bin") for path in downloads)  # the pickle was never downloaded
    assert hub_server.errors == []


def test_converted_image_folders_load_as_a_dg_dataset(tmp_path):
    from dgzoo.data import load_dg_dataset
    from dgzoo.data.convert import convert_image_folders, image_folder_root, write_parquet

    make_image_folders(tmp_path / "src" / "wrapper", per_class=2)
    with tarfile.open(tmp_path / "set.tar.gz", "w:gz") as archive:
        archive.add(tmp_path / "src" / "wrapper", arcname="wrapper")
    shutil.rmtree(tmp_path / "src")
    with image_folder_root(tmp_path / "set.tar.gz") as root:
        assert root.name == "wrapper"  # the wrapping folder inside the archive is descended into
        files = write_parquet(convert_image_folders(root), tmp_path / "out", shards=2)
    assert [f.name for f in files] == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    data = load_dg_dataset(str(tmp_path / "out"))  # the extracted images are gone: bytes were embedded
    assert data.domains == list(DOMAINS) and data.class_names == list(CLASSES)
    assert {d: len(r) for d, r in data.rows_by_domain.items()} == {d: 6 for d in DOMAINS}
    assert data.table[0]["image"].size == (16, 16)


def test_unsafe_archive_is_refused(tmp_path):
    from dgzoo.data.convert import image_folder_root
    from dgzoo.errors import DGZooError

    (tmp_path / "evil.png").write_bytes(b"x")
    with tarfile.open(tmp_path / "bad.tar", "w") as archive:
        archive.add(tmp_path / "evil.png", arcname="../evil.png")
    with pytest.raises(DGZooError, match="could not extract"):
        with image_folder_root(tmp_path / "bad.tar"):
            pass


def test_card_licence_results_per_domain_and_hub_usage(trained_run):
    from huggingface_hub import ModelCard

    from dgzoo.run.cards import render_card
    from dgzoo.run.rundir import read_json

    run_dir, results = trained_run
    config = read_json(run_dir / "train_config.json")
    two_targets = {**results, "target_domains": ["60", "75"], "source_domains": ["0", "15", "30", "45"]}
    card = ModelCard(render_card(two_targets, config, repo_id="me/digits-erm", run_dir=run_dir))
    assert card.data.license == "bsd-3-clause"  # rotated-digits' licence, not a blanket apache-2.0
    assert [r.metric_args["held_out_domain"] for r in card.data.eval_results] == ["60", "75"]  # not merged
    assert 'timm.create_model("hf-hub:me/digits-erm", pretrained=True)' in card.text
    assert "dgzoo eval me/digits-erm --dataset rotated-digits --domains 60 75 --split in" in card.text
    assert "@misc{alpaydin1998optical" in card.text  # the dataset is cited along with the algorithm
    overridden = ModelCard(render_card(results, config, repo_id="me/x", run_dir=run_dir, license="mit"))
    assert overridden.data.license == "mit" and "was set by the publisher" in overridden.text


def test_retry_command_and_push_validation_need_no_network(trained_run, tmp_path, monkeypatch):
    from dgzoo.errors import DGZooError
    from dgzoo.run.hub import push_run, retry_command
    from dgzoo.training.evaluation import label_mapping

    command = retry_command("runs/my run", "me/x", private=True, revision="v1", commit_message="it's done")
    assert command.endswith("me/x --private --revision v1 --commit-message 'it'\"'\"'s done'")
    assert "'" in command.split(" ")[2] and "my run" in command
    with pytest.raises(DGZooError, match="not a finished dgzoo run"):
        push_run(tmp_path, "me/x")
    with pytest.raises(DGZooError, match="cannot be pushed to: name a branch"):
        push_run(trained_run[0], "me/x", revision="a" * 40)
    assert label_mapping(["z", "x", "y"], ["x", "y", "z"], 3).tolist() == [1, 2, 0]
    with pytest.raises(DGZooError, match="classes the model does not predict: w"):
        label_mapping(["x", "y"], ["x", "w"], 2)


def test_recipe_with_an_invalid_repo_id_fails_before_training(tmp_path):
    from dgzoo.errors import DGZooError
    from dgzoo.training.engine import train

    with pytest.raises(DGZooError, match="has no namespace: write it as USER_OR_ORG/model"):
        train(tiny_config(tmp_path, push_to_hub="model"))
    assert not (tmp_path / "run").exists()


def test_published_json_files_carry_no_local_paths(tmp_path):
    from dgzoo.run.hub import _published_bytes

    (tmp_path / "train_config.json").write_text(
        json.dumps({"dataset": "/home/alice/data/vlcs", "output_dir": "/home/alice/runs/vlcs-erm", "steps": 5})
    )
    (tmp_path / "results.json").write_text(
        json.dumps({"dataset": {"path": "/home/alice/data/vlcs", "name": "vlcs"}, "accuracy": {"V": 0.5}})
    )
    assert json.loads(_published_bytes(tmp_path, "train_config.json")) == {
        "dataset": "vlcs",
        "output_dir": "vlcs-erm",
        "steps": 5,
    }
    assert json.loads(_published_bytes(tmp_path, "results.json"))["dataset"] == {"path": "vlcs", "name": "vlcs"}
    assert b"alice" not in _published_bytes(tmp_path, "results.json")


REFUSE = r"""
import contextlib, io, json, sys
from huggingface_hub import HfApi
from dgzoo.cli import main
out = {}
for name, run_dir, repo in zip(sys.argv[1::3], sys.argv[2::3], sys.argv[3::3]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["push", run_dir, repo])
    out[name] = [code, err.getvalue(), HfApi().repo_exists(repo)]
print(json.dumps(out))
"""


def test_push_refuses_nan_truncated_and_unparsable_runs_before_touching_the_hub(hub_server, trained_run, tmp_path):
    """dgzoo push checks that the run loads as published (config parses, safetensors reads whole and finite, timm
    builds it) before any Hub call: nothing is created, and the run directory is unchanged."""
    import torch
    from safetensors.torch import load_file, save_file

    cases = {}
    for name in ("nan", "truncated", "config"):
        run_dir = tmp_path / name
        shutil.copytree(trained_run[0], run_dir)
        cases[name] = (run_dir, hub_server.unique_repo_id(f"refused-{name}"))
    weights = load_file(str(cases["nan"][0] / "model.safetensors"))
    first = next(k for k, v in weights.items() if v.is_floating_point())
    weights[first] = torch.full_like(weights[first], float("nan"))
    save_file(weights, str(cases["nan"][0] / "model.safetensors"))
    data = (cases["truncated"][0] / "model.safetensors").read_bytes()
    (cases["truncated"][0] / "model.safetensors").write_bytes(data[: len(data) // 2])
    (cases["config"][0] / "config.json").write_text('{"architecture": "test_resnet", ')
    before = {name: snapshot(run_dir) for name, (run_dir, _) in cases.items()}
    start = len(hub_server.requests)
    args = [str(a) for name, (run_dir, repo) in cases.items() for a in (name, run_dir, repo)]
    out = last_json(ok(run(hub_server, tmp_path / "hf", [sys.executable, "-c", REFUSE, *args])).stdout)
    for name, (code, message, exists) in out.items():
        assert code == 2 and len(message.strip().splitlines()) == 1 and not exists, (name, message)
        assert "nothing was pushed" in message or "not published" in message, message
    assert f"holds non-finite weights (1 tensors, e.g. {first})" in out["nan"][1] and "--lr" in out["nan"][1]
    assert "truncated or corrupt" in out["truncated"][1]
    assert "config.json is not valid JSON" in out["config"][1]
    # The only requests are the final existence checks: no whoami, no repo creation, no upload.
    assert [path for _, path, _ in hub_server.requests[start:]] == [f"/api/models/{repo}" for _, repo in cases.values()]
    assert {name: snapshot(run_dir) for name, (run_dir, _) in cases.items()} == before


def test_server_metadata_check_refuses_what_the_old_cards_wrote(hub_server):
    """The local Hub's /api/validate-yaml, which every written card passes in the tests, refuses the defects the
    cards used to have: a config with a space, an invented licence id, `other` without a name."""
    import urllib.error
    import urllib.request

    def check(front):
        body = json.dumps({"repoType": "model", "content": f"---\n{front}\n---\n# card\n"}).encode()
        request = urllib.request.Request(
            f"{hub_server.endpoint}/api/validate-yaml",
            data=body,
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request) as response:
                return response.status, ""
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    result = (
        "model-index:\n- name: m\n  results:\n  - task: {type: image-classification}\n"
        "    dataset: {type: flwrlabs/office-home, name: OfficeHome, config: %s, split: train}\n"
        "    metrics: [{type: accuracy, value: 61.5}]"
    )
    assert check("license: mit\n" + result % "held-out-real-world") == (200, "")
    status, message = check("license: mit\n" + result % "'held-out-Real World'")
    assert status == 400 and "dataset.config 'held-out-Real World' is not an identifier" in message
    status, message = check("license: fair-use-non-commercial-research")
    assert status == 400 and "must be a Hub licence id" in message
    assert check("license: other")[0] == 400
    assert check("license: other\nlicense_name: fair-use-notice")[0] == 200
