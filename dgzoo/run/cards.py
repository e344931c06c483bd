"""Model cards and plots for a run, rendered from ``model_cards/model_card.md``.

The card's front matter is built with huggingface_hub's :class:`~huggingface_hub.ModelCardData`, with one
:class:`~huggingface_hub.EvalResult` per held-out domain. The held-out domain goes into the result's
``dataset_config`` so the Hub (which merges results sharing task, dataset, config, split and revision) keeps
one entry per domain.
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

from ..config import TrainConfig
from ..data.registry import get_spec, hub_license

SELECTION_LABELS = {
    "training_domain_validation": "training-domain validation",
    "oracle": "test-domain validation (oracle)",
    "last": "last step",
}


def template_path(name: str = "model_card.md") -> Path:
    """A card template, ``model_cards/<name>`` in a checkout, else the copy shipped as ``dgzoo.model_cards``."""
    checkout = Path(__file__).resolve().parents[2] / "model_cards" / name
    if checkout.exists():
        return checkout
    return Path(str(resources.files("dgzoo.model_cards") / name))


def model_name(results: dict[str, Any]) -> str:
    """A readable model id: ``<backbone>.<algorithm>.<dataset>-<held-out domains>``."""
    targets = "_".join(results["target_domains"]).replace(" ", "_")
    return f"{results['backbone']}.{results['algorithm']}.{results['dataset']['name']}-{targets}"


def _dataset_spec(results: dict[str, Any]) -> Any:
    dataset = results["dataset"]
    return get_spec(dataset.get("repo_id") or dataset["name"]) if dataset["source"] in ("hub", "builtin") else None


def card_license(results: dict[str, Any], override: str | None = None) -> dict[str, str]:
    """The card's licence fields: ``override`` if given, else the licence of the training data.

    Weights inherit the terms of the data they were fitted to, so a registry dataset's licence is used (a
    licence the Hub has no id for becomes ``other`` with its name and a link); a dataset dgzoo does not know
    gives ``unknown``, which ``dgzoo push --license`` replaces.
    """
    if override:
        return {"license": override}
    spec = _dataset_spec(results)
    return hub_license(spec.license, spec.homepage) if spec else {"license": "unknown"}


def _base_model_license(results: dict[str, Any], run_dir: str | Path | None) -> str | None:
    """The pretrained backbone's licence, as timm's pretrained config records it in the run's config.json."""
    if not results.get("base_model") or run_dir is None or not (Path(run_dir) / "config.json").is_file():
        return None
    config = json.loads((Path(run_dir) / "config.json").read_text())
    return (config.get("pretrained_cfg") or {}).get("license")


def card_data(results: dict[str, Any], repo_id: str | None = None, license: str | None = None) -> Any:
    """Front matter: library, pipeline, tags, datasets, base model, licence and per-domain model-index results."""
    from huggingface_hub import EvalResult, ModelCardData

    dataset = results["dataset"]
    dataset_type = dataset.get("repo_id") or f"dgzoo/{dataset['name']}"
    label = SELECTION_LABELS[results["selection"]["method"]]
    eval_results = [
        EvalResult(task_type="image-classification", task_name="Domain generalization", dataset_type=dataset_type,
                   dataset_name=f"{dataset['title']} (held-out {domain})", dataset_config=f"held-out-{domain}",
                   dataset_split="in", dataset_revision=dataset.get("revision"), metric_type="accuracy",
                   metric_value=round(100 * results["accuracy"][domain], 2),
                   metric_name=f"held-out-domain accuracy ({label})")
        for domain in results["target_domains"]]
    tags = ["image-classification", "timm", "domain-generalization", "dgzoo", results["host_algorithm"],
            *results["addons"]]
    return ModelCardData(
        library_name="timm", pipeline_tag="image-classification", **card_license(results, license), tags=tags,
        datasets=[dataset["repo_id"]] if dataset.get("repo_id") else None,
        base_model=results.get("base_model"), model_name=repo_id or model_name(results),
        eval_results=eval_results, metrics=["accuracy"])


def _dataset_ref(results: dict[str, Any]) -> str:
    """How ``--dataset`` names the run's data: registry name, Hub repo id or local path."""
    dataset = results["dataset"]
    if _dataset_spec(results) is not None:
        return dataset["name"]
    return dataset.get("repo_id") or dataset.get("path") or dataset["name"]


def reproduce_command(config: dict[str, Any]) -> str:
    """The ``accelerate launch`` command that repeats a run: every setting that differs from the defaults."""
    defaults = TrainConfig().to_dict()
    skip = {"output_dir", "overwrite", "resume", "push_to_hub", "hub_private", "hub_revision", "log_with",
            "num_workers"}
    parts = ["accelerate launch recipes/train.py"]
    for key, value in config.items():
        if key in skip or value == defaults.get(key) or value in (None, [], {}):
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            parts.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, list):
            parts.append(flag + " " + " ".join(_quote(v) for v in value))
        elif isinstance(value, dict):
            parts.append(flag + " " + " ".join(f"{k}={v}" for k, v in value.items()))
        else:
            parts.append(f"{flag} {_quote(value)}")
    return " \\\n    ".join(parts)


