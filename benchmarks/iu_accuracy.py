"""Held-out accuracy of erm, erm+iu and erm+iue on rotated-digits, leave-one-domain-out, same seeds and budget.

Every rotation domain is held out in turn, the five others are the sources. Besides full IU and IUE the paper's
two ablations run too (its Table 2): ascent on the unlearning set over *every* parameter (``iu.params=all``,
"USS only") and ascent on the selected channels with *every* training sample (``iu.samples=all``, "DSCS only").

Every run goes through ``dgzoo.training.engine.train`` with training-domain validation model selection. A variant's
per-seed score is its mean held-out accuracy over the targets; the table gives the mean ± standard error over
seeds and the per-target means. IU's diagnostics come from results.json: IU calls, mean |D_u| and |C_spc| per
call, mean change of source-validation accuracy per call, and IU's share of the training time.

Runs are kept under --runs-dir and skipped when already finished, so an interrupted benchmark resumes.

    python benchmarks/iu_accuracy.py --seeds 0 1 2
    python benchmarks/iu_accuracy.py --variants erm "erm+iu:iu.lr=0.01" --targets 75 --seeds 0   # a pilot
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import torch

from smoke import TMP, add_smoke, apply_smoke

DOMAINS = ["0", "15", "30", "45", "60", "75"]
VARIANTS = ["erm", "erm+iu", "erm+iue", "erm+iu:iu.params=all", "erm+iu:iu.samples=all"]
LABELS = {
    "erm+iu:iu.params=all": "erm+iu, USS only (D_u, all parameters)",
    "erm+iu:iu.samples=all": "erm+iu, DSCS only (all samples, C_spc)",
}


def parse_variant(variant: str, shared: list[str]) -> tuple[str, dict[str, str]]:
    """``host+addon:key=value,...`` -> algorithm and hyperparameters (shared IU settings first, then the variant's)."""
    algorithm, _, extra = variant.partition(":")
    hparams: dict[str, str] = {}
    for addon in algorithm.split("+")[1:]:
        if addon in ("iu", "iue"):
            hparams.update({f"{addon}.{k.split('.', 1)[1]}": v for k, v in (s.split("=", 1) for s in shared)})
    hparams.update(dict(item.split("=", 1) for item in extra.split(",") if item))
    return algorithm, hparams


def run_one(args: argparse.Namespace, variant: str, seed: int, target: str, out: Path) -> dict:
    from dgzoo.config import TrainConfig
    from dgzoo.training.engine import train

    if (out / "results.json").exists():
        return json.loads((out / "results.json").read_text())
    algorithm, hparams = parse_variant(variant, args.iu_hparams)
    cfg = TrainConfig.from_dict(
        dict(
            dataset="rotated-digits",
            backbone=args.backbone,
            algorithm=algorithm,
            hparams=hparams,
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            eval_every=args.eval_every,
            seed=seed,
            target_domains=[target],
            log_with="none",
            num_workers=0,
            overwrite=True,
            output_dir=str(out),
        )
    )
    return train(cfg)


def mean_se(values: list[float]) -> str:
    mean = statistics.mean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return f"{100 * mean:.1f} ± {100 * se:.1f}"


def iu_diagnostics(results: list[dict]) -> dict[str, float]:
    """Means over runs of the add-on's summary, and its share of the training time."""
    summaries = [next(iter(r["diagnostics"].values())) for r in results if r.get("diagnostics")]
    if not summaries:
        return {}

    def mean(key: str) -> float:
        values = [s[key] for s in summaries if s.get(key) is not None]
        return statistics.mean(values) if values else float("nan")

    return {
        "calls": mean("calls"),
        "skipped": mean("skipped"),
        "unlearn_samples": mean("mean_unlearn_samples"),
        "channels": mean("mean_channels"),
        "val_acc_change": mean("mean_val_acc_change"),
        "time_share": statistics.mean(s["seconds"] / r["timing"]["train_seconds"] for s, r in zip(summaries, results)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--variants", nargs="+", default=VARIANTS, help="algorithm[:key=value,...]; e.g. erm+iu:iu.samples=all"
    )
    parser.add_argument("--targets", nargs="+", default=DOMAINS, help="held-out domains, one at a time")
    parser.add_argument("--backbone", default="test_resnet")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16, help="images per source domain per step")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument(
        "--iu-hparams",
        nargs="*",
        metavar="iu.KEY=VALUE",
        default=[],
        help="IU settings shared by every IU/IUE variant (written iu.KEY, applied to iue too)",
    )
    parser.add_argument("--runs-dir", default="runs/iu_accuracy")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write the collected numbers to this file")
    add_smoke(parser)
    args = apply_smoke(
        parser.parse_args(),
        seeds=[0],
        variants=["erm", "erm+iu"],
        targets=["75"],
        steps=4,
        batch_size=4,
        eval_every=4,
        runs_dir=TMP,
        json=None,
    )
    torch.set_num_threads(args.threads)

    scores: dict[str, dict[int, list[float]]] = {}
    per_target: dict[str, dict[str, list[float]]] = {}
    selected_val: dict[str, list[float]] = {}
    collected: dict[str, list[dict]] = {}
    for seed in args.seeds:
        for target in args.targets:
            for variant in args.variants:
                name = variant.replace(":", "_").replace(",", "_").replace("=", "-").replace("+", "_")
                result = run_one(args, variant, seed, target, Path(args.runs_dir) / f"{name}-t{target}-s{seed}")
                scores.setdefault(variant, {}).setdefault(seed, []).append(result["target_accuracy"])
                per_target.setdefault(variant, {}).setdefault(target, []).append(result["target_accuracy"])
                selected_val.setdefault(variant, []).append(result["selection"]["score"])
                collected.setdefault(variant, []).append(result)

    print(
        f"\nrotated-digits leave-one-domain-out, {args.backbone}, {args.steps} steps x {args.batch_size}/domain, "
        f"lr {args.lr}, seeds {args.seeds}, IU settings {args.iu_hparams or 'defaults'}"
    )
    print(
        "| variant | held-out acc (mean ± SE over seeds) | "
        + " | ".join(f"{t}°" for t in args.targets)
        + " | source val | IU calls (skipped) | mean D_u | mean C_spc | val acc change / call | IU time share |"
    )
    print("|---" * (8 + len(args.targets)) + "|")
    table = {}
    for variant in args.variants:
        per_seed = [statistics.mean(v) for v in scores[variant].values()]
        diag = iu_diagnostics(collected[variant])
        cells = [mean_se(per_seed)] + [f"{100 * statistics.mean(per_target[variant][t]):.1f}" for t in args.targets]
        cells.append(f"{100 * statistics.mean(selected_val[variant]):.1f}")
        cells += (
            [
                f"{diag['calls']:.0f} ({diag['skipped']:.1f})",
                f"{diag['unlearn_samples']:.1f}",
                f"{diag['channels']:.1f}",
                f"{100 * diag['val_acc_change']:+.2f}",
                f"{100 * diag['time_share']:.0f}%",
            ]
            if diag
            else ["-"] * 5
        )
        print(f"| {LABELS.get(variant, variant)} | " + " | ".join(cells) + " |")
        table[variant] = {
            "per_seed": per_seed,
            "per_target": per_target[variant],
            "source_val": selected_val[variant],
            **diag,
        }
    if args.json:
        Path(args.json).write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
