"""Held-out accuracy of erm, erm+gga and erm+gga_l on rotated-digits, same seeds, same budget.

Two protocols, DomainBed style:
- leave-one-domain-out: every rotation domain is held out in turn, the other five are the sources;
- single-source: one source domain (default 0 degrees), the five others are held out (GGA compares two
  interleaved halves of each batch, ``gga.parts=2``: the paper has no single-source GGA).

Every run goes through ``dgzoo.training.engine.train`` with training-domain validation selection. For each algorithm the
per-seed score is the mean held-out accuracy over the targets of the protocol; the table gives its mean ±
standard error over seeds, and the per-target means. GGA's acceptance statistics (accepted candidates, steps
with an accept, score gain, loss change) and GGA-L's mean similarity / noise scale come from results.json.

Runs are kept under --runs-dir and skipped when already finished, so an interrupted benchmark resumes.

    python benchmarks/gga_accuracy.py --seeds 0 1 2
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


def run_one(
    args: argparse.Namespace, algorithm: str, seed: int, targets: list[str] | None, sources: list[str] | None, out: Path
) -> dict:
    from dgzoo.config import TrainConfig
    from dgzoo.training.engine import train

    if (out / "results.json").exists():
        return json.loads((out / "results.json").read_text())
    hparams = {}
    if "gga_l" in algorithm:
        hparams.update(dict(item.split("=", 1) for item in args.gga_l_hparams))
    elif "gga" in algorithm:
        hparams.update(dict(item.split("=", 1) for item in args.gga_hparams))
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
            target_domains=targets,
            source_domains=sources,
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--algorithms", nargs="+", default=["erm", "erm+gga", "erm+gga_l"])
    parser.add_argument("--protocols", nargs="+", default=["lodo", "single"], choices=("lodo", "single"))
    parser.add_argument("--targets", nargs="+", default=DOMAINS, help="held-out domains of the LODO protocol")
    parser.add_argument("--single-source", default="0", help="the source domain of the single-source protocol")
    parser.add_argument("--backbone", default="test_resnet")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16, help="images per source domain per step")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument(
        "--gga-hparams",
        nargs="+",
        metavar="KEY=VALUE",
        default=["gga.start=40", "gga.end=69", "gga.candidates=8", "gga.rho=5e-4"],
    )
    parser.add_argument("--gga-l-hparams", nargs="+", metavar="KEY=VALUE", default=["gga_l.gamma=1e-3"])
    parser.add_argument("--runs-dir", default="runs/gga_accuracy")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="also write the collected numbers to this file")
    add_smoke(parser)
    args = apply_smoke(
        parser.parse_args(),
        seeds=[0],
        algorithms=["erm", "erm+gga"],
        protocols=["lodo"],
        targets=["75"],
        steps=2,
        batch_size=4,
        eval_every=2,
        gga_hparams=["gga.start=0", "gga.end=1", "gga.candidates=2"],
        runs_dir=TMP,
        json=None,
    )
    torch.set_num_threads(args.threads)

    jobs = []  # (protocol, target label, targets, sources)
    if "lodo" in args.protocols:
        jobs += [("lodo", t, [t], None) for t in args.targets]
    if "single" in args.protocols:
        jobs += [("single", f"from {args.single_source}", None, [args.single_source])]
    results: dict = {}
    for protocol, label, targets, sources in jobs:
        for seed in args.seeds:
            for algorithm in args.algorithms:
                out = Path(args.runs_dir) / protocol / label.replace(" ", "_") / algorithm.replace("+", "_") / str(seed)
                r = run_one(args, algorithm, seed, targets, sources, out)
                results.setdefault(protocol, {}).setdefault(algorithm, {}).setdefault(label, {})[seed] = {
                    "target_accuracy": r["target_accuracy"],
                    "oracle": r["selections"]["oracle"]["target_accuracy"],
                    "train_seconds": r["timing"]["train_seconds"],
                    "diagnostics": r.get("diagnostics", {}),
                }
                print(
                    f"{protocol:6s} {label:8s} seed {seed} {algorithm:10s} held-out {100 * r['target_accuracy']:.1f} "
                    f"({r['timing']['train_seconds']:.0f}s)",
                    flush=True,
                )

    print(
        f"\nrotated-digits, {args.backbone} from scratch, {args.steps} steps, {args.batch_size} images per "
        f"source domain, Adam lr {args.lr}; gga: {' '.join(args.gga_hparams)}; gga_l: {' '.join(args.gga_l_hparams)}"
    )
    print(
        f"Held-out accuracy (%), training-domain validation selection, mean ± standard error over seeds {args.seeds}\n"
    )
    for protocol, by_algorithm in results.items():
        labels = list(next(iter(by_algorithm.values())))
        print(f"**{'leave-one-domain-out' if protocol == 'lodo' else 'single-source'}**\n")
        print(
            "| algorithm | " + " | ".join(labels) + " | average | vs erm, paired by seed | oracle average | "
            "train s / run |"
        )
        print("|---|" + "---|" * (len(labels) + 4))

        def per_seed_average(by_label: dict, key: str = "target_accuracy") -> list[float]:
            return [statistics.mean(by_label[lab][s][key] for lab in labels) for s in args.seeds]

        erm = per_seed_average(by_algorithm["erm"]) if "erm" in by_algorithm else None
        for algorithm, by_label in by_algorithm.items():
            cells = [mean_se([by_label[lab][s]["target_accuracy"] for s in args.seeds]) for lab in labels]
            average = per_seed_average(by_label)
            paired = mean_se([a - e for a, e in zip(average, erm)]) if erm and algorithm != "erm" else "-"
            seconds = statistics.mean(by_label[lab][s]["train_seconds"] for lab in labels for s in args.seeds)
            print(
                f"| {algorithm} | " + " | ".join(cells) + f" | {mean_se(average)} | {paired} | "
                f"{mean_se(per_seed_average(by_label, 'oracle'))} | {seconds:.0f} |"
            )
        print()
        gga = by_algorithm.get("erm+gga")
        if gga:
            diags = [gga[lab][s]["diagnostics"].get("gga", {}) for lab in labels for s in args.seeds]
            print(
                f"GGA acceptance over {len(diags)} runs: accepted candidates per run "
                f"{statistics.mean(d['accepted'] for d in diags):.1f} of {diags[0]['candidates_evaluated']} "
                f"(rate {statistics.mean(d['acceptance_rate'] for d in diags):.3f}), annealed steps with an accept "
                f"{statistics.mean(d['steps_with_accept'] for d in diags):.1f} of {diags[0]['annealed_steps']}, "
                f"mean min-cos gain per annealed step {statistics.mean(d['mean_score_gain'] for d in diags):+.4f}, "
                f"mean loss change {statistics.mean(d['mean_loss_change'] for d in diags):+.4f}"
            )
        gga_l = by_algorithm.get("erm+gga_l")
        if gga_l:
            diags = [gga_l[lab][s]["diagnostics"].get("gga_l", {}) for lab in labels for s in args.seeds]
            print(
                f"GGA-L: mean pairwise cosine {statistics.mean(d['mean_similarity'] for d in diags):.4f}, "
                f"mean noise scale {statistics.mean(d['mean_noise_scale'] for d in diags):.2e}"
            )
        print()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
