"""Per-domain gradient step time / ERM step time, measured side by side on the same images.

The physical floor of a per-domain gradient step is one forward and one backward over the step's images,
which is what an ERM step pays (ratio 1.0). Every method trains its own copy of the same model on the same
K x B images, and the methods take turns step by step, so machine load hits them alike; the table gives
each method's median step time and the median of its per-round ratio to the ERM step of the same round.

Rows:
  erm                      DomainBed ERM: one forward/backward on the K*B images pooled, one optimizer step
  k-backward               K ordinary forward/backward passes (one per domain) accumulated into .grad, one
                           optimizer step: the cost of K separate passes alone, with nothing kept per domain
  engine (loop|vmap)       per_domain_gradients (K gradients into a reused [K, P] buffer), their mean
                           written back to .grad, one optimizer step: the per-domain gradient step itself
  engine, fresh buffer     the same with a new [K, P] tensor every step (what out= saves)
  equilibrium | pcgrad | agr_sum   the full algorithm steps (equilibrium takes K optimizer steps per iteration)

  python benchmarks/gradient_step.py --threads 1
  python benchmarks/gradient_step.py --device cuda        # where vmap may pay: measure before choosing it
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from dgzoo.algorithms import create_algorithm
from dgzoo.algorithms.gradients import FlatParams, per_domain_gradients
from dgzoo.models import create_backbone
from smoke import add_smoke, apply_smoke


def engine_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches, method: str, reuse: bool
) -> Callable[[], None]:
    """A per-domain gradient step: K gradients, their mean written to .grad, one optimizer step."""
    params = FlatParams.of(model)
    buffer = params.empty(len(batches))
    mean = params.empty()

    def step() -> None:
        grads, _ = per_domain_gradients(model, batches, params, out=buffer if reuse else None, method=method)
        params.assign_grad(torch.mean(grads, dim=0, out=mean))
        optimizer.step()

    return step


def k_backward_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches) -> Callable[[], None]:
    """K separate forward/backward passes summed into .grad: the floor of any loop over domains."""

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        for x, y in batches:
            (F.cross_entropy(model(x), y) / len(batches)).backward()
        optimizer.step()

    return step


def algorithm_step(
    name: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches, hparams: dict
) -> Callable[[], None]:
    algorithm = create_algorithm(name, model, len(batches), hparams, make_optimizer=lambda _: optimizer)
    counter = iter(range(10**9))
    return lambda: algorithm.update(batches, next(counter))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--domains", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32, help="images per domain")
    parser.add_argument("--rounds", type=int, default=12, help="measured steps per method")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=[
            "erm",
            "k-backward",
            "engine-loop",
            "engine-vmap",
            "engine-loop-fresh",
            "equilibrium",
            "pcgrad",
            "agr_sum",
        ],
    )
    add_smoke(parser)
    args = apply_smoke(
        parser.parse_args(), backbone="test_resnet", image_size=16, domains=2, batch_size=4, rounds=2, warmup=1
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    base = create_backbone(args.backbone, num_classes=10).train().to(device)
    g = torch.Generator().manual_seed(0)
    batches = [
        (
            torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=g).to(device),
            torch.randint(0, 10, (args.batch_size,), generator=g).to(device),
        )
        for _ in range(args.domains)
    ]

    steps: dict[str, Callable[[], None]] = {}
    for method in args.methods:
        model = copy.deepcopy(base)
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
        if method == "erm":
            steps[method] = algorithm_step("erm", model, optimizer, batches, {})
        elif method == "k-backward":
            steps[method] = k_backward_step(model, optimizer, batches)
        elif method.startswith("engine-"):
            _, engine, *fresh = method.split("-")
            steps[method] = engine_step(model, optimizer, batches, engine, reuse=not fresh)
        else:
            steps[method] = algorithm_step(method, model, optimizer, batches, {"domains": "sources"})

    times: dict[str, list[float]] = {m: [] for m in steps}
    for round_ in range(args.warmup + args.rounds):
        for method, step in steps.items():
            start = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if round_ >= args.warmup:
                times[method].append(time.perf_counter() - start)

    params = sum(p.numel() for p in base.parameters())
    print(
        f"{args.backbone} at {args.image_size}px, {args.domains} domains x {args.batch_size} images, "
        f"{params / 1e6:.1f}M parameters, torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
        f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.machine()}; "
        f"{args.rounds} rounds after {args.warmup} warm-up"
    )
    print("| method | median step (s) | IQR (s) | step / ERM step (median of per-round ratios) |")
    print("|---|---|---|---|")
    erm = times.get("erm")
    for method, values in times.items():
        q = statistics.quantiles(values, n=4)
        ratio = statistics.median(v / e for v, e in zip(values, erm)) if erm else float("nan")
        print(f"| {method} | {statistics.median(values):.3f} | {q[0]:.3f}-{q[2]:.3f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
