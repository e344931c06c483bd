"""ERM training throughput: images/s and step time for a backbone and per-domain batch.

Two contenders, timed step by step in one process, interleaved (compute, pipeline, compute, pipeline, ...) so that
a change in the machine's load touches both alike:

- ``compute``: the ERM step alone (forward, backward, optimizer) on tensors already on the device: the ceiling.
- ``pipeline``: the same step fed by dgzoo's real per-domain loader on rotated-digits (decode, transform,
  collate, host-to-device copy): what a training run achieves. ``pipeline_over_compute`` is the median of the
  per-round ratios; it cannot be below 1 by more than noise, since a loader cannot speed the compute up.

    python benchmarks/throughput.py --backbone resnet18 --image-size 32 --domains 5 --batch-size 32
    python benchmarks/throughput.py --backbone resnet50 --image-size 224 --device cuda --mixed-precision bf16
    python benchmarks/throughput.py --smoke            # tiny sizes: checks that the script runs (CI)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import time
from collections.abc import Iterator

import torch

from dgzoo.algorithms import create_algorithm
from dgzoo.data import DomainImages, load_dg_dataset, make_splits, train_loader, train_transform
from dgzoo.models import create_backbone, data_config


def timed_step(algorithm, minibatches: Iterator, step: int, device: torch.device) -> float:
    """Seconds of one ERM step, including fetching its minibatches from ``minibatches`` and the copy to ``device``."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    batch = [(x.to(device, non_blocking=True), y.to(device, non_blocking=True)) for x, y in next(minibatches)]
    algorithm.update(batch, step)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def interleaved(
    algorithm, contenders: dict[str, Iterator], steps: int, warmup: int, device: torch.device
) -> dict[str, list[float]]:
    """Per-step seconds of each contender, taking one step of each in turn (A B A B ...), after ``warmup``
    untimed rounds."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for round_ in range(warmup + steps):
        for name, batches in contenders.items():
            seconds = timed_step(algorithm, batches, round_, device)
            if round_ >= warmup:
                times[name].append(seconds)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--domains", type=int, default=5, help="number of source domains (minibatches per step)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per domain per step")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no")
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--skip-pipeline", action="store_true", help="only measure the compute ceiling")
    parser.add_argument("--json", help="also write the numbers to this JSON file")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and a few steps: checks the script runs")
    args = parser.parse_args()
    if args.smoke:
        args.backbone, args.image_size, args.domains, args.batch_size, args.steps, args.warmup = (
            "test_resnet",
            16,
            2,
            4,
            2,
            1,
        )
        print("--smoke: test_resnet, 16 px, 2 domains x 4 images, 2 steps (numbers mean nothing)")

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = create_backbone(args.backbone, num_classes=10, image_size=args.image_size).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    algorithm = create_algorithm("erm", model, args.domains, {}, make_optimizer=lambda _: optimizer)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()

    shape = (args.batch_size, 3, args.image_size, args.image_size)
    synthetic = [
        (torch.randn(shape, device=device), torch.randint(0, 10, (args.batch_size,), device=device))
        for _ in range(args.domains)
    ]
    contenders = {"compute": iter(lambda: synthetic, None)}
    if not args.skip_pipeline:
        data = load_dg_dataset("rotated-digits")
        splits = make_splits(data, 0.2, 0)
        preprocessing = data_config(model, args.image_size)
        domains = data.domains[: args.domains]
        if len(domains) < args.domains:
            parser.error(f"rotated-digits has {len(data.domains)} domains; use --domains <= {len(data.domains)}")
        sets = [
            DomainImages(data, splits.in_rows[d], train_transform(preprocessing, "none"), random=False) for d in domains
        ]
        contenders["pipeline"] = iter(
            train_loader(
                sets,
                args.batch_size,
                seed=0,
                steps=args.warmup + args.steps,
                num_workers=args.num_workers,
                pin_memory=device.type == "cuda",
            )
        )
    with autocast:
        times = interleaved(algorithm, contenders, args.steps, args.warmup, device)
    images = args.domains * args.batch_size
    compute = statistics.mean(times["compute"])
    result = {
        "backbone": args.backbone,
        "image_size": args.image_size,
        "domains": args.domains,
        "batch_size_per_domain": args.batch_size,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "mixed_precision": args.mixed_precision,
        "steps": args.steps,
        "compute_step_seconds": compute,
        "compute_images_per_second": images / compute,
    }
    if "pipeline" in times:
        pipeline = statistics.mean(times["pipeline"])
        result.update(
            {
                "pipeline_step_seconds": pipeline,
                "pipeline_images_per_second": images / pipeline,
                "num_workers": args.num_workers,
                "pipeline_over_compute": statistics.median(p / c for p, c in zip(times["pipeline"], times["compute"])),
            }
        )

    width = max(len(k) for k in result)
    for key, value in result.items():
        print(f"{key:<{width}}  {value:.4g}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
