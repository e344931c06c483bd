"""The model card of an unlearned run (``model_cards/unlearn_card.md``), and publishing the run to the Hub.

The card says what was forgotten (the forget spec, its scenario and size), how (method, settings, diagnostics),
and how well: every headline number next to the original model and the retrained gold standard. Its front matter
carries the same ``library_name: timm`` / ``model-index`` metadata as any dgzoo card.
"""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path
from typing import Any

from ..commandline import command_line, flag_groups
from ..config import UnlearnConfig
from .cards import DATASET_CONFIG, card_license, dataset_split, held_out_dataset_args, template_path
from .results import DatasetRef, RunResults, Timing
from .rundir import read_json

HEADLINE = {  # the numbers every table and card shows: key -> (label, where in an evaluation)
    "forget_acc": ("forget accuracy", ("accuracy", "forget")),
    "retain_acc": ("retain accuracy", ("accuracy", "retain")),
    "validation_acc": ("validation accuracy (matched)", ("accuracy", "validation")),
    "test_acc": ("test accuracy", ("accuracy", "test")),
    "matched_test_acc": ("test accuracy (matched)", ("accuracy", "matched_test")),
    "held_out_acc": ("held-out-domain accuracy", ("accuracy", "held_out")),
    "mia_loss": ("loss MIA accuracy", ("attacks", "loss")),
    "mia_knn": ("representation kNN attack accuracy", ("attacks", "representation_knn")),
    "mia_linear": ("representation linear-probe attack accuracy", ("attacks", "representation_linear")),
}
# The card's unlearning results, each under its own metric type: a leaderboard reading ``accuracy`` (higher is
# better) must not pick up forget-set accuracy or an attack's accuracy, for which lower (or 50%) is the goal.
UNLEARNING_METRICS = {
    "forget_acc": "forget-set-accuracy",
    "mia_loss": "loss-mia-accuracy",
    "mia_knn": "representation-knn-mia-accuracy",
}


def _unlearned(results: dict[str, Any]) -> tuple[RunResults, dict[str, Any], DatasetRef]:
    """The typed results of an unlearning run, its ``unlearning`` block and its dataset (KeyError if it lacks one)."""
    res = RunResults.from_json(results).require("unlearning", "dataset")
    assert res.unlearning is not None and res.dataset is not None
    return res, res.unlearning, res.dataset


def model_name(results: dict[str, Any]) -> str:
    """``<backbone>.<method>-unlearned.<dataset>-<forget spec>``."""
    res, info, dataset = _unlearned(results)
    spec = info["forget_spec"].replace(" ", "_").replace("=", "").replace(",", "_")
    return f"{res.backbone}.{res.algorithm}-unlearned.{dataset.name}-{spec}"


def card_data(results: dict[str, Any], repo_id: str | None = None, license: str | None = None) -> Any:
    """Front matter: timm library, licence (``license``, else the training data's, as any dgzoo card), tags,
    datasets, base model (the source when it is on the Hub), model-index."""
    from huggingface_hub import EvalResult, ModelCardData

    res, info, dataset = _unlearned(results)
    dataset_type = dataset.repo_id or f"dgzoo/{dataset.name}"
    # One dataset configuration (the one loaded, as every dgzoo card names it): the model-index groups these
    # results into one entry, each metric keeping its own name and args (the held-out domain, or the forget set).
    targets = res.target_domains
    common: dict[str, Any] = dict(
        task_type="image-classification",
        dataset_type=dataset_type,
        dataset_config=DATASET_CONFIG,
        dataset_revision=dataset.revision,
        dataset_split=dataset_split(results),
        dataset_name=f"{dataset.title} (held-out {', '.join(targets)})",
        dataset_args={**held_out_dataset_args(results), "forget": info["forget_spec"]},
    )
    unlearned = info["comparison"]
    eval_results = [
        EvalResult(
            task_name="Domain generalization",
            metric_type="accuracy",
            metric_value=round(100 * res.accuracy[domain], 2),
            metric_name=f"held-out accuracy: {domain}",
            metric_args={"held_out_domain": domain},
            **common,
        )
        for domain in targets
    ]
    for key, metric_type in UNLEARNING_METRICS.items():
        value = unlearned[key]["unlearned"]
        if value is not None:
            eval_results.append(
                EvalResult(
                    task_name="Machine unlearning",
                    metric_type=metric_type,
                    metric_value=round(100 * value, 2),
                    metric_name=HEADLINE[key][0],
                    metric_args={"forget": info["forget_spec"], "forget_fingerprint": info["fingerprint"]},
                    **common,
                )
            )
    source = info["source"]
    return ModelCardData(
        library_name="timm",
        pipeline_tag="image-classification",
        **card_license(results, license),
        tags=[
            "image-classification",
            "timm",
            "dgzoo",
            "machine-unlearning",
            "domain-generalization",
            res.algorithm,
        ],
        datasets=[dataset.repo_id] if dataset.repo_id else None,
        base_model=source.get("repo_id") or res.base_model,
        model_name=repo_id or model_name(results),
        eval_results=eval_results,
        metrics=["accuracy", *UNLEARNING_METRICS.values()],
    )


