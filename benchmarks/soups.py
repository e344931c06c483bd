"""Model soups (uniform = DiWA, greedy = model soups) vs the selected single run vs ERM, on the embedded data.

    OMP_NUM_THREADS=1 python benchmarks/soups.py --output benchmarks/results/soups.md

For each spec (benchmarks/sweeps/soups_*.yaml): one short ERM run on the source domains is the shared
initialisation (trial seed 0's split), every run of the sweep starts from it (``init_from``), and ``dgzoo sweep``
trains the hyperparameter samples x trial seeds and builds the spec's soups per cell. The table, per dataset,
mean ± standard error over trial seeds of the held-out accuracy (%), everything selected by training-domain
validation:

- ERM: the sweep's hyperparameter sample 0 (the recipe's defaults), from the same init, same budget;
- selected run: DomainBed's training-domain-validation choice among the samples (``dgzoo report``'s);
- selected run + BN recomputed: top-k with k = 1, the control for the soups' BatchNorm recomputation;
- uniform soup (DiWA) and greedy soup (model soups), over the same runs;
- best ingredient by held-out accuracy (oracle, reported only).

The cost of a soup is its wall time (evaluating every ingredient, the BatchNorm recomputations, the candidates and
the soup) next to the training time of one run and of the cell's runs, measured on the same machine in the same
invocation. ``--smoke`` runs the same code at a size that finishes in a test.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

from dgzoo.config import TrainConfig, load_yaml
from dgzoo.experiments.launchers import run_sweep
from dgzoo.experiments.report import Cell, load_runs, report_dirs, select_groups
from dgzoo.experiments.soup import SOUPS_DIR
from dgzoo.experiments.sweep import SweepSpec
from dgzoo.run.rundir import read_json
from dgzoo.training.engine import train

ROOT = Path(__file__).resolve().parent
SPECS = [ROOT / "sweeps" / "soups_rotated_digits.yaml", ROOT / "sweeps" / "soups_colored_digits.yaml"]
SMOKE = {
    "n_hparams": 2,
    "n_trials": 1,
    "train": {"steps": 4, "eval_every": 2, "checkpoint_every": 4, "batch_size": 8},
    "soup": {"bn_steps": 2},
}
COLUMNS = [
    ("erm", "ERM (defaults, hp0)"),
    ("selected", "selected run"),
    ("top-k", "selected run + BN recomputed (top-1)"),
    ("uniform", "uniform soup (DiWA)"),
    ("greedy", "greedy soup (model soups)"),
    ("oracle", "best ingredient (oracle, reported only)"),
]


def load_spec(path: Path, root: Path, init_steps: int, smoke: bool) -> tuple[SweepSpec, TrainConfig]:
    """The spec under ``root`` (sized down for ``smoke``), and the config of its shared-init run."""
    values = load_yaml(path)
    if smoke:
        values.update({k: v for k, v in SMOKE.items() if k not in ("train", "soup")})
        values["train"] = {**values["train"], **SMOKE["train"]}
        values["soup"] = {**values["soup"], **SMOKE["soup"]}
    name = Path(values["output_dir"]).name
    values["output_dir"] = str(root / name)
    train_values = dict(values["train"])
    init = TrainConfig.from_dict(
        {
            **train_values,
            "dataset": values["datasets"][0],
            "target_domains": [str(d) for d in values["test_domains"]],
            "steps": 4 if smoke else init_steps,
            "eval_every": 2 if smoke else init_steps,
            "checkpoint_every": None,
            "seed": 0,
            "split_seed": 0,
            "output_dir": str(root / f"{name}-init"),
        }
    )
    values["train"] = {**train_values, "init_from": init.output_dir}
    return SweepSpec.from_dict(values, source=f"sweep spec {path}"), init


def cell_numbers(sweep_dir: Path) -> dict[str, dict[str, dict[str, float]]]:
    """dataset -> column -> {trial: held-out accuracy (%)}, and the soups' costs under ``"cost"``."""
    runs, _ = load_runs([sweep_dir])
    table: dict[str, dict[str, dict[str, float]]] = defaultdict(lambda: defaultdict(dict))
    singles = [r for r in runs if " soup of " not in r.row]
    for (dataset, _row, _targets, trial), pick in select_groups(singles, "training_domain_validation").items():
        table[dataset]["selected"][trial] = 100 * pick.test
    for run in singles:
        if run.hparams_seed == 0:
            results = read_json(run.path / "results.json")
            table[run.dataset]["erm"][run.trial] = 100 * results["target_accuracy"]
    for soup_results in sorted((sweep_dir / SOUPS_DIR).glob("*/results.json")):
        results = read_json(soup_results)
        soup, dataset, trial = results["soup"], results["dataset"]["name"], str(results["split_seed"])
        table[dataset][soup["method"]][trial] = 100 * results["target_accuracy"]
        table[dataset]["oracle"][trial] = 100 * max(i["target_acc"] for i in soup["ingredients"])
        table[dataset][f"cost:{soup['method']}"][trial] = soup["seconds"]["total"]
        table[dataset][f"used:{soup['method']}"][trial] = soup["used"]
        table[dataset]["candidates"][trial] = soup["candidates"]
        run_seconds = [
            read_json(Path(i["run"]) / "results.json")["timing"]["train_seconds"] for i in soup["ingredients"]
        ]
        table[dataset]["cost:run"][trial] = statistics.mean(run_seconds)
        table[dataset]["cost:cell"][trial] = sum(run_seconds)
    return table


