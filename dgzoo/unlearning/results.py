"""An unlearning run's results.json and its console summary: the unlearned model's evaluation next to the
original model's and the retrained reference's, with the gap to retraining of every headline number."""

from __future__ import annotations

import logging
from typing import Any

from ..run.results import RunResults
from ..run.unlearning_card import HEADLINE
from ..training.session import run_environment
from .evaluation import ATTACKS
from .methods import METHODS, RETRAIN_TITLE
from .plan import UnlearnPlan, fingerprint

logger = logging.getLogger("dgzoo.unlearning")


def headline(evaluation: dict[str, Any] | None) -> dict[str, float | None]:
    """The :data:`HEADLINE` numbers of one evaluation (attack entries reduced to their accuracy)."""
    if not evaluation:
        return {key: None for key in HEADLINE}
    out = {}
    for key, (_, (group, name)) in HEADLINE.items():
        value = evaluation[group][name]
        out[key] = value["accuracy"] if isinstance(value, dict) else value
    return out


def unlearning_results(
    plan: UnlearnPlan,
    unlearned: dict[str, Any],
    original: dict[str, Any],
    timing: dict[str, float],
    diagnostics: dict[str, Any],
    accelerator: Any,
) -> dict[str, Any]:

    cfg, source, data, sets = plan.config, plan.source, plan.data, plan.sets
    res = source.results
    reference = (
        plan.reference["unlearning"]["evaluation"]["unlearned"]
        if plan.reference
        else (unlearned if cfg.method == "retrain" else None)
    )
    retrain_seconds = (
        plan.reference["timing"]["train_seconds"]
        if plan.reference
        else (timing["train_seconds"] if cfg.method == "retrain" else None)
    )
    mine, retrained, before = headline(unlearned), headline(reference), headline(original)
    comparison = {
        key: {
            "unlearned": mine[key],
            "original": before[key],
            "retrain": retrained[key],
            "gap_to_retrain": None if mine[key] is None or retrained[key] is None else mine[key] - retrained[key],  # type: ignore[operator]  # None: checked
        }
        for key in HEADLINE
    }
    title = RETRAIN_TITLE if cfg.method == "retrain" else METHODS[cfg.method].title
    citation = None if cfg.method == "retrain" else METHODS[cfg.method].citation
    per_domain = {**unlearned["test_domains"], **unlearned["held_out_domains"]}
    previously = res.get("unlearning", {}).get("forgotten_rows", [])
    sources, targets = list(res["source_domains"]), list(res["target_domains"])
    held_out = unlearned["accuracy"]["held_out"]
    return RunResults.create(
        {
            "kind": "unlearning",
            "algorithm": cfg.method,
            "host_algorithm": cfg.method,
            "addons": [],
            "algorithm_title": title,
            "backbone": res["backbone"],
            "pretrained": res.get("pretrained", False),
            "base_model": res.get("base_model"),
            "dataset": res["dataset"],
            "class_names": data.class_names,
            "protocol": res["protocol"],
            "source_domains": sources,
            "target_domains": targets,
            "seed": plan.settings["seed"],
            "split_seed": res.get("split_seed"),
            "steps": plan.settings["steps"],
            "selection": {"method": "last", "step": plan.settings["steps"], "score": unlearned["accuracy"]["test"]},
            "selections": {
                "last": {
                    "method": "last",
                    "step": plan.settings["steps"],
                    "score": unlearned["accuracy"]["test"],
                    "accuracy": per_domain,
                    "target_accuracy": held_out,
                }
            },
            "accuracy": per_domain,
            "target_accuracy": held_out,
            "hparams": {**plan.settings, **plan.method_hparams},
            "diagnostics": diagnostics,
            "citations": [(title, citation)] if citation else [],
            "timing": timing,
            "unlearning": {
                "method": cfg.method,
                "method_title": title,
                "forget_spec": sets.spec.text,
                "scenario": sets.spec.scenario,
                "description": sets.description,
                "forget_classes": [data.class_names[c] for c in sets.classes],
                "forget_domains": list(sets.domains),
                "sizes": sets.sizes(),
                "fingerprint": fingerprint(sets),
                "forgotten_rows": sorted(set(map(int, previously)) | set(map(int, sets.forget))),
                "source": {
                    "name": source.name,
                    "repo_id": source.repo_id,
                    "revision": source.revision,
                    "algorithm": res["algorithm"],
                    "steps": res["steps"],
                    "train_seconds": res.get("timing", {}).get("train_seconds"),
                },
                "reference": None if not plan.reference else cfg.reference,
                "evaluation": {"unlearned": unlearned, "original": original, "retrain": reference},
                "comparison": comparison,
                "attacks": ATTACKS,
                "time_fraction_of_retrain": None if not retrain_seconds else timing["train_seconds"] / retrain_seconds,
            },
            **run_environment(accelerator.device, accelerator.num_processes),
        }
    ).to_json()


def log_summary(results: dict[str, Any]) -> None:
    rows = results["unlearning"]["comparison"]
    fmt = lambda v: "  n/a" if v is None else f"{100 * v:5.1f}"  # noqa: E731
    logger.info("%-44s %9s %9s %9s", "", "unlearned", "original", "retrain")
    for key, (label, _) in HEADLINE.items():
        logger.info(
            "%-44s %9s %9s %9s",
            label,
            fmt(rows[key]["unlearned"]),
            fmt(rows[key]["original"]),
            fmt(rows[key]["retrain"]),
        )
    fraction = results["unlearning"]["time_fraction_of_retrain"]
    logger.info(
        "unlearning took %.1f s%s",
        results["timing"]["train_seconds"],
        f" ({100 * fraction:.1f}% of retraining)" if fraction else "",
    )
