"""The seeds' "X, X + GGA, X + IU" composition table from a finished ``dgzoo sweep``, with the per-step cost.

    dgzoo sweep benchmarks/sweeps/composition_rotated_digits.yaml --output-dir sweeps/composition
    python benchmarks/composition_table.py sweeps/composition --output benchmarks/results/composition.md
    python benchmarks/composition_table.py --smoke    # trains a tiny two-run sweep first: checks the script runs

The accuracy tables are ``dgzoo report``'s own (training-domain validation and oracle, mean ± SE over trial seeds).
The cost column is each algorithm's training seconds per step (``results.json`` timing, evaluation excluded),
averaged over its runs, divided by ERM's in the same sweep: runs of one sweep share the machine and the budget.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from dgzoo.experiments.report import report_dirs
from smoke import TMP, add_smoke, apply_smoke


def smoke_sweep(root: str) -> Path:
    """A finished two-run sweep (erm, erm+gga; 2 steps of test_resnet) to tabulate with ``--smoke``."""
    from dgzoo.experiments.launchers import run_sweep
    from dgzoo.experiments.sweep import SweepSpec

    spec = SweepSpec.from_dict(
        dict(
            datasets=["rotated-digits"],
            algorithms=["erm", "erm+gga"],
            test_domains=["75"],
            n_trials=1,
            output_dir=root,
            train=dict(
                backbone="test_resnet",
                steps=2,
                eval_every=2,
                batch_size=4,
                log_with="none",
                num_workers=0,
                hparams={"gga.start": 0, "gga.end": 1, "gga.candidates": 2},
            ),
        )
    )
    if run_sweep(spec, log=lambda line: None).failed:
        raise SystemExit("the smoke sweep failed")
    return Path(root)


def step_costs(sweep_dir: Path) -> dict[str, tuple[float, int]]:
    """Mean seconds per training step of each algorithm, and its number of finished runs."""
    seconds: dict[str, list[float]] = defaultdict(list)
    for results in sorted(sweep_dir.glob("*/results.json")):
        data = json.loads(results.read_text())
        seconds[data["algorithm"]].append(data["timing"]["train_seconds"] / data["steps"])
    return {name: (statistics.mean(values), len(values)) for name, values in seconds.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dirs", nargs="*", type=Path, help="finished sweeps (at least one)")
    parser.add_argument("--selection", nargs="+", default=["training_domain_validation", "oracle"])
    parser.add_argument("--output", type=Path, help="write the Markdown here too")
    add_smoke(parser)
    args = apply_smoke(parser.parse_args(), sweep_dirs=TMP, output=None)
    if args.smoke:
        args.sweep_dirs = [smoke_sweep(args.sweep_dirs)]
    if not args.sweep_dirs:
        parser.error("give at least one sweep folder")
    parts = [
        report_dirs(args.sweep_dirs, args.selection).markdown(),
        "### Per-step training cost",
        "",
        "| Algorithm | s / step | × ERM | runs |",
        "|:--|--:|--:|--:|",
    ]
    costs: dict[str, tuple[float, int]] = {}
    for sweep in args.sweep_dirs:
        costs.update(step_costs(sweep))
    erm = costs.get("erm", (float("nan"), 0))[0]
    for name, (cost, runs) in sorted(costs.items(), key=lambda kv: (kv[0].split("+")[0] != "erm", kv[0])):
        parts.append(f"| {name} | {cost:.3f} | {cost / erm:.2f} | {runs} |")
    text = "\n".join(parts) + "\n"
    print(text)
    if args.output:
        args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
