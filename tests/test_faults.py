"""Fault injection: what survives which fault, and what dgzoo refuses (README, "What dgzoo guarantees").

Each test reproduces a fault a user met (two writers in one directory, a diverging run, a corrupt checkpoint,
a corrupt image, a missing label, a one-image domain, Ctrl-C, a kill before the first checkpoint) and checks the
one-line answer and that nothing already written is lost.
"""

from __future__ import annotations

import io
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, subprocess_env, tiny_config
from dgzoo.errors import DGZooError
from dgzoo.run.claim import CLAIM_FILE, RunDirClaimed, claim_holder, claim_run_dir
from dgzoo.training.engine import train


def _hold_claim(run_dir: Path) -> subprocess.Popen:
    """A separate live process holding the claim on ``run_dir`` (what a running `dgzoo train` does)."""
    code = (
        "import sys, time; from dgzoo.run.claim import claim_run_dir\n"
        "with claim_run_dir(sys.argv[1], 'dgzoo train erm'):\n"
        "    print('held', flush=True); time.sleep(600)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(run_dir)], env=subprocess_env(), stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


# ---------------------------------------------------------------------- two writers


def test_a_live_run_directory_refuses_a_second_writer_even_with_overwrite(tmp_path):
    cfg = tiny_config(tmp_path, steps=6, eval_every=6)
    train(cfg)
    run_dir = Path(cfg.output_dir)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    holder = _hold_claim(run_dir)
    try:
        assert claim_holder(run_dir)["pid"] == holder.pid
        with pytest.raises(RunDirClaimed, match=rf"in use by dgzoo train erm \(pid {holder.pid}"):
            train(tiny_config(tmp_path, steps=6, eval_every=6, overwrite=True, seed=1))
        with pytest.raises(RunDirClaimed):
            train(tiny_config(tmp_path, steps=9, eval_every=6, resume=True))
        # the live run's files are untouched: nothing deleted, nothing mixed in
        assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.name != CLAIM_FILE} == before
    finally:
        holder.kill()
        holder.wait()
    # a killed holder does not block the directory forever: its stale claim is taken over
    assert claim_holder(run_dir) is None
    results = train(tiny_config(tmp_path, steps=6, eval_every=6, overwrite=True, seed=1))
    assert results["seed"] == 1 and json.loads((run_dir / "train_config.json").read_text())["seed"] == 1
    assert not (run_dir / CLAIM_FILE).exists()


def test_claims_are_exclusive_within_one_host(tmp_path):
    with claim_run_dir(tmp_path / "run", "first"):
        with pytest.raises(RunDirClaimed, match="in use by first"):
            with claim_run_dir(tmp_path / "run", "second"):
                pass
    with claim_run_dir(tmp_path / "run", "second"):  # released on exit
        assert claim_holder(tmp_path / "run")["purpose"] == "second"


def test_a_claim_from_another_host_expires_without_heartbeat(tmp_path, monkeypatch):
    from dgzoo.run import claim

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    path = run_dir / CLAIM_FILE
    path.write_text(json.dumps({"pid": 1, "host": "other-node", "purpose": "slurm job", "heartbeat_s": 0.1}))
    assert claim_holder(run_dir)["host"] == "other-node"  # fresh heartbeat: live, whatever its pid
    old = time.time() - claim.CLAIM_TTL_S - 1
    os.utime(path, (old, old))
    assert claim_holder(run_dir) is None  # no heartbeat for a TTL, and none while watched: its job is gone


# ---------------------------------------------------------------------- divergence


