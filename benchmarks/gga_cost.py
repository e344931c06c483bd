"""What GGA costs, measured side by side in one process.

1. Candidate cost: the time of one GGA candidate (perturb the featurizer, per-domain gradients, min pairwise
   cosine, pooled loss, accept/reject) divided by the time of one ERM step (pooled forward + backward + Adam) on
   the same images. The official code's candidate is also timed for reference: it runs the same per-domain
   passes with ``retain_graph=True`` and then a pooled forward *with a graph* for the loss (about 1.33 ERM steps
   by the research note's estimate). The per-domain gradient passes alone (``per_domain_gradients`` into a
   reused buffer) are timed too: they are the floor of a candidate, and what is left is GGA's own work (the
   featurizer noise, the cosines, the decision). Timings are interleaved round by round; medians of the per-round
   ratios are reported.
2. Whole-run cost: ``erm+gga`` and ``erm`` trained by the engine on rotated-digits with the same recipe, one
   after the other, repeated; the ratio of their ``timing.train_seconds`` (training only, evaluation excluded)
   is compared with the prediction ``1 + annealed_steps * (candidates + 1) * candidate_ratio / steps``.

    python benchmarks/gga_cost.py                                  # both parts, small CPU budget
    python benchmarks/gga_cost.py --part candidate --backbones resnet50 --image-size 224 --batch-size 32
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dgzoo.algorithms import create_algorithm
from dgzoo.algorithms.gga import scoring_groups
from dgzoo.algorithms.gradients import per_domain_gradients
from dgzoo.algorithms.registry import plain_loss_step
from dgzoo.models import create_backbone
from smoke import add_smoke, apply_smoke


def minibatches(domains: int, batch: int, size: int, classes: int, seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, 3, size, size, generator=g), torch.randint(0, classes, (batch,), generator=g))
        for _ in range(domains)
    ]


def official_candidate(module: torch.nn.Module, batches: list, rho: float) -> float:
    """One candidate as the official ERM_GGA computes it: weight noise, S per-domain ``autograd.grad`` with
    ``retain_graph=True``, min pairwise cosine, then a pooled forward with a graph for the loss."""
    params = [p for p in module.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in params[:-2]:
            p.add_(torch.rand_like(p).mul_(2 * rho).sub_(rho))
    grads = []
    for x, y in batches:
        loss = F.cross_entropy(module(x), y)
        grads.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params, retain_graph=True)]))
    cos = [
        F.cosine_similarity(grads[i], grads[j], dim=0).item()
        for i in range(len(grads))
        for j in range(i + 1, len(grads))
    ]
    pooled = F.cross_entropy(module(torch.cat([x for x, _ in batches])), torch.cat([y for _, y in batches]))
    return float(min(cos)) + pooled.item()


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def candidate_cost(backbone: str, domains: int, batch: int, size: int, candidates: int, rounds: int) -> dict:
    torch.manual_seed(0)
    model = create_backbone(backbone, num_classes=10)
    spec = "erm+gga"
    hp = {"gga.start": 0, "gga.end": 10**9, "gga.candidates": candidates, "gga.rho": 1e-5}
    algorithm = create_algorithm(
        spec, model, domains, make_optimizer=lambda g: torch.optim.Adam(g, lr=1e-5), hparams=hp
    )
    gga = algorithm.addons[0]
    batches = minibatches(domains, batch, size, 10, seed=0)
    groups = scoring_groups(batches)

    def erm_step(step: int) -> None:  # the host's own step (a loss host since contract v2), no GGA around it
        plain_loss_step(algorithm.host, batches, step)

    for _ in range(2):  # warm-up: allocator, Adam state, thread pools
        erm_step(0)
        gga.anneal(groups, 0)
    buffer = gga.scored.empty(len(groups))
    times: dict[str, list[float]] = {"erm": [], "passes": [], "candidate": [], "official": []}
    for r in range(rounds):
        times["erm"].append(statistics.median(timed(lambda: erm_step(r)) for _ in range(3)))
        # The per-domain gradient engine alone (the floor of a candidate), into the buffer a candidate reuses.
        times["passes"].append(
            statistics.median(
                timed(lambda: per_domain_gradients(algorithm.host.network, groups, gga.scored, out=buffer))
                for _ in range(3)
            )
        )
        times["candidate"].append(timed(lambda: gga.anneal(groups, r)) / (candidates + 1))  # theta0 is scored too
        times["official"].append(
            statistics.median(
                timed(lambda: official_candidate(algorithm.host.network, batches, 1e-5)) for _ in range(3)
            )
        )
    ratio = {k: statistics.median(t / e for t, e in zip(v, times["erm"])) for k, v in times.items()}
    return {
        "backbone": backbone,
        "domains": domains,
        "batch": batch,
        "image_size": size,
        **{f"{k}_s": statistics.median(v) for k, v in times.items()},
        **{f"{k}_ratio": ratio[k] for k in ("passes", "candidate", "official")},
    }


def whole_run(steps: int, start: int, end: int, candidates: int, repeats: int, backbone: str) -> dict:
    from dgzoo.config import TrainConfig
    from dgzoo.training.engine import train

    times: dict[str, list[float]] = {"erm": [], "erm+gga": []}
    accepted = []
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(repeats):
            for algorithm in ("erm", "erm+gga"):
                hp = {"gga.start": start, "gga.end": end, "gga.candidates": candidates} if "gga" in algorithm else {}
                cfg = TrainConfig.from_dict(
                    dict(
                        backbone=backbone,
                        steps=steps,
                        batch_size=32,
                        eval_every=steps,
                        lr=1e-3,
                        log_with="none",
                        num_workers=0,
                        target_domains=["75"],
                        algorithm=algorithm,
                        hparams=hp,
                        overwrite=True,
                        output_dir=str(Path(tmp) / f"{algorithm}-{rep}"),
                    )
                )
                results = train(cfg)
                times[algorithm].append(results["timing"]["train_seconds"])
                if "gga" in algorithm:
                    accepted.append(results["diagnostics"]["gga"]["accepted"])
    ratios = [g / e for g, e in zip(times["erm+gga"], times["erm"])]
    return {
        "backbone": backbone,
        "steps": steps,
        "window": [start, end],
        "candidates": candidates,
        "erm_train_s": statistics.median(times["erm"]),
        "gga_train_s": statistics.median(times["erm+gga"]),
        "ratio": statistics.median(ratios),
        "ratios": ratios,
        "accepted": accepted,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("candidate", "run", "both"), default="both")
    parser.add_argument("--backbones", nargs="+", default=["test_resnet", "resnet18"])
    parser.add_argument("--domains", type=int, default=3, help="source domains (the paper: 3, DomainNet 5)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per domain (the paper: 32)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--candidates", type=int, default=8, help="candidates per timed search")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--run-backbone", default="test_resnet")
    parser.add_argument("--run-steps", type=int, default=200)
    parser.add_argument("--run-window", type=int, nargs=2, default=[20, 39])
    parser.add_argument("--run-candidates", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--json", help="also write the numbers to this file")
    add_smoke(parser)
    args = apply_smoke(
        parser.parse_args(),
        backbones=["test_resnet"],
        domains=2,
        batch_size=4,
        image_size=16,
        candidates=1,
        rounds=1,
        run_steps=4,
        run_window=[1, 2],
        run_candidates=1,
        repeats=1,
        json=None,
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    out: dict = {"device": "cpu", "threads": torch.get_num_threads()}

    if args.part in ("candidate", "both"):
        rows = [
            candidate_cost(b, args.domains, args.batch_size, args.image_size, args.candidates, args.rounds)
            for b in args.backbones
        ]
        out["candidate"] = rows
        print(
            f"\nCandidate cost, {args.domains} domains x {args.batch_size} images, {args.image_size}px "
            f"({torch.get_num_threads()} threads), median of {args.rounds} interleaved rounds"
        )
        print(
            "| backbone | ERM step (ms) | per-domain passes / ERM | dgzoo candidate (ms) | candidate / ERM | "
            "official candidate / ERM |"
        )
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(
                f"| {r['backbone']} | {1e3 * r['erm_s']:.1f} | {r['passes_ratio']:.2f} | "
                f"{1e3 * r['candidate_s']:.1f} | {r['candidate_ratio']:.2f} | {r['official_ratio']:.2f} |"
            )
    if args.part in ("run", "both"):
        start, end = args.run_window
        run = whole_run(args.run_steps, start, end, args.run_candidates, args.repeats, args.run_backbone)
        out["run"] = run
        annealed = end - start + 1
        ratio = next(
            (r["candidate_ratio"] for r in out.get("candidate", []) if r["backbone"] == args.run_backbone), None
        )
        predicted = (1 + annealed * (args.run_candidates + 1) * ratio / args.run_steps) if ratio else None
        print(
            f"\nWhole run on rotated-digits ({args.run_backbone}, {args.run_steps} steps, 5 sources x 32, window "
            f"{start}..{end} = {annealed} annealed steps x {args.run_candidates} candidates), "
            f"median of {args.repeats}"
        )
        print("| erm train (s) | erm+gga train (s) | erm+gga / erm | predicted from candidate ratio |")
        print("|---|---|---|---|")
        print(
            f"| {run['erm_train_s']:.1f} | {run['gga_train_s']:.1f} | {run['ratio']:.2f} | {predicted:.2f} |"
            if predicted
            else f"| {run['erm_train_s']:.1f} | {run['gga_train_s']:.1f} | {run['ratio']:.2f} | (run --part both) |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
