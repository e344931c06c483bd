"""What one ``fast`` IU call costs at the defaults, as a fraction of one ERM epoch, side by side in one process.

The set-up is ``iu_cost.py``'s (the engine's): rotated-digits, held-out 75 degrees, five source domains at 32 px,
Adam, ``--batch-size`` images per domain per step, so a DomainBed epoch is ``ceil(240 / batch)`` steps. Each IU
variant is one add-on kept for the whole measurement, as in a run, so its cache lives across its calls. Round by
round: one ERM epoch is timed, then one call of each variant on the model as it is. Reported: the first call
(which decodes the images into the cache) and the median over the later rounds (the steady state of a run), each
over the same round's ERM epoch, with the call's phases.

Variants: the defaults (calibrated ascent, cached images and layer4 inputs); the defaults with ``iu.k=1`` (so
that the unlearning set is rarely empty and the line search runs); ``iu.cache_mb=0`` (decode and run the whole
network at every pass); the old default (``iu.ascent=fixed iu.lr=1e-3``, no cache), i.e. the call before issue 15.

    python benchmarks/iu_call_cost.py --backbones test_resnet resnet18 --rounds 4
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from dgzoo.algorithms import create_algorithm
from iu_cost import SOURCES, erm_epoch, setup
from smoke import add_smoke, apply_smoke

VARIANTS = {
    "defaults": {},
    "defaults, iu.k=1": {"iu.k": 1.0},
    "defaults, no cache (iu.cache_mb=0)": {"iu.cache_mb": 0},
    "old default (fixed lr 1e-3, no cache)": {"iu.ascent": "fixed", "iu.lr": 1e-3, "iu.cache_mb": 0},
}
PHASES = ("forward", "select", "ascent", "after")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=["test_resnet"])
    parser.add_argument("--batch-size", type=int, default=32, help="images per source domain per step")
    parser.add_argument("--rounds", type=int, default=4, help="rounds after the first (cache-filling) call")
    parser.add_argument("--json", help="also write the numbers to this file")
    parser.add_argument(
        "--per-domain",
        type=int,
        default=None,
        metavar="N",
        help="use the first N training images of each source domain (default: all)",
    )
    add_smoke(parser)
    args = apply_smoke(
        parser.parse_args(), backbones=["test_resnet"], batch_size=64, rounds=1, per_domain=16, json=None
    )
    torch.set_num_threads(1)
    report = {}
    for backbone in args.backbones:
        model, optimizer, epoch, context, steps_per_epoch = setup(
            backbone, args.batch_size, 0, per_domain=args.per_domain
        )
        erm = create_algorithm("erm", model, len(SOURCES), {}, make_optimizer=lambda _: optimizer)
        erm_epoch(erm, epoch(0), 0)  # warm-up: IU then sees a partly trained model, as after epoch 1
        addons = {
            name: create_algorithm("erm+iu", model, len(SOURCES), hparams, make_optimizer=lambda _: optimizer).addons[0]
            for name, hparams in VARIANTS.items()
        }
        epochs, calls = [], {name: [] for name in VARIANTS}
        for r in range(args.rounds + 1):
            epochs.append(erm_epoch(erm, epoch(r + 1), (r + 1) * steps_per_epoch))
            for name, iu in addons.items():
                metrics = iu.unlearn(context, (r + 2) * steps_per_epoch)
                calls[name].append(
                    {
                        "seconds": metrics["seconds"],
                        **iu.timings,
                        "unlearn_samples": metrics.get("unlearn_samples", 0.0),
                    }
                )
                model.train()
        print(
            f"\n{backbone}: ERM epoch = {steps_per_epoch} steps x {args.batch_size * len(SOURCES)} images, "
            f"median {statistics.median(epochs[1:]):.2f} s; first call in round 0, steady state = median of "
            f"rounds 1..{args.rounds}"
        )
        print(
            "| variant | first call / ERM epoch | steady call (s) | steady / ERM epoch | forward | select | ascent "
            "| after | mean D_u |\n|---|---|---|---|---|---|---|---|---|"
        )
        rows = {}
        for name, runs in calls.items():
            steady = runs[1:]
            ratios = [c["seconds"] / e for c, e in zip(steady, epochs[1:])]
            rows[name] = {
                "first_ratio": runs[0]["seconds"] / epochs[0],
                "ratio": statistics.median(ratios),
                "seconds": statistics.median(c["seconds"] for c in steady),
                **{p: statistics.median(c.get(p, 0.0) for c in steady) for p in PHASES},
                "unlearn_samples": statistics.mean(c["unlearn_samples"] for c in runs),
            }
            row = rows[name]
            print(
                f"| {name} | {row['first_ratio']:.3f} | {row['seconds']:.2f} | **{row['ratio']:.3f}** | "
                + " | ".join(f"{row[p]:.2f}" for p in PHASES)
                + f" | {row['unlearn_samples']:.0f} |"
            )
        report[backbone] = {"epoch_seconds": epochs, "calls": calls, "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=float)


if __name__ == "__main__":
    main()
