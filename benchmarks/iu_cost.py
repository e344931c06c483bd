"""What one IU call costs, as a fraction of one ERM epoch, measured side by side in one process.

The set-up is the engine's: rotated-digits, held-out 75 degrees, the five other domains as sources, the
backbone at 32 px, Adam, ``--batch-size`` images per domain per step, so a DomainBed epoch is
``ceil(min source train size / batch size)`` steps. Round by round, one ERM epoch (the engine's loader with
its data loading, ``update`` per step) is timed, then one IU call per mode on the model as it is (forward
passes over the source train and validation splits, scores, channels, ascent, the validation pass after).
The table gives the median over rounds of (IU call seconds / ERM epoch seconds) with the call's phases; the
"half the samples" row scores a random half of every source domain per call (``iu.score_fraction=0.5``).

``faithful`` over every parameter needs one LiSSA inverse-HVP per training sample (N/chunk x depth
Hessian-vector products on ``lissa_batch`` images): far too slow to run here, so its row is extrapolated from
the measured time of one vectorised HVP, one per-sample-gradient chunk and the fast call's other phases.

The ascent and the after-ascent diagnostics are also timed on their own for an unlearning set of
``--unlearn-fraction`` of the samples, since the measured calls may select none.

The agreement of the estimators on the same model (Spearman correlation of U, overlap of the unlearning sets
``|A & B| / |A | B|``) is printed under the table: fast vs faithful on the head always; fast vs faithful over
every parameter with ``--all-params-agreement N`` (N training images per source domain, LiSSA shortened by
``--agreement-lissa``, still slow).

    python benchmarks/iu_cost.py
    python benchmarks/iu_cost.py --backbones test_resnet resnet18 --rounds 3 --all-params-agreement 24
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch

from dgzoo.algorithms import EpochContext, create_algorithm
from dgzoo.algorithms.influence import FunctionalLoss
from dgzoo.algorithms.iu_pools import Pool
from dgzoo.data import (
    DomainImages,
    eval_loader,
    eval_transform,
    load_dg_dataset,
    make_splits,
    train_loader,
    train_transform,
)
from dgzoo.models import create_backbone, data_config
from smoke import add_smoke, apply_smoke

SOURCES = ["0", "15", "30", "45", "60"]
MODES = {
    "fast": {"iu.mode": "fast"},
    "fast, half the samples": {"iu.mode": "fast", "iu.score_fraction": 0.5},
    "faithful-head": {"iu.mode": "faithful", "iu.influence_params": "head"},
}


def setup(backbone: str, batch_size: int, seed: int, per_domain: int | None = None):
    """Model, optimizer, the engine's training loader factory, and the post-epoch context of rotated-digits."""
    torch.manual_seed(seed)
    data = load_dg_dataset("rotated-digits")
    splits = make_splits(data, 0.2, seed)
    model = create_backbone(backbone, data.num_classes, image_size=32)
    preprocessing = data_config(model, 32)
    train_tf, eval_tf = train_transform(preprocessing, "none"), eval_transform(preprocessing)
    rows = {d: splits.in_rows[d][:per_domain] for d in SOURCES}
    train_sets = [DomainImages(data, rows[d], train_tf, d) for d in SOURCES]
    steps_per_epoch = math.ceil(min(len(s) for s in train_sets) / batch_size)
    context = EpochContext(
        epoch=1,
        step=steps_per_epoch,
        steps_per_epoch=steps_per_epoch,
        source_domains=SOURCES,
        source_train=[DomainImages(data, rows[d], eval_tf, d) for d in SOURCES],
        source_val=[DomainImages(data, splits.out_rows[d], eval_tf, d) for d in SOURCES],
        make_loader=lambda ds, bs: eval_loader(ds, bs),
        batch_size=batch_size,
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def epoch(index: int):
        start = index * steps_per_epoch
        return train_loader(train_sets, batch_size, seed, start + steps_per_epoch, start)

    return model, optimizer, epoch, context, steps_per_epoch


def erm_epoch(erm, loader, first_step: int) -> float:
    start = time.perf_counter()
    for step, minibatches in enumerate(loader, first_step):
        erm.update(minibatches, step)
    return time.perf_counter() - start


def faithful_all_estimate(model, context, fast_timings: dict, hparams: dict) -> dict:
    """Seconds of a faithful call over every parameter, from the measured cost of its building blocks."""
    depth, batch, chunk = hparams["lissa_depth"], hparams["lissa_batch"], 8
    train = Pool.of(context.source_train)
    loss = FunctionalLoss(model, [n for n, p in model.named_parameters() if p.requires_grad])
    model.eval()
    x = torch.stack([train.dataset[i][0] for i in range(batch)])
    y = train.labels[:batch]
    vectors = torch.randn(chunk, loss.numel)
    timings = {}
    for name, fn in [
        ("hvp_chunk", lambda: loss.hvp(x, y, vectors)),
        ("hvp_one", lambda: loss.hvp(x, y, vectors[:1])),
        ("per_sample_chunk", lambda: loss.per_sample_grads(x[:chunk], y[:chunk])),
    ]:
        fn()  # warm-up
        start = time.perf_counter()
        fn()
        timings[name] = time.perf_counter() - start
    model.train()
    n = len(train)
    lissa = (
        depth * timings["hvp_one"]
        + 20 * timings["hvp_one"]  # s_val and the power iteration
        + math.ceil(n / chunk) * (timings["per_sample_chunk"] + depth * timings["hvp_chunk"])
    )
    other = sum(v for k, v in fast_timings.items() if k != "select")
    return {
        "seconds": lissa + other,
        "forward": fast_timings.get("forward", 0.0),
        "select": lissa,
        "ascent": fast_timings.get("ascent", 0.0),
        "after": fast_timings.get("after", 0.0),
        **timings,
    }


def ascent_cost(model, optimizer, context, fraction: float) -> dict[str, float]:
    """Seconds of the ascent and of the after-ascent diagnostics for an unlearning set of ``fraction`` of the
    training samples on the channels IU selects now (the measured calls may happen to select no sample)."""
    iu = create_algorithm(
        "erm+iu", model, len(SOURCES), {"iu.ascent": "fixed", "iu.lr": 0.0}, make_optimizer=lambda _: optimizer
    ).addons[0]
    iu.unlearn(context, context.step)
    train, val = Pool.of(context.source_train), Pool.of(context.source_val)
    chosen = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[: round(fraction * len(train))]
    channels = torch.zeros(iu.layer.num_channels, dtype=torch.bool)
    channels[iu.selected_channels] = True
    batch = context.batch_size * len(SOURCES)
    model.eval()
    start = time.perf_counter()
    iu._ascend(train, chosen, channels, context.batch_size)
    middle = time.perf_counter()
    iu._forward(val, batch)
    iu._pool_loss(train.subset(chosen), None, batch)
    model.train()
    return {"samples": len(chosen), "ascent": middle - start, "after": time.perf_counter() - middle}


def agreement(model, context, modes: dict[str, dict]) -> dict[str, torch.Tensor]:
    """U of every training sample and D_u under each mode, on the same weights (the ascent is switched off)."""
    out = {}
    for name, hparams in modes.items():
        algorithm = create_algorithm(
            "erm+iu",
            model,
            len(SOURCES),
            make_optimizer=lambda g: torch.optim.SGD(g, lr=0.0),
            hparams={**hparams, "iu.ascent": "fixed", "iu.lr": 0.0},
        )
        iu = algorithm.addons[0]
        iu.unlearn(context, context.step)
        out[name] = (iu.scores.clone(), set(iu.selected_rows))
    return out


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ranks = [x.argsort().argsort().double() for x in (a, b)]
    return torch.corrcoef(torch.stack(ranks))[0, 1].item()


def jaccard(a: set, b: set) -> float:
    return len(a & b) / max(len(a | b), 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=["resnet18"])
    parser.add_argument("--batch-size", type=int, default=32, help="images per source domain per step")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--unlearn-fraction",
        type=float,
        default=0.05,
        help="size of the unlearning set whose ascent and diagnostics are timed on their own",
    )
    parser.add_argument(
        "--all-params-agreement",
        type=int,
        default=0,
        metavar="N",
        help="also compare fast with faithful over every parameter on N train images per domain",
    )
    parser.add_argument(
        "--agreement-lissa",
        type=int,
        nargs=2,
        default=[20, 64],
        metavar=("DEPTH", "BATCH"),
        help="LiSSA depth and Hessian batch of that comparison (the defaults would take hours)",
    )
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
        parser.parse_args(), backbones=["test_resnet"], batch_size=64, rounds=1, per_domain=64, json=None
    )
    torch.set_num_threads(args.threads)
    from dgzoo.algorithms.iu import IU

    defaults = {k: h.default for k, h in IU.HPARAMS.items()}
    report = {}
    for backbone in args.backbones:
        model, optimizer, epoch, context, steps_per_epoch = setup(
            backbone, args.batch_size, args.seed, per_domain=args.per_domain
        )
        erm = create_algorithm("erm", model, len(SOURCES), {}, make_optimizer=lambda _: optimizer)
        erm_epoch(erm, epoch(0), 0)  # warm-up: IU then sees a partly trained model, as after epoch 1
        epochs, calls = [], {m: [] for m in MODES}
        for r in range(args.rounds):
            epochs.append(erm_epoch(erm, epoch(r + 1), (r + 1) * steps_per_epoch))
            for mode, hparams in MODES.items():
                iu = create_algorithm(
                    "erm+iu", model, len(SOURCES), hparams, make_optimizer=lambda _: optimizer
                ).addons[0]
                metrics = iu.unlearn(context, (r + 2) * steps_per_epoch)
                calls[mode].append(
                    {
                        "seconds": metrics["seconds"],
                        **iu.timings,
                        "unlearn_samples": metrics["unlearn_samples"],
                        "channels": metrics.get("channels", 0.0),
                    }
                )
                model.train()
        epoch_s = statistics.median(epochs)
        rows = {}
        for mode, runs in calls.items():
            ratios = [c["seconds"] / e for c, e in zip(runs, epochs)]
            rows[mode] = {
                "ratio": statistics.median(ratios),
                "seconds": statistics.median(c["seconds"] for c in runs),
                **{
                    k: statistics.median(c.get(k, 0.0) for c in runs)
                    for k in ("forward", "select", "ascent", "after", "unlearn_samples", "channels")
                },
            }
        phases = ascent_cost(model, optimizer, context, args.unlearn_fraction)
        estimate = faithful_all_estimate(model, context, calls["fast"][-1], defaults)
        rows["faithful-all (extrapolated)"] = {**estimate, "ratio": estimate["seconds"] / epoch_s}
        n_train = sum(len(d) for d in context.source_train)
        print(
            f"\n{backbone}: ERM epoch = {steps_per_epoch} steps x {args.batch_size * len(SOURCES)} images = "
            f"{epoch_s:.2f} s (median of {args.rounds}); IU scores {n_train} training images, validates on "
            f"{sum(len(d) for d in context.source_val)}"
        )
        print(
            "| mode | IU call (s) | / ERM epoch | forward passes | scores+channels | ascent | val after |"
            " D_u | C_spc |\n|---|---|---|---|---|---|---|---|---|"
        )
        for mode, row in rows.items():
            print(
                f"| {mode} | {row['seconds']:.2f} | {row['ratio']:.3f} | {row['forward']:.2f} | {row['select']:.2f} "
                f"| {row['ascent']:.2f} | {row['after']:.2f} | {row.get('unlearn_samples', float('nan')):.0f} "
                f"| {row.get('channels', float('nan')):.0f} |"
            )
        print(
            f"an unlearning set of {phases['samples']} samples ({100 * args.unlearn_fraction:.0f}%) adds "
            f"{phases['ascent']:.2f} s of ascent and {phases['after']:.2f} s of after-ascent diagnostics "
            f"({phases['ascent'] / epoch_s:.3f} + {phases['after'] / epoch_s:.3f} ERM epochs)"
        )
        print(
            f"faithful-all blocks: one HVP of 8 vectors on {defaults['lissa_batch']} images "
            f"{estimate['hvp_chunk']:.2f} s, of 1 vector {estimate['hvp_one']:.2f} s, per-sample gradients of 8 "
            f"images {estimate['per_sample_chunk']:.3f} s; depth {defaults['lissa_depth']}"
        )
        agree = agreement(model, context, {m: MODES[m] for m in ("fast", "faithful-head")})
        print(
            f"fast vs faithful-head on the same weights: Spearman(U) = "
            f"{spearman(agree['fast'][0], agree['faithful-head'][0]):.3f}, D_u overlap = "
            f"{jaccard(agree['fast'][1], agree['faithful-head'][1]):.2f} "
            f"({len(agree['fast'][1])} vs {len(agree['faithful-head'][1])} samples)"
        )
        report[backbone] = {
            "epoch_seconds": epochs,
            "steps_per_epoch": steps_per_epoch,
            "calls": calls,
            "unlearning_set_phases": phases,
            "rows": rows,
            "agreement_head": spearman(agree["fast"][0], agree["faithful-head"][0]),
        }
        if args.all_params_agreement:
            small = setup(backbone, args.batch_size, args.seed, per_domain=args.all_params_agreement)[3]
            depth, batch = args.agreement_lissa
            agree = agreement(
                model,
                small,
                {
                    "fast": MODES["fast"],
                    "faithful-all": {"iu.mode": "faithful", "iu.lissa_depth": depth, "iu.lissa_batch": batch},
                },
            )
            rho = spearman(agree["fast"][0], agree["faithful-all"][0])
            print(
                f"fast vs faithful-all (LiSSA depth {depth}, Hessian batch {batch}) on "
                f"{sum(len(d) for d in small.source_train)} images: Spearman(U) = "
                f"{rho:.3f}, D_u overlap = {jaccard(agree['fast'][1], agree['faithful-all'][1]):.2f}"
            )
            report[backbone]["agreement_all"] = rho
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=float)


if __name__ == "__main__":
    main()