def _quote(value: Any) -> str:
    text = str(value)
    return f'"{text}"' if any(c in text for c in " '\"$") else text


def render_card(results: dict[str, Any], config: dict[str, Any], repo_id: str | None = None,
                run_dir: str | Path | None = None, license: str | None = None) -> str:
    """Render the model card for a run. ``repo_id`` (when published) makes the usage code point at the Hub;
    ``license`` overrides the licence taken from the training data."""
    from huggingface_hub import ModelCard

    targets, sources = results["target_domains"], results["source_domains"]
    spec = _dataset_spec(results)
    citations = list(results["citations"])
    if spec and spec.citation:
        citations.append((f"Dataset: {spec.title}", spec.citation))
    roles = {d: "held-out" if d in targets else "source" if d in sources else "unused" for d in results["accuracy"]}
    selections = results["selections"]
    load_id = repo_id or str(Path(run_dir).resolve() if run_dir else "path/to/run")
    card = ModelCard.from_template(
        card_data(results, repo_id, license), template_path=str(template_path()),
        model_title=repo_id.split("/")[-1] if repo_id else model_name(results),
        backbone=results["backbone"], algorithm=results["algorithm"], algorithm_title=results["algorithm_title"],
        dataset_title=results["dataset"]["title"], dataset_repo=results["dataset"].get("repo_id"),
        dataset_revision=results["dataset"].get("revision"), source_domains=sources, target_domains=targets,
        pretrained=bool(results.get("base_model")), base_model=results.get("base_model"),
        target_accuracy=results["target_accuracy"], selection_label=SELECTION_LABELS[results["selection"]["method"]],
        selected_step=results["selection"]["step"], steps=results["steps"],
        domain_rows=[{"domain": d, "role": roles[d], "accuracy": a} for d, a in results["accuracy"].items()],
        selection_rows=[{"label": SELECTION_LABELS[m], "step": s["step"], "target_accuracy": s["target_accuracy"]}
                        for m, s in selections.items()],
        load_name=f"hf-hub:{repo_id}" if repo_id else f"local-dir:{load_id}", load_id=load_id,
        class_names=results["class_names"], command=reproduce_command(config),
        recipe_rows=[(k, v) for k, v in results["hparams"].items()],
        train_seconds=results["timing"]["train_seconds"], images_per_second=results["timing"]["images_per_second"],
        device=results["device"], num_processes=results["num_processes"], seed=results["seed"],
        split_seed=results["split_seed"],
        diagnostics=json.dumps(results["diagnostics"], indent=2) if results.get("diagnostics") else "",
        citations=citations, dgzoo_version=results["dgzoo_version"],
        license=card_license(results, license)["license"], license_override=bool(license),
        data_license=spec.license if spec else "unknown", base_license=_base_model_license(results, run_dir),
        eval_domains=" ".join(_quote(d) for d in targets), eval_dataset=_quote(_dataset_ref(results)),
        eval_split_seed=results["split_seed"], eval_holdout=results["hparams"].get("holdout_fraction", 0.2))
    return str(card)


def plot_run(results: dict[str, Any], records: list[dict[str, Any]], run_dir: str | Path) -> list[Path]:
    """Write ``accuracy_per_domain.png`` and ``training_curves.png`` into ``run_dir``; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    targets = set(results["target_domains"])
    domains = list(results["accuracy"])
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(domains) + 1.5), 3.2))
    colors = ["#d1495b" if d in targets else "#00798c" for d in domains]
    bars = ax.bar(domains, [100 * results["accuracy"][d] for d in domains], color=colors)
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"{results['algorithm']} on {results['dataset']['title']} (red: held-out)", fontsize=10)
    fig.tight_layout()
    per_domain = run_dir / "accuracy_per_domain.png"
    fig.savefig(per_domain, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    steps = [r["step"] for r in records]
    sources = results["source_domains"]
    ax.plot(steps, [100 * sum(r["acc"][d]["out"] for d in sources) / len(sources) for r in records],
            label="source validation")
    ax.plot(steps, [100 * sum(r["acc"][d]["in"] for d in targets) / len(targets) for r in records],
            label="held-out")
    ax.axvline(results["selection"]["step"], color="grey", linestyle=":", label="selected step")
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    curves = run_dir / "training_curves.png"
    fig.savefig(curves, dpi=110)
    plt.close(fig)
    return [per_domain, curves]
