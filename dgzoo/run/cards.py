"""Model cards and plots for a run, rendered from ``model_cards/model_card.md``.

The card's front matter is built with huggingface_hub's :class:`~huggingface_hub.ModelCardData`, with one
:class:`~huggingface_hub.EvalResult` per held-out domain. In the model-index a result's ``dataset.config`` is a
configuration (subset) of the dataset, as ``datasets.load_dataset(type, config)`` takes it, so it is the one the
run loaded (:data:`DATASET_CONFIG`, ``default``), never a made-up name. The model-index groups results that share
task, dataset type, config, split and revision into one entry whose ``metrics`` list them; so the held-out domains
of one run form one entry whose ``dataset.args`` say what was measured (the held-out domains, the source domains,
the split seed and holdout fraction of dgzoo's per-domain split), and each domain stays its own metric: its own
``name`` (``held-out accuracy: sketch``) and ``args`` (``held_out_domain``), never averaged with another. The
result's ``split`` is the dataset's own split the images come from (``train``, or ``train+test`` for DomainNet).
A ``dgzoo`` block in the front matter carries what ``dgzoo zoo`` filters and groups by (dataset, held-out domains,
algorithm, backbone, seeds, the data's revision or fingerprint, the code version and the sweep a run belongs to).
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

from ..commandline import command_line, flag_groups
from ..config import PLACEMENT_FIELDS, TrainConfig
from ..data.registry import get_spec, hub_license
from ..errors import DGZooError
from .results import RunResults
from .rundir import SAMPLES_IMAGE

DATASET_CONFIG = "default"  # the configuration `datasets` loads when none is named: the one every dgzoo run reads

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


def _dataset_spec(results: RunResults | Mapping[str, Any]) -> Any:
    # A KeyError naming the field, as before the typed schema, when the file lacks the dataset or its source.
    dataset = RunResults.of(results).require("dataset").dataset
    assert dataset is not None  # required above
    if dataset.require("source").source not in ("hub", "builtin"):
        return None
    # By registry name first: one Hub repo may hold several registry datasets (DomainBed_EasyHard's tarballs).
    return get_spec(dataset.name) or (get_spec(dataset.repo_id) if dataset.repo_id else None)


def card_license(results: RunResults | Mapping[str, Any], override: str | None = None) -> dict[str, Any]:
    """The card's licence fields: ``override`` if given, else the licence of the training data.

    Weights inherit the terms of the data they were fitted to, so a registry dataset's own licence is used, as
    its card or site states it (``other`` with the terms' own name and link where the Hub has no id); a dataset
    dgzoo does not know gives ``unknown``, which ``dgzoo push --license`` replaces.
    """
    if override:
        return {"license": override}
    return hub_license(_dataset_spec(results))


def slug(text: str) -> str:
    """``Real World`` -> ``real-world``: a name usable as a Hub config (no spaces, lower case)."""
    return re.sub(r"[^a-z0-9.]+", "-", str(text).lower()).strip("-") or "default"


def dataset_split(results: RunResults | Mapping[str, Any]) -> str:
    """The dataset's own split(s) the run's images come from: the registry's concatenated Hub splits (``train+test``
    for DomainNet, in ``datasets``' split syntax), else ``train``, the only split of the other DG datasets."""
    spec = _dataset_spec(results)
    return "+".join(spec.splits) if spec and spec.splits else "train"


def held_out_args(results: dict[str, Any], domain: str) -> dict[str, Any]:
    """What a held-out result measured: the domain, and the part of it dgzoo's seeded split calls ``in``."""
    return {
        "held_out_domain": domain,
        "source_domains": list(results["source_domains"]),
        "split": "in",
        "split_seed": results.get("split_seed", results.get("seed")),
        "holdout_fraction": results.get("hparams", {}).get("holdout_fraction", 0.2),
    }


def held_out_dataset_args(results: dict[str, Any]) -> dict[str, Any]:
    """What the held-out results of a run measured: its held-out and source domains, and the part of each held-out
    domain dgzoo's seeded split calls ``in`` (the model-index result's ``dataset.args``)."""
    return {
        "held_out_domains": list(results["target_domains"]),
        "source_domains": list(results["source_domains"]),
        "split": "in",
        "split_seed": results.get("split_seed", results.get("seed")),
        "holdout_fraction": results.get("hparams", {}).get("holdout_fraction", 0.2),
    }


def sweep_entry(run_dir: str | Path | None) -> dict[str, Any] | None:
    """The run's place in a sweep (``sweep.json`` of its parent folder): sweep id, run name, trial and hparams
    seeds; None for a run outside a sweep. The id hashes the sweep's spec, so it is the same on every machine."""
    if run_dir is None:
        return None
    run_dir = Path(run_dir)
    manifest = run_dir.parent / "sweep.json"
    if not manifest.is_file():
        return None
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return None
    entry = next((r for r in data.get("runs", []) if r.get("run_dir") == run_dir.name), None)
    if entry is None:
        return None
    spec = {**data.get("spec", {}), "output_dir": Path(str(data.get("spec", {}).get("output_dir", ""))).name}
    sweep_id = hashlib.sha1(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return {
        "sweep": sweep_id,
        "run": run_dir.name,
        "trial_seed": entry["trial_seed"],
        "hparams_seed": entry["hparams_seed"],
    }


_T = TypeVar("_T")


def _finished(value: _T | None, key: str) -> _T:
    """A field every finished run's results.json has (old files may lack others, never these)."""
    if value is None:
        raise DGZooError(
            f"results.json has no '{key}': it was not written by a finished dgzoo run; finish the run "
            f"(dgzoo train ... --resume) or train it again"
        )
    return value


def zoo_metadata(results: dict[str, Any], sweep: dict[str, Any] | None = None) -> dict[str, Any]:
    """The card's ``dgzoo`` block: what ``dgzoo zoo`` lists, filters and groups runs by."""
    res = RunResults.from_json(results)
    dataset = _finished(res.dataset, "dataset")
    meta = {
        "dataset": dataset.name,
        "dataset_repo": dataset.repo_id,
        "dataset_revision": dataset.revision,
        "dataset_fingerprint": dataset.fingerprint,
        "code": res.code or {"dgzoo_version": res.dgzoo_version},
        "held_out": list(res.target_domains),
        "source_domains": list(res.source_domains),
        "algorithm": res.algorithm,
        "backbone": res.backbone,
        "selection": _finished(res.selection, "selection").method,
        "held_out_accuracy": round(100 * _finished(res.target_accuracy, "target_accuracy"), 4),
        "seed": res.seed,
        "split_seed": res.split_seed,
        "holdout_fraction": res.hparams.get("holdout_fraction", 0.2),
    }
    if res.is_soup:  # a weight average: the zoo lists it apart from single runs
        assert res.soup is not None
        meta["soup"] = res.soup["label"]
    return {**meta, **(sweep or {})}


def model_stats(run_dir: str | Path | None) -> dict[str, Any] | None:
    """Parameters (millions), GMACs per image and input size of a run's model, as timm's model cards list them.

    MACs are counted by ``torch.utils.flop_counter`` on one forward pass at the model's input size (FLOPs / 2).
    None when the run directory holds no loadable model.
    """
    if run_dir is None or not (Path(run_dir) / "config.json").is_file():
        return None
    try:
        import timm
        import torch
        from torch.utils.flop_counter import FlopCounterMode

        model = timm.create_model(f"local-dir:{Path(run_dir).resolve()}", pretrained=False).eval()
        size = tuple(model.pretrained_cfg.get("input_size") or (3, 224, 224))
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(torch.zeros(1, *size))
    except Exception:
        return None
    return {
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2),
        "gmacs": round(counter.get_total_flops() / 2 / 1e9, 3),
        "image_size": f"{size[1]} x {size[2]}",
    }


def _base_model_license(results: dict[str, Any], run_dir: str | Path | None) -> str | None:
    """The pretrained backbone's licence, as timm's pretrained config records it in the run's config.json."""
    if not results.get("base_model") or run_dir is None or not (Path(run_dir) / "config.json").is_file():
        return None
    config = json.loads((Path(run_dir) / "config.json").read_text())
    return (config.get("pretrained_cfg") or {}).get("license")


def card_data(
    results: dict[str, Any], repo_id: str | None = None, license: str | None = None, sweep: dict[str, Any] | None = None
) -> Any:
    """Front matter: library, pipeline, tags, datasets, base model, licence, per-domain model-index results and
    the ``dgzoo`` block (:func:`zoo_metadata`)."""
    from huggingface_hub import EvalResult, ModelCardData

    dataset = results["dataset"]
    dataset_type = dataset.get("repo_id") or f"dgzoo/{dataset['name']}"
    label = SELECTION_LABELS[results["selection"]["method"]]
    targets = results["target_domains"]
    eval_results = [
        EvalResult(
            task_type="image-classification",
            task_name="Domain generalization",
            dataset_type=dataset_type,
            dataset_name=f"{dataset['title']} (held-out {', '.join(targets)})",
            dataset_config=DATASET_CONFIG,
            dataset_split=dataset_split(results),
            dataset_revision=dataset.get("revision"),
            dataset_args=held_out_dataset_args(results),
            metric_type="accuracy",
            metric_value=round(100 * results["accuracy"][domain], 2),
            metric_name=f"held-out accuracy: {domain} ({label})",
            metric_args={"held_out_domain": domain},
        )
        for domain in targets
    ]
    tags = [
        "image-classification",
        "timm",
        "domain-generalization",
        "dgzoo",
        results["host_algorithm"],
        *results["addons"],
    ]
    return ModelCardData(
        library_name="timm",
        pipeline_tag="image-classification",
        **card_license(results, license),
        tags=tags,
        datasets=[dataset["repo_id"]] if dataset.get("repo_id") else None,
        base_model=results.get("base_model"),
        model_name=repo_id or model_name(results),
        eval_results=eval_results,
        metrics=["accuracy"],
        dgzoo=zoo_metadata(results, sweep),
    )


def _license_text(fields: dict[str, str]) -> str:
    return (
        f"{fields['license_name']}, {fields.get('license_link', '')}".rstrip(", ")
        if "license_name" in fields
        else fields["license"]
    )


def _dataset_ref(results: dict[str, Any], local: bool = False) -> str:
    """How ``--dataset`` names the run's data: registry name, Hub repo id, or for a local dataset its path on this
    machine (``local``: a card that stays here) else its base name (a published card: no local path leaves)."""
    dataset = results["dataset"]
    if _dataset_spec(results) is not None:
        return dataset["name"]
    if dataset.get("repo_id"):
        return dataset["repo_id"]
    return (dataset.get("path") if local else None) or dataset["name"]


def _published_config(config: dict[str, Any], results: dict[str, Any]) -> dict[str, Any]:
    """The recipe as a published card shows it: a local dataset by the name :func:`_dataset_ref` gives."""
    if results["dataset"].get("source") in ("hub", "builtin"):
        return config
    return {**config, "dataset": _dataset_ref(results)}


def reproduce_command(config: dict[str, Any]) -> str:
    """The ``accelerate launch`` command that repeats a run: every setting that differs from the defaults."""
    skip = {*PLACEMENT_FIELDS, "log_with", "num_workers"}
    groups = flag_groups(config, TrainConfig().to_dict(), skip=skip, omit_empty=True)
    return command_line("accelerate launch recipes/train.py", groups, separator=" \\\n    ")


def _quote(value: Any) -> str:
    return shlex.quote(str(value))


def render_card(
    results: dict[str, Any],
    config: dict[str, Any],
    repo_id: str | None = None,
    run_dir: str | Path | None = None,
    license: str | None = None,
    sweep: dict[str, Any] | None = None,
    revision: str | None = None,
) -> str:
    """Render the model card for a run. ``repo_id`` (when published) makes the usage code point at the Hub, at
    ``revision`` (the branch pushed to) when it is not ``main``; ``license`` overrides the licence taken from the
    training data; ``sweep`` (:func:`sweep_entry`) records the run's place in a sweep. A published card names a
    local dataset by base name and fingerprint, never by its path."""
    from huggingface_hub import ModelCard

    res = RunResults.from_json(results)
    dataset, selection = _finished(res.dataset, "dataset"), _finished(res.selection, "selection")
    timing = _finished(res.timing, "timing")
    targets, sources = res.target_domains, res.source_domains
    spec = _dataset_spec(results)
    citations = list(res.citations)
    if spec and spec.citation:
        citations.append((f"Dataset: {spec.title}", spec.citation))
    roles = {d: "held-out" if d in targets else "source" if d in sources else "unused" for d in res.accuracy}
    selections = res.selections
    load_id = repo_id or str(Path(run_dir).resolve() if run_dir else "path/to/run")
    revision = revision if repo_id and revision and revision != "main" else None
    if repo_id:
        config = _published_config(config, results)
    sweep = sweep if sweep is not None else sweep_entry(run_dir)
    card = ModelCard.from_template(
        card_data(results, repo_id, license, sweep),
        template_path=str(template_path()),
        model_title=repo_id.split("/")[-1] if repo_id else model_name(results),
        backbone=res.backbone,
        algorithm=res.algorithm,
        algorithm_title=res.algorithm_title,
        dataset_title=dataset.title,
        dataset_repo=dataset.repo_id,
        dataset_revision=dataset.revision,
        source_domains=sources,
        target_domains=targets,
        pretrained=bool(res.base_model),
        base_model=res.base_model,
        target_accuracy=res.target_accuracy,
        selection_label=SELECTION_LABELS[selection.method],
        selected_step=selection.step,
        steps=res.steps,
        domain_rows=[{"domain": d, "role": roles[d], "accuracy": a} for d, a in res.accuracy.items()],
        selection_rows=[
            {"label": SELECTION_LABELS[m], "step": s.step, "target_accuracy": s.target_accuracy}
            for m, s in selections.items()
        ],
        load_name=(f"hf-hub:{repo_id}" + (f"@{revision}" if revision else "")) if repo_id else f"local-dir:{load_id}",
        load_id=load_id,
        load_revision=revision,
        code=res.code or {},
        dataset_fingerprint=dataset.fingerprint,
        class_names=res.class_names,
        soup=soup_rows(results),
        command=res.soup["command"] if res.soup else reproduce_command(config),
        recipe_rows=[(k, v) for k, v in res.hparams.items()],
        train_seconds=timing.train_seconds,
        images_per_second=timing.images_per_second,
        device=res.device,
        num_processes=res.num_processes,
        seed=res.seed,
        split_seed=res.split_seed,
        diagnostics=json.dumps(res.diagnostics, indent=2) if res.diagnostics else "",
        act_rows=act_rows(results),
        citations=citations,
        dgzoo_version=res.dgzoo_version,
        license=card_license(results, license)["license"],
        license_override=bool(license),
        data_license=_license_text(hub_license(spec)),
        base_license=_base_model_license(results, run_dir),
        eval_domains=" ".join(_quote(d) for d in targets),
        eval_dataset=_quote(_dataset_ref(results, local=not repo_id)),
        eval_split_seed=res.split_seed,
        eval_holdout=res.hparams.get("holdout_fraction", 0.2),
        stats=model_stats(run_dir),
        dataset_split=dataset_split(results),
        dataset_name=_dataset_ref(results, local=not repo_id),
        license_fields=card_license(results, license),
        samples_image=bool(run_dir and (Path(run_dir) / SAMPLES_IMAGE).is_file()),
    )
    return str(card)


def soup_rows(results: dict[str, Any]) -> dict[str, Any] | None:
    """A soup's card section (``results["soup"]``): the method, the batch-norm treatment and one row per
    ingredient (its repo and revision or run, its own source-validation and held-out accuracy, whether it is in)."""
    soup = results.get("soup")
    if not isinstance(soup, dict):
        return None
    rows = [
        {
            "name": f"[`{i['repo_id']}`](https://huggingface.co/{i['repo_id']}) @ `{str(i['revision'])[:12]}`"
            if i.get("repo_id")
            else f"`{Path(str(i.get('run'))).name}`",
            "source_val": 100 * i["source_val_acc"],
            "target": 100 * i["target_acc"],
            "used": i["used"],
        }
        for i in soup["ingredients"]
    ]
    return {**soup, "rows": rows}


def act_rows(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(component, diagnostic, value) of every ``diagnostics.<name>.acts`` entry: the card's "does it act" table."""
    rows = []
    for name, entry in (results.get("diagnostics") or {}).items():
        for key, value in (entry.get("acts") or {}).items() if isinstance(entry, dict) else ():
            rows.append((name, key, f"{value:.4g}"))
    return rows


def plot_run(results: RunResults | Mapping[str, Any], records: list[dict[str, Any]], run_dir: str | Path) -> list[Path]:
    """Write ``accuracy_per_domain.png`` and ``training_curves.png`` into ``run_dir``; return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    res = RunResults.of(results).require("target_domains", "accuracy", "dataset", "source_domains", "selection")
    assert res.dataset is not None and res.selection is not None  # required above
    targets = set(res.target_domains)
    domains = list(res.accuracy)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(domains) + 1.5), 3.2))
    colors = ["#d1495b" if d in targets else "#00798c" for d in domains]
    bars = ax.bar(domains, [100 * res.accuracy[d] for d in domains], color=colors)
    ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(f"{res.algorithm} on {res.dataset.require('title').title} (red: held-out)", fontsize=10)
    fig.tight_layout()
    per_domain = run_dir / "accuracy_per_domain.png"
    fig.savefig(per_domain, dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 3.2))
    steps = [r["step"] for r in records]
    sources = res.source_domains
    ax.plot(
        steps,
        [100 * sum(r["acc"][d]["out"] for d in sources) / len(sources) for r in records],
        label="source validation",
    )
    ax.plot(steps, [100 * sum(r["acc"][d]["in"] for d in targets) / len(targets) for r in records], label="held-out")
    ax.axvline(res.selection.step, color="grey", linestyle=":", label="selected step")
    ax.set_xlabel("step")
    ax.set_ylabel("accuracy (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    curves = run_dir / "training_curves.png"
    fig.savefig(curves, dpi=110)
    plt.close(fig)
    return [per_domain, curves]
