"""End to end: a short run produces the contracted run directory, reloads in plain timm, and resumes exactly."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import plain_timm_logits, subprocess_env, tiny_config
from dgzoo.errors import DGZooError
from dgzoo.training.engine import train

RESULT_KEYS = {
    "algorithm",
    "backbone",
    "dataset",
    "protocol",
    "source_domains",
    "target_domains",
    "seed",
    "steps",
    "selection",
    "accuracy",
    "target_accuracy",
    "hparams",
    "timing",
    "dgzoo_version",
}


def test_run_directory_follows_the_contract(trained_run):
    run_dir, results = trained_run
    for name in (
        "config.json",
        "model.safetensors",
        "README.md",
        "results.json",
        "train_config.json",
        "records.jsonl",
        "accuracy_per_domain.png",
        "training_curves.png",
        "train.log",
    ):
        assert (run_dir / name).is_file(), name
    # the default keeps two checkpoints, so a corrupt newest one has an intact fallback
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_12", "step_6"]
    assert not (run_dir / ".dgzoo-claim").exists()  # released when the run ends
    saved = json.loads((run_dir / "results.json").read_text())
    assert RESULT_KEYS <= set(saved)
    assert saved["dataset"]["name"] == "rotated-digits" and saved["protocol"] == "leave-domains-out"
    assert saved["target_domains"] == ["75"] and len(saved["accuracy"]) == 6
    assert saved["selection"]["method"] == "training_domain_validation"
    assert saved["target_accuracy"] == saved["accuracy"]["75"]
    assert saved["timing"]["train_seconds"] > 0 and saved["timing"]["images_per_second"] > 0
    assert saved["timing"]["train_images"] == 12 * 8 * 5
    records = [json.loads(line) for line in (run_dir / "records.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [6, 12]
    assert set(saved["selections"]) == {"training_domain_validation", "oracle", "last"}
    config = json.loads((run_dir / "config.json").read_text())
    assert config["architecture"] == "test_resnet" and config["num_classes"] == 10
    assert config["label_names"] == [str(i) for i in range(10)]
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32]


def test_exported_weights_are_the_selected_step(trained_run):
    run_dir, results = trained_run
    step = results["selection"]["step"]
    exported = load_file(run_dir / "model.safetensors")
    # The checkpoint holds the whole algorithm module: the timm network under "network." (+ any added modules).
    final = {
        k.removeprefix("network."): v
        for k, v in load_file(run_dir / "checkpoints" / "step_12" / "model.safetensors").items()
    }
    same = all(torch.equal(exported[k], final[k]) for k in exported)
    assert same == (step == 12)
    assert set(exported) == set(final)  # the export has plain timm keys, no wrapper prefix


def test_plain_timm_in_a_fresh_process_gives_the_same_logits(trained_run, tmp_path):
    run_dir, _ = trained_run
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    expected = plain_timm_logits(run_dir, x, tmp_path)
    import dgzoo

    model, transform = dgzoo.from_pretrained(run_dir)
    with torch.no_grad():
        assert torch.allclose(model(x), expected, atol=1e-6)


def test_from_pretrained_returns_the_eval_transform_and_class_names(trained_run):
    import dgzoo
    from dgzoo.data import load_dg_dataset

    run_dir, results = trained_run
    loaded = dgzoo.from_pretrained(run_dir)
    assert loaded.class_names == [str(i) for i in range(10)] and not loaded.model.training
    data = load_dg_dataset("rotated-digits")
    image = data.table[int(data.rows_by_domain["0"][0])]["image"]  # grayscale PIL image
    assert image.mode == "L"
    x = loaded.transform(image)
    assert x.shape == (3, 32, 32)


def test_model_card_front_matter_parses_with_huggingface_hub(trained_run):
    from huggingface_hub import ModelCard

    run_dir, results = trained_run
    card = ModelCard.load(run_dir / "README.md")
    data = card.data
    assert data.library_name == "timm" and data.pipeline_tag == "image-classification"
    assert "domain-generalization" in data.tags
    [result] = data.eval_results
    assert result.dataset_config == "default" and result.metric_type == "accuracy"
    assert result.metric_args == {"held_out_domain": "75"}
    assert result.metric_value == pytest.approx(100 * results["accuracy"]["75"], abs=0.01)
    assert (
        'timm.create_model("local-dir:' in card.text and "![Per-domain accuracy](accuracy_per_domain.png)" in card.text
    )


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    full = tiny_config(tmp_path / "full", steps=8, eval_every=4, augment="domainbed", dropout=0.2)
    train(full)
    part = tiny_config(tmp_path / "part", steps=4, eval_every=4, augment="domainbed", dropout=0.2)
    train(part)
    resumed = tiny_config(tmp_path / "part", steps=8, eval_every=4, augment="domainbed", dropout=0.2, resume=True)
    results = train(resumed)
    a = load_file(tmp_path / "full" / "run" / "checkpoints" / "step_8" / "model.safetensors")
    b = load_file(tmp_path / "part" / "run" / "checkpoints" / "step_8" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert results["steps"] == 8 and results["selections"]["last"]["step"] == 8
    full_records = (tmp_path / "full" / "run" / "records.jsonl").read_text().splitlines()
    part_records = (tmp_path / "part" / "run" / "records.jsonl").read_text().splitlines()
    assert [json.loads(r)["acc"] for r in full_records] == [json.loads(r)["acc"] for r in part_records]


def test_an_existing_run_is_never_overwritten_silently(tmp_path):
    cfg = tiny_config(tmp_path, steps=2, eval_every=2)
    train(cfg)
    before = (tmp_path / "run" / "model.safetensors").read_bytes()
    with pytest.raises(DGZooError, match="already holds a run; pass --resume to continue it, --overwrite"):
        train(tiny_config(tmp_path, steps=2, eval_every=2, seed=1))
    with pytest.raises(DGZooError, match="already finished its 2 steps"):
        train(tiny_config(tmp_path, steps=2, eval_every=2, resume=True))
    with pytest.raises(DGZooError, match=r"cannot resume .* different recipe \(lr: 0.003 -> 0.1\)"):
        train(tiny_config(tmp_path, steps=4, eval_every=2, resume=True, lr=0.1))
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == before
    train(tiny_config(tmp_path, steps=2, eval_every=2, seed=1, overwrite=True))
    assert json.loads((tmp_path / "run" / "results.json").read_text())["seed"] == 1


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"backbone": "resnet5O"}, "unknown backbone 'resnet5O' (did you mean: resnet50"),
        ({"target_domains": ["90"]}, "unknown domain '90'"),
        ({"target_domains": ["0", "15", "30", "45", "60", "75"]}, "leaves no source"),
        ({"algorithm": "ernm"}, "unknown algorithm 'ernm' (did you mean: erm"),
        ({"hparams": {"alpha": 1}}, "unknown hparam 'alpha' for erm"),
        ({"dataset": "no/such-local-dir/../x"}, "not a registry name"),
        # Checks that need the backbone run on its meta-device copy, before the run directory exists.
        ({"algorithm": "erm+iu", "hparams": {"iu.layer": "layer9"}}, "iu.layer='layer9' is not a module"),
        ({"algorithm": "erm+iu", "hparams": {"iu.include_head": True, "iu.layer": "layer3"}}, "needs iu.layer=auto"),
        (
            {"algorithm": "equilibrium", "source_domains": ["0"], "hparams": {"domains": "sources"}},
            "at least 2 domains",
        ),
        ({"algorithm": "equilibrium", "mixed_precision": "fp16"}, "use --mixed-precision bf16"),
        ({"algorithm": "equilibrium", "grad_accumulation": 2}, "applies to loss hosts"),
        ({"batch_size": 8, "grad_accumulation": 3}, "divisible by --grad-accumulation"),
        ({"lr": float("nan")}, "--lr"),
    ],
)
def test_bad_input_fails_before_anything_is_written(tmp_path, overrides, message):
    cfg = tiny_config(tmp_path, **overrides)
    with pytest.raises(DGZooError) as e:
        train(cfg)
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


def test_resume_without_checkpoint_is_refused(tmp_path):
    with pytest.raises(DGZooError, match="nothing to resume"):
        train(tiny_config(tmp_path, resume=True))


def test_cli_reports_bad_input_as_one_line_and_exit_code_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "dgzoo.cli", "train", "--backbone", "resnet5O", "--output-dir", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        env=subprocess_env(),
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("dgzoo: error: unknown backbone 'resnet5O'")
    assert not (tmp_path / "run").exists()


def test_vit_backbone_trains_on_small_images(tmp_path):
    results = train(tiny_config(tmp_path, backbone="test_vit", steps=2, eval_every=2, image_size=32))
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model_args"]["img_size"] == [32, 32]
    assert 0.0 <= results["target_accuracy"] <= 1.0


def test_tensorboard_tracker_logs_the_run(tmp_path):
    pytest.importorskip("tensorboard")
    train(tiny_config(tmp_path, steps=2, eval_every=2, log_with="tensorboard"))
    events = list((tmp_path / "run" / "logs").rglob("events.out.tfevents.*"))
    assert events and any(e.stat().st_size > 0 for e in events)
