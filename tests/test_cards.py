"""Cards and configs that tell the truth (issue 17, item 3), one test per point: a slug config plus args naming the
held-out domain and the split; the dataset's own split; unlearning metrics under their own metric types; a
pretrained_cfg describing the fine-tuned weights; the dataset's own licence; a model-details block."""

import copy
import json
import math

import pytest
from huggingface_hub import ModelCard


def _as_dataset(results, name, repo_id, revision, domains, target):
    """``results`` of the tiny rotated-digits run, relabelled as a run on a registry Hub dataset."""
    out = copy.deepcopy(results)
    accuracies = list(results["accuracy"].values())
    out["dataset"] = {"name": name, "title": name, "source": "hub", "repo_id": repo_id, "revision": revision}
    out["accuracy"] = {d: accuracies[i % len(accuracies)] for i, d in enumerate(domains)}
    out["target_domains"], out["source_domains"] = [target], [d for d in domains if d != target]
    return out


@pytest.fixture(scope="module")
def office_home(trained_run):
    run_dir, results = trained_run
    return run_dir, _as_dataset(
        results,
        "office-home",
        "flwrlabs/office-home",
        "d430d44779e929b335be368ab3456484e5de36bb",
        ["Art", "Clipart", "Product", "Real World"],
        "Real World",
    )


def _card(run_dir, results, **kw):
    from dgzoo.run.cards import render_card
    from dgzoo.run.rundir import read_json

    return ModelCard(render_card(results, read_json(run_dir / "train_config.json"), run_dir=run_dir, **kw))


def test_held_out_result_names_the_datasets_real_config_and_args_saying_what_was_measured(office_home):
    run_dir, results = office_home
    [result] = _card(run_dir, results, repo_id="me/oh").data.eval_results
    # The model-index `dataset.config` is a configuration of the dataset (what load_dataset takes), not a held-out
    # domain; the held-out domains are in `dataset.args`, each domain's accuracy in its own metric.
    assert result.dataset_config == "default"
    assert result.dataset_args == {
        "held_out_domains": ["Real World"],
        "source_domains": ["Art", "Clipart", "Product"],
        "split": "in",
        "split_seed": results["split_seed"],
        "holdout_fraction": results["hparams"]["holdout_fraction"],
    }
    assert result.metric_args == {"held_out_domain": "Real World"} and "Real World" in result.metric_name
    assert result.dataset_revision == "d430d44779e929b335be368ab3456484e5de36bb"


def test_two_held_out_domains_stay_two_metrics_in_one_model_index_entry(trained_run):
    """The Hub groups results of one task, dataset, config, split and revision into one entry: the two held-out
    domains become two metrics there, each with its own value, name and args, never one merged number."""
    from huggingface_hub import ModelCard

    run_dir, results = trained_run
    two = {
        **results,
        "target_domains": ["60", "75"],
        "source_domains": ["0", "15", "30", "45"],
        "accuracy": {**results["accuracy"], "60": 0.5, "75": 0.25},
    }
    card = _card(run_dir, two, repo_id="me/two")
    [entry] = card.data.to_dict()["model-index"][0]["results"]
    assert entry["dataset"]["config"] == "default" and entry["dataset"]["args"]["held_out_domains"] == ["60", "75"]
    metrics = {m["args"]["held_out_domain"]: m for m in entry["metrics"]}
    assert set(metrics) == {"60", "75"} and metrics["60"]["value"] == 50.0 and metrics["75"]["value"] == 25.0
    assert metrics["60"]["name"] != metrics["75"]["name"]
    reloaded = ModelCard(str(card)).data.eval_results  # what huggingface_hub reads back: still two results
    assert sorted((r.metric_args["held_out_domain"], r.metric_value) for r in reloaded) == [("60", 50.0), ("75", 25.0)]


def test_result_split_is_the_datasets_own_split(office_home, trained_run):
    run_dir, results = office_home
    assert _card(run_dir, results).data.eval_results[0].dataset_split == "train"  # flwrlabs/office-home: one split
    domainnet = _as_dataset(
        trained_run[1],
        "domainnet",
        "wltjr1007/DomainNet",
        "8f5b9a1" + "0" * 33,
        ["clipart", "infograph", "painting", "quickdraw", "real", "sketch"],
        "sketch",
    )
    # DomainNet's train and test splits are concatenated, so the result says both, in `datasets`' split syntax.
    assert _card(run_dir, domainnet).data.eval_results[0].dataset_split == "train+test"


def test_unlearning_metrics_are_not_reported_as_accuracy(trained_run):
    from dgzoo.run.unlearning_card import UNLEARNING_METRICS, card_data

    results = copy.deepcopy(trained_run[1])
    comparison = {
        key: {"unlearned": value} for key, value in (("forget_acc", 0.25), ("mia_loss", 0.5), ("mia_knn", 0.625))
    }
    results.update(
        kind="unlearning",
        algorithm="sure",
        unlearning={
            "forget_spec": "class=3",
            "fingerprint": "abc123",
            "comparison": comparison,
            "source": {"name": "run", "algorithm": "erm", "steps": 12},
        },
    )
    by_type = {r.metric_type: r for r in card_data(results).eval_results}
    assert set(by_type) == {"accuracy", *UNLEARNING_METRICS.values()}
    assert by_type["accuracy"].dataset_config == "default"  # the dataset's own configuration
    assert by_type["accuracy"].metric_args == {"held_out_domain": "75"}  # the only accuracy: the held-out domain
    assert by_type["forget-set-accuracy"].metric_value == 25.0 and by_type["loss-mia-accuracy"].metric_value == 50.0
    assert by_type["representation-knn-mia-accuracy"].metric_value == 62.5
    assert by_type["forget-set-accuracy"].metric_args["forget"] == "class=3"