def test_a_non_finite_loss_stops_the_run_and_nothing_non_finite_is_exported(tmp_path, monkeypatch):
    from dgzoo.algorithms.erm import ERM

    real = ERM.loss

    def diverging(self, minibatches, step):
        loss, metrics = real(self, minibatches, step)
        if step >= 7:  # the weights become NaN through a NaN loss at step 8, after the step-6 checkpoint
            loss = loss * float("nan")
        return loss, metrics

    monkeypatch.setattr(ERM, "loss", diverging)
    cfg = tiny_config(tmp_path, steps=12, eval_every=3, checkpoint_every=6)
    with pytest.raises(DGZooError, match=r"loss became nan at step 8.*checkpoints up to step_6 are finite.*--lr"):
        train(cfg)
    run_dir = Path(cfg.output_dir)
    assert not (run_dir / "results.json").exists() and not (run_dir / "README.md").exists()
    weights = load_file(run_dir / "model.safetensors")  # exported at the best finite evaluation only
    assert all(torch.isfinite(t).all() for t in weights.values() if t.is_floating_point())
    records = [json.loads(line) for line in (run_dir / "records.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 6]  # no evaluation of the diverged network


def test_export_refuses_non_finite_weights(tmp_path):
    import timm

    from dgzoo.run.rundir import save_model

    model = timm.create_model("test_resnet", pretrained=False, num_classes=3)
    with torch.no_grad():
        next(model.parameters())[0] = float("inf")
    with pytest.raises(DGZooError, match="refusing to export non-finite weights"):
        save_model(model, tmp_path / "out", ["a", "b", "c"], {}, {})
    assert not (tmp_path / "out" / "model.safetensors").exists()


# ---------------------------------------------------------------------- checkpoints


def test_resume_skips_a_truncated_newest_checkpoint_and_says_why(tmp_path):
    reference = train(tiny_config(tmp_path / "ref", steps=9, eval_every=3, checkpoint_every=3))
    cfg = tiny_config(tmp_path, steps=6, eval_every=3, checkpoint_every=3)
    train(cfg)
    run_dir = Path(cfg.output_dir)
    newest = run_dir / "checkpoints" / "step_6" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # e.g. a full disk while writing
    resumed = train(tiny_config(tmp_path, steps=9, eval_every=3, checkpoint_every=3, resume=True))
    log = (run_dir / "train.log").read_text()
    assert "skipped checkpoint step_6: model.safetensors is 100 bytes" in log and "checkpoints/step_3 at step 3" in log
    # resumed from step_3, and the resume is exact: the same run as one trained straight through
    ref_weights = load_file(Path(tmp_path / "ref" / "run") / "model.safetensors")
    weights = load_file(run_dir / "model.safetensors")
    assert all(torch.equal(ref_weights[k], weights[k]) for k in ref_weights)
    assert resumed["accuracy"] == reference["accuracy"]


def test_no_intact_checkpoint_is_one_line(tmp_path):
    cfg = tiny_config(tmp_path, steps=3, eval_every=3, keep_checkpoints=1)
    train(cfg)
    ckpt = Path(cfg.output_dir) / "checkpoints" / "step_3"
    for f in ckpt.iterdir():
        if f.suffix in (".bin", ".pkl", ".safetensors"):
            f.write_bytes(b"")
    with pytest.raises(DGZooError, match=r"no intact checkpoint in .*step_3: .* is 0 bytes.*--overwrite"):
        train(tiny_config(tmp_path, steps=6, eval_every=3, keep_checkpoints=1, resume=True))


def test_a_run_killed_before_its_first_checkpoint_restarts_with_resume(tmp_path):
    cfg = tiny_config(tmp_path, steps=6, eval_every=3)
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True)
    (run_dir / "train_config.json").write_text(json.dumps(cfg.to_dict()))  # what a run writes first
    with pytest.raises(DGZooError, match="stopped before its first checkpoint; pass --resume"):
        train(cfg)
    results = train(tiny_config(tmp_path, steps=6, eval_every=3, resume=True))  # the suggested fix works
    assert results["steps"] == 6 and (run_dir / "results.json").exists()


# ---------------------------------------------------------------------- data


def _image_folder(root: Path, domains: dict[str, int], corrupt: tuple[str, int] | None = None) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for domain, n in domains.items():
        for i in range(n):
            folder = root / domain / ("cat" if i % 2 else "dog")
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / f"{i:03d}.png"
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(path)
            if corrupt == (domain, i):
                path.write_bytes(path.read_bytes()[:60])  # truncated: the header opens, the pixels do not
    return root


@pytest.mark.parametrize("where", ["a", "c"], ids=["source", "held-out"])
def test_a_corrupt_image_is_one_line_before_anything_is_written(tmp_path, where):
    data = _image_folder(tmp_path / "data", {"a": 8, "b": 8, "c": 8}, corrupt=(where, 5))
    cfg = tiny_config(tmp_path, dataset=str(data), target_domains=["c"], image_size=16, steps=2, eval_every=2)
    with pytest.raises(
        DGZooError,
        match=rf"image of domain '{where}', row \d+ \(file .*{where}/cat/005.png\) does "
        rf"not decode .*replace or remove it",
    ):
        train(cfg)
    assert not Path(cfg.output_dir).exists()


def test_a_decode_failure_during_training_names_the_image(tmp_path):
    from dgzoo.data import DomainImages, load_dg_dataset
    from dgzoo.data.verify import ImageDecodeError

    root = _image_folder(tmp_path / "data", {"a": 4, "b": 4}, corrupt=("b", 2))
    data = load_dg_dataset(str(root))
    images = DomainImages(data, data.rows_by_domain["b"], lambda x: x, "b")
    # rows: b/cat/001, b/cat/003, b/dog/000, b/dog/002 (folders and files in name order)
    with pytest.raises(ImageDecodeError, match=r"domain 'b', row 7 \(file .*b/dog/002.png\)") as raised:
        images[3]
    # re-raised from a DataLoader worker, the message is still our one line
    wrapped = type(raised.value)(
        f"Caught ImageDecodeError in DataLoader worker process 0.\nOriginal Traceback "
        f"(most recent call last):\n  File x\ndgzoo.data.verify.ImageDecodeError: {raised.value}"
    )
    assert str(wrapped) == str(raised.value)


def test_a_missing_label_is_refused_not_made_a_class(tmp_path):
    import datasets

    from dgzoo.data import load_dg_dataset

    buf = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (4, 4)).save(buf, format="PNG")
    img = {"bytes": buf.getvalue(), "path": None}
    table = datasets.Dataset.from_dict(
        {"image": [img] * 4, "label": ["cat", None, "dog", "cat"], "domain": ["a", "a", "b", "b"]},
        features=datasets.Features(
            {"image": datasets.Image(), "label": datasets.Value("string"), "domain": datasets.Value("string")}
        ),
    )
    table.to_parquet(tmp_path / "set.parquet")
    with pytest.raises(DGZooError, match=r"1 row\(s\) of label have no label in column 'label' \(first: row 1\)"):
        load_dg_dataset(str(tmp_path / "set.parquet"))


