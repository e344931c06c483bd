"""SURE vs the unlearning baselines vs retraining from scratch, on rotated-digits.

For every seed: train one source model (ERM, held-out domain 75), then for every forget scenario retrain from
scratch on the retain set (the gold standard) and run each unlearning method from the source model. Every
method's forget / retain / test accuracy and attack accuracies are printed as mean ± standard error over seeds,
with its wall time as a fraction of retraining (measured in this process, one run after the other).

Every method gets the same step budget. Its learning rate (and SURE's lambda and domain-classifier learning rate)
is chosen on the first seed only, per scenario, from a small grid, by the research note's objective: the
distance to the retrained model |forget acc - retrain| + |test acc - retrain| + |loss-MIA acc - retrain|. The
other seeds (new source models, new fractional forget sets) then use that choice. SURE with its defaults is
reported too.

    python benchmarks/sure.py                                   # the recorded setting (see results/sure.md)
    python benchmarks/sure.py --seeds 0 --steps 60 --unlearn-steps 10 --no-tune   # a quick look
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

from smoke import TMP, add_smoke, apply_smoke

COLUMNS = [
    ("forget_acc", "forget"),
    ("retain_acc", "retain"),
    ("test_acc", "test"),
    ("matched_test_acc", "test (matched)"),
    ("held_out_acc", "held-out"),
    ("mia_loss", "MIA loss"),
    ("mia_knn", "MIA kNN"),
    ("mia_linear", "MIA linear"),
]
OBJECTIVE = ("forget_acc", "test_acc", "mia_loss")
GRID: dict[str, list[dict[str, Any]]] = {
    "sure": [{"lr": lr, "lambda": lam} for lr in (1e-4, 3e-4, 1e-3) for lam in (0.3, 1.0)]
    + [{"lr": 3e-4, "lambda": 1.0, "disc_lr_scale": 10.0}],
    "finetune": [{"lr": lr} for lr in (3e-4, 1e-3, 3e-3)],
    "gradient_ascent": [{"lr": lr} for lr in (1e-5, 3e-5, 1e-4)],
    "random_labels": [{"lr": lr} for lr in (1e-4, 3e-4, 1e-3)],
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--scenarios", nargs="+", default=["class=3", "class=3:0.1"])
    parser.add_argument("--methods", nargs="+", default=list(GRID))
    parser.add_argument("--backbone", default="test_resnet")
    parser.add_argument("--steps", type=int, default=300, help="source training (and retraining) steps")
    parser.add_argument("--batch-size", type=int, default=16, help="images per source domain per step")
    parser.add_argument("--lr", type=float, default=1e-3, help="source training learning rate (Adam)")
    parser.add_argument("--unlearn-steps", type=int, default=30, help="steps of every unlearning method")
    parser.add_argument(
        "--tune",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="choose each method's setting on the first seed (else: the defaults)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads; on a shared 2-core machine one thread is several times faster",
    )
    parser.add_argument("--output-dir", default="benchmark_runs/sure")
    add_smoke(parser)
    return apply_smoke(
        parser.parse_args(),
        seeds=[0],
        scenarios=["class=3"],
        methods=list(GRID)[:1],
        steps=2,
        batch_size=4,
        unlearn_steps=2,
        tune=False,
        output_dir=TMP,
    )


def mean_se(values: list[float | None]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{100 * mean:.1f}"
    se = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values))
    return f"{100 * mean:.1f} ± {100 * se:.1f}"


def record(results: dict[str, Any], column: str = "unlearned") -> dict[str, Any]:
    """The table's numbers of one run (``column``: unlearned, original or retrain)."""
    comparison = results["unlearning"]["comparison"]
    out = {key: comparison[key][column] for key, _ in COLUMNS}
    if column == "unlearned":
        out["time_fraction"] = results["unlearning"]["time_fraction_of_retrain"]
        out["seconds"] = results["timing"]["train_seconds"]
    out["objective"] = sum(abs(comparison[k][column] - comparison[k]["retrain"]) for k in OBJECTIVE)
    return out


