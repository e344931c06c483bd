"""ERM training throughput: images/s and step time for a backbone and per-domain batch.

Two measurements, taken in one process, one after the other:

- ``compute``: the ERM step alone (forward, backward, optimizer) on tensors already on the device: the ceiling.
- ``pipeline``: the same step fed by dgzoo's real per-domain loader on rotated-digits (decode, transform,
  collate, host-to-device copy): what a training run achieves. The ratio shows what data loading costs.

    python benchmarks/throughput.py --backbone resnet18 --image-size 32 --domains 5 --batch-size 32
    python benchmarks/throughput.py --backbone resnet50 --image-size 224 --device cuda --mixed-precision bf16
"""
from __future__ import annotations

import argparse
import contextlib
import json
import platform
import time

import torch

from dgzoo.algorithms import create_algorithm
from dgzoo.data import DomainImages, load_dg_dataset, make_splits, train_loader, train_transform
from dgzoo.models import create_backbone, data_config


def timed_steps(algorithm, batches, steps: int, warmup: int, device: torch.device) -> float:
    """Mean seconds per ERM step over ``steps`` steps, after ``warmup`` untimed ones."""
    iterator = iter(batches)
    for step in range(warmup + steps):
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        minibatches = [(x.to(device, non_blocking=True), y.to(device, non_blocking=True)) for x, y in next(iterator)]
        algorithm.update(minibatches, step)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


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
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = create_backbone(args.backbone, num_classes=10, image_size=args.image_size).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    algorithm = create_algorithm("erm", model, args.domains, {}, make_optimizer=lambda _: optimizer)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision)
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext())

    shape = (args.batch_size, 3, args.image_size, args.image_size)
    synthetic = [(torch.randn(shape, device=device), torch.randint(0, 10, (args.batch_size,), device=device))
                 for _ in range(args.domains)]
    with autocast:
        compute = timed_steps(algorithm, iter(lambda: synthetic, None), args.steps, args.warmup, device)
    images = args.domains * args.batch_size
    result = {"backbone": args.backbone, "image_size": args.image_size, "domains": args.domains,
              "batch_size_per_domain": args.batch_size, "device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
              or platform.machine(), "threads": torch.get_num_threads(), "mixed_precision": args.mixed_precision,
              "compute_step_seconds": compute, "compute_images_per_second": images / compute}

    if not args.skip_pipeline:
        data = load_dg_dataset("rotated-digits")
        splits = make_splits(data, 0.2, 0)
        preprocessing = data_config(model, args.image_size)
        domains = data.domains[: args.domains]
        if len(domains) < args.domains:
            parser.error(f"rotated-digits has {len(data.domains)} domains; use --domains <= {len(data.domains)}")
        sets = [DomainImages(data, splits.in_rows[d], train_transform(preprocessing, "none"), random=False)
                for d in domains]
        loader = train_loader(sets, args.batch_size, seed=0, steps=args.warmup + args.steps,
                              num_workers=args.num_workers, pin_memory=device.type == "cuda")
        with autocast:
            pipeline = timed_steps(algorithm, loader, args.steps, args.warmup, device)
        result.update({"pipeline_step_seconds": pipeline, "pipeline_images_per_second": images / pipeline,
                       "num_workers": args.num_workers, "pipeline_over_compute": pipeline / compute})

    width = max(len(k) for k in result)
    for key, value in result.items():
        print(f"{key:<{width}}  {value:.4g}" if isinstance(value, float) else f"{key:<{width}}  {value}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
