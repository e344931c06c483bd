"""Do the seed methods act, and do they beat ERM? Each against ERM, paired by trial, with the diagnostics.

Settings (all CPU-sized: timm ``test_resnet`` from scratch, ``--steps`` steps of ``--batch-size`` images per
domain, Adam 1e-3, one evaluation at the end, so "selected" is the last step):

- ``rotated-multi``: rotated-digits, held-out 75 degrees, the five other domains as sources;
- ``rotated-single``: rotated-digits, trained on 0 degrees only, held-out 15..75 (the single-source methods'
  domains are augmented views: DGE's K RandAugment views, GGA's dealt parts; IU's IDV needs several domains);
- ``colored``: colored-digits, held-out -90% (colour predicts the label in the sources, anti-predicts it there).

Every configuration of a trial uses the same seed and split seed (= the trial), so the runs of a trial share their
data splits, initial weights and data order, and ``method - ERM`` per trial is a paired difference. The
per-domain-gradient methods run with ``step=matched`` (one optimizer step of ERM's gradient norm), so the
comparison is of directions, not step sizes. Reported: held-out accuracy, the paired difference with its standard
error over trials, and each run's "does it act" diagnostics (``results.json``, ``diagnostics.<name>.acts``).

    python benchmarks/seed_methods.py --json benchmarks/results/seed_methods.json \
        --output benchmarks/results/seed_methods.md
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from dgzoo.config import TrainConfig
from dgzoo.training.engine import train
from smoke import TMP, add_smoke, apply_smoke

SETTINGS: dict[str, dict[str, Any]] = {
    "rotated-multi": {"dataset": "rotated-digits", "target_domains": ["75"]},
    "rotated-single": {
        "dataset": "rotated-digits",
        "source_domains": ["0"],
        "target_domains": ["15", "30", "45", "60", "75"],
    },
    "colored": {"dataset": "colored-digits", "target_domains": ["-90%"]},
}
# GGA's window scaled to the budget (the paper anneals steps 100..200 of 5000 with 250 candidates).
GGA = {"gga.start": 10, "gga.end": 19, "gga.candidates": 8}
CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "erm": ("erm", {}),
    "erm+iu": ("erm+iu", {}),
    "equilibrium (matched)": ("equilibrium", {"step": "matched"}),
    "erm+gga": ("erm+gga", GGA),
    "iu: USS only": ("erm+iu", {"iu.params": "all"}),
    "iu: DSCS only": ("erm+iu", {"iu.samples": "all"}),
    "iu: fixed lr 1e-3 (old default)": ("erm+iu", {"iu.ascent": "fixed", "iu.lr": 1e-3}),
    "iu: literal unit step": ("erm+iu", {"iu.ascent": "literal"}),
    "iu: rise 1.1": ("erm+iu", {"iu.target_rise": 1.1}),
    "erm+iu (rise 1.25)": ("erm+iu", {"iu.target_rise": 1.25}),
    "iu: USS only (rise 1.25)": ("erm+iu", {"iu.params": "all", "iu.target_rise": 1.25}),
    "iu: DSCS only (rise 1.25)": ("erm+iu", {"iu.samples": "all", "iu.target_rise": 1.25}),
    "iu: rise 1.5": ("erm+iu", {"iu.target_rise": 1.5}),
    "equilibrium (faithful)": ("equilibrium", {}),
    "equilibrium (matched, views)": ("equilibrium", {"step": "matched", "domains": "views"}),
    "equilibrium (matched, persistent w)": ("equilibrium", {"step": "matched", "weights": "persistent"}),
    "pcgrad (matched)": ("pcgrad", {"step": "matched"}),
    "agr_sum (matched)": ("agr_sum", {"step": "matched"}),
}
MAIN = ["erm", "erm+iu", "equilibrium (matched)", "erm+gga"]
# The acts diagnostics shown per component, in the table's order.
ACTS = {
    "iu": ["acted_fraction", "mean_unlearn_loss_rise", "mean_idv_drop", "mean_val_acc_change"],
    "equilibrium": ["projection_rate", "w_deviation", "update_vs_mean"],
    "pcgrad": ["projected_fraction", "mean_step_ratio"],
    "agr_sum": ["masked_fraction", "mean_step_ratio"],
    "gga": ["acceptance_rate", "moved_fraction", "mean_agreement_gain"],
}


def run(setting: str, name: str, trial: int, args: argparse.Namespace) -> dict[str, Any]:
    algorithm, hparams = CONFIGS[name]
    slug = "".join(c if c.isalnum() else "_" for c in name)
    cfg = TrainConfig.from_dict(
        dict(
            **SETTINGS[setting],
            backbone="test_resnet",
            algorithm=algorithm,
            hparams=hparams,
            steps=args.steps,
            batch_size=args.batch_size,
            eval_every=args.steps,
            lr=1e-3,
            seed=trial,
            split_seed=trial,
            log_with="none",
            output_dir=str(args.work_dir / f"{setting}-{slug}-trial{trial}"),
            overwrite=True,
            num_workers=0,
        )
    )
    tick = time.perf_counter()
    results = train(cfg)
    acts = {name: entry["acts"] for name, entry in results["diagnostics"].items() if "acts" in entry}
    return {
        "setting": setting,
        "config": name,
        "trial": trial,
        "target_accuracy": results["target_accuracy"],
        "acts": acts,
        "train_seconds": results["timing"]["train_seconds"],
        "seconds": time.perf_counter() - tick,
    }


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error (population standard deviation / sqrt(n), as DomainBed reports it)."""
    return statistics.mean(values), (statistics.pstdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0)