def main() -> None:
    args = parse_args()
    import torch

    torch.set_num_threads(args.threads)
    from dgzoo.config import TrainConfig
    from dgzoo.training.engine import train
    from dgzoo.unlearning import UnlearnConfig, unlearn

    root = Path(args.output_dir)
    rows: dict[str, dict[str, list[dict[str, Any]]]] = {s: {} for s in args.scenarios}
    chosen: dict[str, dict[str, dict[str, Any]]] = {s: {} for s in args.scenarios}
    tuning: dict[str, dict[str, list[dict[str, Any]]]] = {s: {} for s in args.scenarios}
    started = time.perf_counter()

    def run(
        source: Path, scenario: str, method: str, setting: dict[str, Any], reference: Path, out: Path
    ) -> dict[str, Any]:
        hparams = {k: v for k, v in setting.items() if k != "lr"}
        return unlearn(
            UnlearnConfig(
                str(source),
                scenario,
                method=method,
                steps=args.unlearn_steps,
                lr=setting.get("lr"),
                hparams=hparams,
                reference=str(reference),
                output_dir=str(out),
                overwrite=True,
                num_workers=0,
            )
        )

    for index, seed in enumerate(args.seeds):
        source = root / f"seed{seed}" / "source"
        train(
            TrainConfig.from_dict(
                dict(
                    dataset="rotated-digits",
                    backbone=args.backbone,
                    steps=args.steps,
                    batch_size=args.batch_size,
                    lr=args.lr,
                    seed=seed,
                    eval_every=args.steps,
                    selection="last",
                    log_with="none",
                    num_workers=0,
                    output_dir=str(source),
                    overwrite=True,
                )
            )
        )
        for scenario in args.scenarios:
            folder = root / f"seed{seed}" / scenario.replace("=", "").replace(":", "_")
            reference = folder / "retrain"
            retrain = unlearn(
                UnlearnConfig(
                    str(source), scenario, method="retrain", output_dir=str(reference), overwrite=True, num_workers=0
                )
            )
            rows[scenario].setdefault("original", []).append(record(retrain, "original"))
            rows[scenario].setdefault("retrain", []).append(record(retrain))
            if "sure" in args.methods:
                results = run(source, scenario, "sure", {}, reference, folder / "sure-defaults")
                rows[scenario].setdefault("sure (defaults)", []).append(record(results))
            for method in args.methods:
                if index == 0:
                    candidates = GRID[method] if args.tune else [{}]
                    scores = []
                    for i, setting in enumerate(candidates):
                        results = run(source, scenario, method, setting, reference, folder / f"{method}-{i}")
                        scores.append({"setting": setting, **record(results)})
                    tuning[scenario][method] = scores
                    best = min(scores, key=lambda s: s["objective"])
                    chosen[scenario][method] = best["setting"]
                    rows[scenario].setdefault(method, []).append(best)
                else:
                    results = run(source, scenario, method, chosen[scenario][method], reference, folder / method)
                    rows[scenario].setdefault(method, []).append(record(results))
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    (root / "summary.json").write_text(
        json.dumps({"args": settings, "chosen": chosen, "tuning": tuning, "rows": rows}, indent=1)
    )

    print(
        f"\nrotated-digits, {args.backbone}, source ERM {args.steps} steps x {args.batch_size}/domain, "
        f"unlearning {args.unlearn_steps} steps, seeds {args.seeds} (mean ± s.e., %), "
        f"total {time.perf_counter() - started:.0f} s"
    )
    header = ["method", "setting"] + [label for _, label in COLUMNS] + ["time / retrain"]
    for scenario, methods in rows.items():
        print(f"\n--forget {scenario}\n")
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for name, records in methods.items():
            setting = chosen[scenario].get(name)
            label = (
                " ".join(f"{k}={v:g}" for k, v in setting.items())
                if setting
                else "default"
                if name not in ("original", "retrain")
                else ""
            )
            cells = [mean_se([r[key] for r in records]) for key, _ in COLUMNS]
            cells.append(mean_se([r.get("time_fraction") for r in records]))
            print(f"| {name} | {label} | " + " | ".join(cells) + " |")
    if any(tuning.values()):
        print(f"\ntuning on seed {args.seeds[0]} (objective: sum of |gap to retrain| of {', '.join(OBJECTIVE)})")
        for scenario, methods in tuning.items():
            for method, scores in methods.items():
                cells = ", ".join(
                    f"{' '.join(f'{k}={v:g}' for k, v in s['setting'].items()) or 'default'}: "
                    f"{100 * s['objective']:.1f}"
                    for s in scores
                )
                print(f"  {scenario} {method}: {cells}")


if __name__ == "__main__":
    main()