def test_published_pretrained_cfg_describes_the_fine_tuned_weights(trained_run):
    from dgzoo.run.hub import _published_bytes

    run_dir, results = trained_run
    local = json.loads((run_dir / "config.json").read_text())
    assert local["pretrained_cfg"].get("tag")  # the base architecture's pretrained tag, as timm wrote it
    published = json.loads(_published_bytes(run_dir, "config.json", "me/digits-erm", results, None))
    cfg = published["pretrained_cfg"]
    assert cfg["hf_hub_id"] == "me/digits-erm" and cfg["origin_url"].endswith("/me/digits-erm")
    assert cfg["license"] == "bsd-3-clause"  # the card's licence (the data's), not the base weights'
    assert not {"tag", "paper_ids", "paper_name"} & set(cfg)
    assert "erm" in cfg["description"] and "held-out 75" in cfg["description"]
    # The preprocessing timm needs is untouched, as is everything outside pretrained_cfg.
    for key in ("input_size", "mean", "std", "interpolation", "crop_pct", "classifier", "num_classes"):
        assert cfg[key] == local["pretrained_cfg"][key], key
    assert {k: v for k, v in published.items() if k != "pretrained_cfg"} == {
        k: v for k, v in local.items() if k != "pretrained_cfg"
    }
    overridden = json.loads(_published_bytes(run_dir, "config.json", "me/x", results, "mit"))
    assert overridden["pretrained_cfg"]["license"] == "mit"


@pytest.mark.parametrize(
    "name, fields",
    [
        (
            "office-home",
            {
                "license": "other",
                "license_name": "fair-use-notice",
                "license_link": "https://www.hemanthdv.org/officeHomeDataset.html",
            },
        ),
        (
            "domainnet",
            {"license": "other", "license_name": "fair-use-notice", "license_link": "https://ai.bu.edu/M3SDA/"},
        ),
        ("pacs", {"license": "unknown"}),
        ("terra-incognita", {"license": "cdla-permissive-1.0"}),
        ("vlcs", {"license": "unknown"}),
    ],
)
def test_card_licence_is_the_datasets_own(trained_run, name, fields):
    from dgzoo.data import REGISTRY
    from dgzoo.run.cards import card_license

    spec = REGISTRY[name]
    results = _as_dataset(trained_run[1], name, spec.repo_id, spec.revision, list(spec.domains), spec.domains[-1])
    assert card_license(results) == fields
    if name == "office-home":
        card = _card(trained_run[0], results)
        assert (card.data.license, card.data.license_name) == ("other", "fair-use-notice")
        assert "licence: fair-use-notice, https://www.hemanthdv.org/officeHomeDataset.html" in card.text


def test_card_has_a_model_details_block_with_parameters_gmacs_and_image_size(trained_run):
    from safetensors import safe_open

    run_dir, results = trained_run
    text = _card(run_dir, results).text
    block = text.split("## Model Details", 1)[1].split("## Results", 1)[0]
    # Parameters counted independently: the weight file's tensors, less BatchNorm's running statistics.
    with safe_open(str(run_dir / "model.safetensors"), "pt") as f:
        n = sum(
            math.prod(f.get_slice(k).get_shape())
            for k in f.keys()
            if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
        )
    assert f"Params (M): {round(n / 1e6, 2)}" in block
    size = json.loads((run_dir / "config.json").read_text())["pretrained_cfg"]["input_size"]
    assert f"Image size: {size[1]} x {size[2]}" in block
    gmacs = float(block.split("GMACs: ")[1].split()[0])
    assert 0 < gmacs < 1  # a tiny ResNet at 32x32 px
    assert "**Pretrained on:** nothing (random initialisation)" in block and "**Licence:** `bsd-3-clause`" in block


def test_gmacs_follow_the_image_area(tmp_path):
    """A check of the MAC count that does not reuse it: a conv net's MACs grow with the pixel count."""
    import timm

    from dgzoo.run.cards import model_stats
    from dgzoo.run.rundir import save_model

    model = timm.create_model("test_resnet", pretrained=False, num_classes=3)
    for size in (16, 32):
        save_model(model, tmp_path / str(size), ["a", "b", "c"], {"input_size": (3, size, size)}, {})
    small, large = model_stats(tmp_path / "16"), model_stats(tmp_path / "32")
    assert small["image_size"] == "16 x 16" and large["image_size"] == "32 x 32"
    assert small["params_m"] == large["params_m"]
    # Convolutions dominate: four times the pixels, about four times the MACs (the classifier is the constant).
    assert large["gmacs"] / small["gmacs"] == pytest.approx(4, rel=0.05)