def tables(rows: list[dict[str, Any]]) -> str:
    parts = []
    for setting in SETTINGS:
        mine = [r for r in rows if r["setting"] == setting]
        if not mine:
            continue
        erm = {r["trial"]: r["target_accuracy"] for r in mine if r["config"] == "erm"}
        erm_time = statistics.mean([r["train_seconds"] for r in mine if r["config"] == "erm"] or [float("nan")])
        parts += [
            f"### {setting}",
            "",
            "| configuration | trials | held-out (%) | - ERM, paired (points) | train time x ERM | does it act |",
            "|---|---|---|---|---|---|",
        ]
        for name in CONFIGS:
            runs = [r for r in mine if r["config"] == name]
            if not runs:
                continue
            acc = mean_se([100 * r["target_accuracy"] for r in runs])
            diffs = [100 * (r["target_accuracy"] - erm[r["trial"]]) for r in runs if r["trial"] in erm]
            diff = "" if name == "erm" or not diffs else "{:+.1f} ± {:.1f}".format(*mean_se(diffs))
            cost = statistics.mean([r["train_seconds"] for r in runs]) / erm_time
            acts = []
            for component, keys in ACTS.items():
                for key in keys:
                    values = [r["acts"][component][key] for r in runs if key in r["acts"].get(component, {})]
                    if values:
                        acts.append(f"{key} {statistics.mean(values):.3g}")
            parts.append(
                f"| {name} | {len(runs)} | {acc[0]:.1f} ± {acc[1]:.1f} | {diff} | {cost:.2f} | {', '.join(acts)} |"
            )
        parts.append("")
    return "\n".join(parts) + "± is the standard error over trials (population standard deviation / sqrt(n)).\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--plan",
        nargs="+",
        default=None,
        help="SETTING:CONFIG:TRIALS items, e.g. 'rotated-multi:erm+iu:0,1,2'; default: the main "
        "methods on every setting, three trials, and IU's ascent variants on rotated-multi",
    )
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--work-dir", type=Path, default=Path("sweeps/seed-methods"))
    parser.add_argument("--json", type=Path, help="every run's numbers (read first: finished runs are skipped)")
    parser.add_argument("--output", type=Path, help="write the Markdown tables here too")
    add_smoke(parser)
    args = apply_smoke(
        parser.parse_args(),
        plan=["rotated-multi:erm:0", "rotated-multi:erm+gga:0"],
        steps=2,
        batch_size=4,
        work_dir=TMP,
        json=None,
        output=None,
    )
    plan: list[tuple[str, str, int]] = []
    if args.plan:
        for item in args.plan:
            setting, rest = item.split(":", 1)
            name, trials = rest.rsplit(":", 1)
            plan += [(setting, name, int(t)) for t in trials.split(",")]
    else:
        for trial in (0, 1, 2):
            plan += [(setting, name, trial) for setting in SETTINGS for name in MAIN]
            plan += [("rotated-multi", name, trial) for name in ("iu: USS only", "iu: DSCS only")]
            if trial < 2:
                plan += [
                    ("rotated-multi", name, trial)
                    for name in CONFIGS
                    if name.startswith("iu: ") and "only" not in name and name != "iu: rise 1.1"
                ]  # 1.1 is the default: erm+iu
    rows: list[dict[str, Any]] = json.loads(args.json.read_text()) if args.json and args.json.exists() else []
    done = {(r["setting"], r["config"], r["trial"]) for r in rows}
    for setting, name, trial in plan:
        if (setting, name, trial) in done:
            continue
        rows.append(run(setting, name, trial, args))
        print(
            f"{setting} | {name} | trial {trial}: {100 * rows[-1]['target_accuracy']:.1f} % in "
            f"{rows[-1]['seconds']:.0f} s {rows[-1]['acts']}",
            flush=True,
        )
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
    text = tables(rows)
    print(text)
    if args.output:
        args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
