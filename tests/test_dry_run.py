"""`dgzoo train --dry-run`: the plan of a run, written nowhere, equal to what the real run records; and the
derived values (image size and its source, the upsampling warning) every run states in its first log line."""

import json

import pytest
from PIL import Image

from conftest import tiny_config
from dgzoo.cli import main
from dgzoo.errors import DGZooError
from dgzoo.training.dryrun import dry_run, planned_results
from dgzoo.training.engine import plan_run, train
from test_inspect import make_folders


def test_dry_run_writes_nothing_and_its_plan_is_what_the_run_records(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = tiny_config(tmp_path, algorithm="erm+gga", hparams={"gga.start": 2, "gga.end": 4, "gga.candidates": 2})
    plan = dry_run(cfg, timed_steps=2)
    assert list(tmp_path.iterdir()) == []  # no run directory, and nothing else in the working directory
    # Hand-computed: 240 training images per source domain / 8 per step; evaluations at steps 6 and 12.
    assert plan["steps_per_epoch"] == 30 and plan["evaluations"]["count"] == 2
    assert plan["checkpoints"] == {"every": 6, "count": 2, "keep": cfg.keep_checkpoints}
    assert plan["batch"]["per_step"] == 8 * 5 and plan["output_dir"] == str(tmp_path / "run")
    assert plan["hparam_sources"]["gga.start"] == "given" and plan["hparam_sources"]["gga.rho"] == "default"
    assert plan["hparam_sources"]["lr"] == "given" and plan["hparam_sources"]["optimizer"] == "default"
    assert plan["parameters"]["backbone"] > 0 and plan["estimate"]["seconds_per_step"] > 0
    assert plan["estimate"]["total_seconds"] > plan["estimate"]["seconds_per_step"] * 12

    results = train(cfg)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    shared = json.loads(json.dumps(planned_results(plan_run(fresh_copy(cfg)))))  # JSON types, as saved
    for key in shared:
        assert json.loads(json.dumps(plan[key])) == saved[key], key
    assert saved["splits"]["75"] == {"in": 240, "out": 59} and results["derived"]["image_size"]["value"] == 32


def fresh_copy(cfg):
    """A fresh config equal to ``cfg`` (plan_run checks the output directory, which now holds the finished run)."""
    from dgzoo.config import TrainConfig

    return TrainConfig.from_dict({**cfg.to_dict(), "output_dir": cfg.output_dir + "-plan"})


def test_train_refuses_a_dry_run_config(tmp_path):
    with pytest.raises(DGZooError, match="dry_run is set"):
        train(tiny_config(tmp_path, dry_run=True))
    assert not (tmp_path / "run").exists()


def test_cli_dry_run_prints_the_plan(tmp_path, capsys):
    out_dir = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--dry-run",
                "--backbone",
                "test_resnet",
                "--steps",
                "20",
                "--batch-size",
                "4",
                "--eval-every",
                "10",
                "--output-dir",
                str(out_dir),
                "--log-with",
                "none",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert text.startswith(
        "dry run: nothing was trained or written\nderived: image size 32 (the registry entry of "
        "rotated-digits: its native size) | augment none (--augment auto: the registry default "
        "of rotated-digits) | target domains 75 (the registry default of rotated-digits)"
    )
    assert "evaluate every 10 steps (2 evaluations, steps 10 .. 20)" in text and "estimate   about" in text
    assert not out_dir.exists()


def test_small_images_without_registry_entry_train_at_their_own_size(tmp_path):
    root = make_folders(tmp_path / "small", side=16, per_class=(4, 4))
    plan = plan_run(tiny_config(tmp_path, dataset=str(root), target_domains=["c"]))
    assert plan.image_size == 16 and plan.warnings == []
    assert plan.derived["image_size"]["source"] == (
        "the images: 16x16, 8 sampled per domain; small, and the backbone trains from scratch"
    )
    pretrained = plan_run(tiny_config(tmp_path, dataset=str(root), target_domains=["c"], pretrained=True))
    assert pretrained.image_size is None and pretrained.warnings == []  # pretrained features: the backbone's size
    given = plan_run(tiny_config(tmp_path, dataset=str(root), target_domains=["c"], image_size=24))
    assert given.image_size == 24 and given.derived["image_size"]["source"] == "--image-size"


def test_upsampling_warning_and_first_log_line_and_card_samples(tmp_path):
    root = make_folders(tmp_path / "mid", side=72, per_class=(4, 4))  # above the small-image bound: backbone's 160
    cfg = tiny_config(tmp_path, dataset=str(root), target_domains=["c"], steps=1, eval_every=1, batch_size=2)
    train(cfg)
    log = (tmp_path / "run" / "train.log").read_text().splitlines()
    assert (
        "INFO derived: image size the backbone's (the backbone's default input size, 160; the images: 72x72" in log[0]
    )
    assert "augment domainbed (--augment auto: DomainBed's augmentation, the dataset has no registry entry)" in log[0]
    assert log[1].endswith(
        "warning: the from-scratch backbone test_resnet enlarges the 72-pixel images to 160 (5x "
        "the pixels per image, and about as much compute); pass --image-size 72 to train at the "
        "images' own size"
    )
    with Image.open(tmp_path / "run" / "samples_per_domain.png") as sheet:
        assert sheet.size == (686, 258)  # three domains, one row each
    card = (tmp_path / "run" / "README.md").read_text()
    assert "![Samples per domain](samples_per_domain.png)" in card


def test_the_issue_case_a_saved_32_pixel_dataset_trains_resnet18_at_32(tmp_path):
    """Issue 19: a `save_to_disk` dataset of 32x32 images in five style domains took ResNet-18's 224."""
    import datasets
    import numpy as np

    rng = np.random.default_rng(0)
    domains = ["clean", "blur", "noisy", "dark", "bright"]
    images = [Image.fromarray(rng.integers(0, 255, (32, 32, 3)).astype(np.uint8)) for _ in range(5 * 6)]
    table = datasets.Dataset.from_dict(
        {"image": images, "label": [i % 2 for i in range(30)], "domain": [domains[i // 6] for i in range(30)]},
        features=datasets.Features(
            {
                "image": datasets.Image(),
                "label": datasets.ClassLabel(names=["a", "b"]),
                "domain": datasets.Value("string"),
            }
        ),
    )
    table.save_to_disk(str(tmp_path / "my_set"))
    plan = plan_run(
        tiny_config(tmp_path, dataset=str(tmp_path / "my_set"), target_domains=["noisy"], backbone="resnet18")
    )
    assert plan.image_size == 32 and plan.warnings == [] and plan.protocol.targets == ("noisy",)
    assert plan.derived["image_size"]["source"].startswith("the images: 32x32")


def test_dry_run_leaves_the_cache_untouched_and_a_real_plan_remembers_the_image_check(tmp_path, monkeypatch):
    from dgzoo.data import plan_cache, verify

    monkeypatch.setattr(verify, "cache_root", lambda: tmp_path / "cache")
    monkeypatch.setattr(plan_cache, "cache_root", lambda: tmp_path / "cache")
    dry_run(tiny_config(tmp_path), timed_steps=0)
    assert not (tmp_path / "cache").exists()  # not even the note that the images decode, nor the plan
    plan_run(tiny_config(tmp_path))  # a run's plan remembers it, so the next run skips the decode pass
    assert len(list((tmp_path / "cache" / "verified").iterdir())) == 1
    # and the plan: class and domain tables, splits, the image check's verdict under the plan's key
    stored = sorted(p.name.split("-")[0] for p in (tmp_path / "cache" / "plans").iterdir())
    assert stored == ["splits", "tables", "verified"]
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*")}
    dry_run(tiny_config(tmp_path), timed_steps=0)  # reads the plan back, writes nothing
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*")} == before


def test_cli_dry_run_ends_the_process_once_printed(tmp_path):
    """The console command exits right after the plan, without the interpreter's teardown (seconds of torch
    clean-up): an exit handler registered before it never runs, and the plan is complete on stdout."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import atexit, sys; atexit.register(lambda: print('TEARDOWN', flush=True)); "
        "from dgzoo.cli import main; sys.exit(main())"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "train",
            "--dry-run",
            "--backbone",
            "test_resnet",
            "--steps",
            "4",
            "--batch-size",
            "4",
            "--output-dir",
            str(tmp_path / "run"),
            "--log-with",
            "none",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        check=False,
        env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("dry run: nothing was trained or written") and "estimate   about" in done.stdout
    assert "TEARDOWN" not in done.stdout and not (tmp_path / "run").exists()