def test_a_one_image_domain_is_refused_with_a_fix_that_works(tmp_path):
    data = _image_folder(tmp_path / "data", {"a": 8, "b": 3, "c": 8})
    base = dict(dataset=str(data), target_domains=["c"], image_size=16, steps=2, eval_every=2)
    with pytest.raises(
        DGZooError,
        match=r"domain 'b' has only 3 image\(s\).*validation split empty; raise "
        r"--holdout-fraction to at least 0.334",
    ):
        train(tiny_config(tmp_path, **base))
    results = train(tiny_config(tmp_path, holdout_fraction=0.334, **base))
    assert results["accuracy_splits"]["b"]["out"] in (0.0, 1.0)  # one validation image, really scored
    lonely = _image_folder(tmp_path / "lonely", {"a": 8, "b": 1, "c": 8})
    with pytest.raises(DGZooError, match=r"domain 'b' has 1 image\(s\).*--source-domains"):
        train(tiny_config(tmp_path / "x", **{**base, "dataset": str(lonely)}))
    # an unused tiny domain does not block a run that leaves it out
    train(tiny_config(tmp_path / "y", **{**base, "dataset": str(lonely), "source_domains": ["a"]}))


@pytest.mark.parametrize("key,value", [("steps", True), ("lr", False), ("lr", "nan"), ("batch_size", "inf")])
def test_recipe_values_booleans_are_not_numbers_and_non_finite_is_refused(tmp_path, key, value):
    from dgzoo.config import TrainConfig

    with pytest.raises(DGZooError, match=rf"'{key}'|--{key.replace('_', '-')}"):
        TrainConfig.from_dict({key: value}).validate()


# ---------------------------------------------------------------------- Ctrl-C


@pytest.mark.slow
def test_ctrl_c_prints_one_line_with_the_exact_resume_command(tmp_path):
    run_dir = tmp_path / "run"
    argv = [
        sys.executable,
        "-m",
        "dgzoo",
        "train",
        "--backbone",
        "test_resnet",
        "--steps",
        "400",
        "--batch-size",
        "8",
        "--eval-every",
        "400",
        "--checkpoint-every",
        "2",
        "--log-with",
        "none",
        "--num-workers",
        "0",
        "--output-dir",
        str(run_dir),
    ]
    proc = subprocess.Popen(
        argv,
        env=subprocess_env(OMP_NUM_THREADS="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    deadline = time.time() + 240
    while not (run_dir / "checkpoints" / "step_2").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr[-3000:]
    lines = [line for line in stderr.replace("\r", "\n").split("\n") if line.strip()]
    assert "Traceback" not in stderr, stderr[-3000:]
    last = lines[-1]
    assert last.startswith("dgzoo: error: interrupted;"), stderr[-3000:]
    command = last.split("continue with: ", 1)[1]
    args = shlex.split(command)
    assert args[:2] == ["dgzoo", "train"] and args[-1] == "--resume" and str(run_dir) in args
    assert not (run_dir / CLAIM_FILE).exists()
    # the printed command works: it continues the run
    kept = max(int(p.name[5:]) for p in (run_dir / "checkpoints").glob("step_*"))
    args[args.index("400")] = str(kept + 2)  # --steps: finish two steps after the kept checkpoint
    done = subprocess.run(
        [sys.executable, "-m", "dgzoo", *args[1:]],
        env=subprocess_env(OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed from" in (run_dir / "train.log").read_text()


def test_datasets_convert_refuses_to_pack_a_corrupt_image(tmp_path):
    from dgzoo.data.convert import convert_image_folders

    root = _image_folder(tmp_path / "data", {"a": 4, "b": 4}, corrupt=("a", 3))
    with pytest.raises(DGZooError, match=r"1 image\(s\) under .* do not decode: .*a/cat/003.png"):
        convert_image_folders(root)


def test_push_refuses_a_run_that_is_still_being_written(trained_run, tmp_path):
    import shutil

    from dgzoo.run.hub import check_run_loads

    run_dir = tmp_path / "copy"
    shutil.copytree(trained_run[0], run_dir)
    check_run_loads(run_dir)  # a finished run passes
    holder = _hold_claim(run_dir)
    try:
        with pytest.raises(DGZooError, match=rf"still in use by dgzoo train erm \(pid {holder.pid}"):
            check_run_loads(run_dir)
    finally:
        holder.kill()
        holder.wait()
    check_run_loads(run_dir)