def _cell(values: dict[str, float]) -> str:
    if not values:
        return "X"
    cell = Cell.over_trials([v / 100 for v in values.values()])
    return f"{cell.mean:.1f} ± {cell.se:.1f}" if cell.se is not None else f"{cell.mean:.1f}"


def markdown(tables: dict[str, dict[str, dict[str, float]]], command: str, seconds: float, smoke: bool) -> str:
    lines = [
        f"# Model soups on the embedded data{' (smoke size)' if smoke else ''}",
        "",
        f"Date: {time.strftime('%Y-%m-%d', time.gmtime())}. Machine: 2-core CPU VM, shared (OMP_NUM_THREADS=1, "
        f"nice). Command: `{command}` ({seconds / 60:.0f} min in all).",
        "",
        "Held-out accuracy (%), mean ± standard error over trial seeds; every choice made on the source "
        "domains' validation splits (training-domain validation). See the docstring of benchmarks/soups.py "
        "for what each column is.",
        "",
        "| Dataset | " + " | ".join(title for _, title in COLUMNS) + " | trials |",
        "|:--|" + "--:|" * (len(COLUMNS) + 1),
    ]
    for dataset, columns in tables.items():
        trials = len(columns.get("uniform", {}))
        lines.append(
            f"| {dataset} | " + " | ".join(_cell(columns.get(key, {})) for key, _ in COLUMNS) + f" | {trials} |"
        )
    lines += [
        "",
        "Cost of making a soup (seconds, mean over trials; no training) next to training one run and the "
        "cell's runs, same machine, same invocation:",
        "",
        "| Dataset | uniform | greedy | top-1 | one run | the cell's runs | greedy kept (of candidates) |",
        "|:--|--:|--:|--:|--:|--:|--:|",
    ]
    for dataset, columns in tables.items():
        mean = {k: statistics.mean(v.values()) if v else float("nan") for k, v in columns.items()}
        lines.append(
            f"| {dataset} | {mean.get('cost:uniform', float('nan')):.1f} | "
            f"{mean.get('cost:greedy', float('nan')):.1f} | {mean.get('cost:top-k', float('nan')):.1f} | "
            f"{mean.get('cost:run', float('nan')):.1f} | {mean.get('cost:cell', float('nan')):.1f} | "
            f"{mean.get('used:greedy', float('nan')):.1f} of {mean.get('candidates', float('nan')):.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=Path("sweeps/soups"), help="where the sweeps go")
    parser.add_argument("--init-steps", type=int, default=100, help="steps of the shared-init ERM run")
    parser.add_argument("--smoke", action="store_true", help="a tiny size that checks the pipeline end to end")
    parser.add_argument("--specs", nargs="+", type=Path, default=SPECS)
    parser.add_argument("--output", type=Path, help="write the Markdown here too")
    args = parser.parse_args()
    started = time.perf_counter()
    tables: dict[str, dict[str, dict[str, float]]] = {}
    reports = []
    for path in args.specs:
        spec, init = load_spec(path, args.root, args.init_steps, args.smoke)
        if not (Path(init.output_dir) / "results.json").is_file():
            train(init)
        outcome = run_sweep(spec, "local")
        if outcome.failed:
            print(f"{len(outcome.failed)} runs failed in {spec.output_dir}", file=sys.stderr)
            return 1
        tables.update(cell_numbers(Path(spec.output_dir)))
        reports.append(report_dirs([spec.output_dir], ["training_domain_validation"]).markdown())
    command = "OMP_NUM_THREADS=1 nice -n 10 python benchmarks/soups.py " + " ".join(sys.argv[1:])
    text = markdown(tables, command, time.perf_counter() - started, args.smoke)
    text += "\n## `dgzoo report` of the sweeps (soup rows beside the runs)\n\n" + "\n".join(reports)
    print(text)
    if args.output:
        args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