def reproduce_command(config: dict[str, Any], published: bool = False) -> str:
    """The ``dgzoo unlearn`` command that repeats the run: every setting that differs from the defaults, each
    value shell-quoted (a forget spec such as ``class=3 domain=art painting`` stays one argument). ``published``:
    a local source run is named by its folder name, as no local path leaves the machine."""
    defaults = UnlearnConfig(source="", forget="").to_dict()
    skip = {"source", "forget", "output_dir", "overwrite", "push_to_hub", "hub_private", "num_workers"}
    source = str(config["source"])
    if published and os.path.isabs(source):
        source = Path(source).name
    head = ["dgzoo", "unlearn", source]
    for clause in config["forget"].replace(";", " ").split():
        head += ["--forget", clause]
    groups = flag_groups(config, defaults, skip=skip, omit_empty=True)
    return command_line(shlex.join(head), groups, separator=" \\\n    ")


def render_unlearn_card(
    results: dict[str, Any], repo_id: str | None = None, run_dir: str | Path | None = None, license: str | None = None
) -> str:
    """Render the card of an unlearned run; ``repo_id`` (when published) makes the usage code load from the Hub;
    ``license`` overrides the training data's licence (``dgzoo push --license``)."""
    from huggingface_hub import ModelCard

    res, info, dataset = _unlearned(results)
    load_id = repo_id or str(Path(run_dir).resolve() if run_dir else "path/to/run")
    config = read_json(Path(run_dir) / "unlearn_config.json") if run_dir else None
    fmt = lambda v: "n/a" if v is None else f"{100 * v:.1f}"  # noqa: E731
    gap = lambda v: "n/a" if v is None else f"{100 * v:+.1f}"  # noqa: E731
    rows = [
        {
            "label": label,
            "unlearned": fmt(info["comparison"][key]["unlearned"]),
            "original": fmt(info["comparison"][key]["original"]),
            "retrain": fmt(info["comparison"][key]["retrain"]),
            "gap": gap(info["comparison"][key]["gap_to_retrain"]),
        }
        for key, (label, _) in HEADLINE.items()
    ]
    attacks = info["evaluation"]["unlearned"]["attacks"]
    source = info["source"]
    card = ModelCard.from_template(
        card_data(results, repo_id, license),
        template_path=str(template_path("unlearn_card.md")),
        model_title=repo_id.split("/")[-1] if repo_id else model_name(results),
        backbone=res.backbone,
        method=res.algorithm,
        method_title=info["method_title"],
        description=info["description"],
        forget_spec=info["forget_spec"],
        scenario=info["scenario"],
        sizes=info["sizes"],
        sure_validation=res.hparams["validation"] if res.algorithm == "sure" else None,
        dataset_title=dataset.title,
        dataset_repo=dataset.repo_id,
        source_name=source.get("repo_id") or source["name"],
        source_is_hub=bool(source.get("repo_id")),
        source_algorithm=source["algorithm"],
        source_steps=source["steps"],
        source_domains=res.source_domains,
        target_domains=res.target_domains,
        metric_rows=rows,
        has_reference=info["evaluation"]["retrain"] is not None,
        attack_rows=[{"name": name, "description": info["attacks"][name], "n": attacks[name]["n"]} for name in attacks],
        train_seconds=_timing(res).train_seconds,
        time_fraction=info["time_fraction_of_retrain"],
        device=res.device,
        num_processes=res.num_processes,
        steps=res.steps,
        recipe_rows=list(res.hparams.items()),
        command=reproduce_command(config, published=bool(repo_id)) if config else "",
        diagnostics=json.dumps({k: v for k, v in res.diagnostics.items() if k != "curve"}, indent=2),
        load_name=f"hf-hub:{repo_id}" if repo_id else f"local-dir:{load_id}",
        load_id=load_id,
        class_names=res.class_names,
        seed=res.seed,
        citations=res.citations,
        dgzoo_version=res.dgzoo_version,
    )
    return str(card)


def _timing(res: RunResults) -> Timing:
    assert res.timing is not None, "an unlearning run records its timing"
    return res.timing
