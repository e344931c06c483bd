"""Per-step cost of the modern baselines relative to ERM, measured side by side in one process.

    python benchmarks/modern_cost.py --output benchmarks/results/modern_cost.md

Every composition of benchmarks/sweeps/modern_rotated_digits.yaml is built on timm's ``test_resnet`` with the
sweep's batch (5 source domains x 16 images of 3x32x32, 10 classes), warmed up, then timed in interleaved rounds
(each round runs every composition for ``--steps`` updates), so that a change in the machine's load affects all of
them alike; the table reports each one's median seconds per update over the rounds, and its ratio to ERM's.
Only ``update`` is timed: the work an add-on does at an epoch's end (IU) or at an evaluation (SWAD's validation loss
and BatchNorm pass) is in the sweep's own cost column (benchmarks/composition_table.py).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from dgzoo.algorithms import create_algorithm
from dgzoo.models import create_backbone
from smoke import add_smoke, apply_smoke

SPECS = [
    "erm",
    "erm+gga",
    "erm+iu",
    "erm+swad",
    "erm+gga+swad",
    "erm+iu+swad",
    "erm+ema",
    "erm+gga+ema",
    "erm+iu+ema",
    "sam",
    "sam+gga",
    "sam+iu",
    "sagm",
    "sagm+gga",
    "sagm+iu",
    "erm+mixstyle",
    "erm+mixstyle+gga",
    "erm+mixstyle+iu",
    "erm+efdmix",
    "erm+efdmix+gga",
    "erm+efdmix+iu",
]
# As the sweep: GGA anneals a 4-step window with 4 candidates; here every timed step is inside it.
HPARAMS = {"gga.start": 0, "gga.end": 10**9, "gga.candidates": 4, "ema.decay": 0.8}
DOMAINS, BATCH, CLASSES = 5, 16, 10


def batch(step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(step)
    return [
        (torch.randn(BATCH, 3, 32, 32, generator=g), torch.randint(0, CLASSES, (BATCH,), generator=g))
        for _ in range(DOMAINS)
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=3, help="updates per composition per round")
    parser.add_argument(
        "--gga-window",
        action="store_true",
        help="time GGA inside its annealing window (default: outside, as most of a run's steps)",
    )
    parser.add_argument("--output", type=Path)
    add_smoke(parser)
    args = apply_smoke(parser.parse_args(), rounds=1, steps=1, output=None)
    torch.set_num_threads(1)
    hparams = dict(HPARAMS) if args.gga_window else {**HPARAMS, "gga.start": 10**9, "gga.end": 10**9}
    algorithms = {}
    for spec in SPECS:
        torch.manual_seed(0)
        given = {k: v for k, v in hparams.items() if k.split(".")[0] in spec.split("+")}
        algorithms[spec] = create_algorithm(spec, create_backbone("test_resnet", num_classes=CLASSES), DOMAINS, given)
        algorithms[spec].update(batch(0), 0)  # warm-up
    seconds: dict[str, list[float]] = {spec: [] for spec in SPECS}
    for r in range(args.rounds):
        for spec, algorithm in algorithms.items():
            tick = time.perf_counter()
            for i in range(args.steps):
                algorithm.update(batch(1 + r * args.steps + i), 1 + r * args.steps + i)
            seconds[spec].append((time.perf_counter() - tick) / args.steps)
    erm = statistics.median(seconds["erm"])
    lines = ["| Algorithm | s / update (median) | × ERM |", "|:--|--:|--:|"]
    for spec in SPECS:
        cost = statistics.median(seconds[spec])
        lines.append(f"| {spec} | {cost:.3f} | {cost / erm:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
