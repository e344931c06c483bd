"""The training loader alone against a bare decode + augment loop over the same images: what the loader adds.

Contenders, each taking the same steps (DomainBed's per-domain draws, the same keys) of the same synthetic parquet
dataset (benchmarks/startup.py's JPEGs) through the same transform. The in-process ones are interleaved step by
step (bare, inline, v2, bare, inline, v2, ...) so a change in the machine's load touches all alike; the one with
worker processes runs alone after them in each round (interleaved, its workers would prefetch while the others
run and it would look faster than it is):

- ``bare``: a plain loop: decode each drawn image, transform it, stack each domain's tensors. No seeding, no
  DataLoader: the floor of the work a step needs.
- ``inline``: dgzoo's ``train_loader`` with no worker process (decode, per-sample augmentation seeds, collate):
  the ratio ``inline / bare`` is the loader's own overhead, both on one core.
- ``workers``: the same loader with ``--num-workers`` worker processes, as a run feeds an accelerator: images/s
  delivered to the main process.
- ``v2``: the bare loop done on uint8 tensors instead of PIL images (torchvision's JPEG decoder, then
  ``torchvision.transforms.v2``: the same crop, flip, colour jitter, grayscale and normalisation parameters),
  from bytes read out of the table beforehand: whether tensor augmentation would be the faster path on this CPU.

Each contender's first step is left out of its timing (it starts the loader). Ratios are taken within a round.

    python benchmarks/loader.py --image-size 64 --batch-size 32 --steps 20 --rounds 3
    python benchmarks/loader.py --image-size 224 --batch-size 32 --steps 10 --rounds 3
    python benchmarks/loader.py --smoke          # tiny sizes: checks that the script runs (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dgzoo.data import DomainImages, StepBatchSampler, load_dg_dataset, train_loader, train_transform
from startup import make_dataset

PREPROCESSING = {"interpolation": "bicubic", "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


Step = Callable[[int], object]  # does step t's work


def bare_steps(sets: list[DomainImages], sampler: StepBatchSampler) -> Callable[[], Step]:
    """A plain loop's step: decode each drawn image, transform it, stack each domain's tensors."""

    def step(t: int) -> object:
        images: dict[int, list[torch.Tensor]] = {}
        for d, position, _ in sampler.keys_at(t):
            domain = sets[d]
            images.setdefault(d, []).append(domain.transform(domain.data.decode_image(int(domain.rows[position]))))
        return [torch.stack(images[d]) for d in sorted(images)]

    return lambda: step


def v2_transform(size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """DomainBed's augmentation parameters as a ``torchvision.transforms.v2`` pipeline on uint8 CHW tensors."""
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=(0.7, 1.0), interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ColorJitter(0.3, 0.3, 0.3, 0.3),
            v2.RandomGrayscale(0.1),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(PREPROCESSING["mean"], PREPROCESSING["std"]),
        ]
    )


def v2_steps(sets: list[DomainImages], sampler: StepBatchSampler, size: int) -> Callable[[], float]:
    """Seconds for steps 1.. of the bare loop on uint8 tensors: torchvision's decoder, then :func:`v2_transform`."""
    import datasets
    from torchvision.io import decode_jpeg

    stored = [s.data.table.cast_column(s.data.image_column, datasets.Image(decode=False)) for s in sets]
    raw = [
        [
            torch.frombuffer(bytearray(table[int(row)][s.data.image_column]["bytes"]), dtype=torch.uint8)
            for row in s.rows
        ]
        for s, table in zip(sets, stored)
    ]
    transform = v2_transform(size)

    def step(t: int) -> object:
        images: dict[int, list[torch.Tensor]] = {}
        for d, position, _ in sampler.keys_at(t):
            images.setdefault(d, []).append(transform(decode_jpeg(raw[d][position])))
        return [torch.stack(images[d]) for d in sorted(images)]

    return lambda: step


def loader_steps(sets: list[DomainImages], batch_size: int, steps: int, workers: int) -> Callable[[], Step]:
    """A fresh dgzoo training loader per round; its step takes the next batch."""

    def start() -> Step:
        batches = iter(train_loader(sets, batch_size, seed=0, steps=steps, num_workers=workers))
        return lambda t: next(batches)

    return start


def timed(starters: dict[str, Callable[[], Step]], steps: int) -> dict[str, float]:
    """Seconds of steps 1.. of each contender, taking one step of each in turn (A B C A B C ...); step 0 (which
    starts a loader) is not timed."""
    stepping = {name: start() for name, start in starters.items()}
    seconds = dict.fromkeys(stepping, 0.0)
    for t in range(steps):
        for name, step in stepping.items():
            begin = time.perf_counter()
            step(t)
            if t:
                seconds[name] += time.perf_counter() - begin
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image-size", type=int, default=64, help="stored and trained image size, px")
    parser.add_argument("--images", type=int, default=2000, help="images in the synthetic dataset")
    parser.add_argument("--domains", type=int, default=3, help="source domains (minibatches per step)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per domain per step")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--num-workers", type=int, default=1, help="workers of the `workers` contender")
    parser.add_argument("--augment", default="domainbed", choices=("domainbed", "none"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/dgzoo-loader-bench"))
    parser.add_argument("--json", help="also write the numbers to this JSON file")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and a few steps: checks the script runs")
    args = parser.parse_args()
    if args.smoke:
        args.images, args.batch_size, args.steps, args.rounds = 60, 4, 3, 1
        print("--smoke: 60 images, 3 steps of 4 images per domain, 1 round (numbers mean nothing)")

    folder = make_dataset(args.work / f"data-{args.images}-{args.image_size}", args.images, size=args.image_size)
    data = load_dg_dataset(str(folder))
    config = {**PREPROCESSING, "input_size": (3, args.image_size, args.image_size), "crop_pct": 1.0}
    transform = train_transform(config, args.augment)
    random = args.augment != "none"
    sets = [DomainImages(data, data.rows_by_domain[d], transform, d, random) for d in data.domains[: args.domains]]
    sampler = StepBatchSampler([len(s) for s in sets], args.batch_size, seed=0, steps=args.steps)
    contenders = {"bare": bare_steps(sets, sampler), "inline": loader_steps(sets, args.batch_size, args.steps, 0)}
    if args.augment == "domainbed":
        contenders["v2"] = v2_steps(sets, sampler, args.image_size)
    workers = loader_steps(sets, args.batch_size, args.steps, args.num_workers)
    images = (args.steps - 1) * args.batch_size * len(sets)
    rounds = []
    for _ in range(args.rounds):
        seconds = timed(contenders, args.steps)
        # Alone: interleaved, its worker would prefetch while the others run and look faster than it is.
        seconds.update(timed({"workers": workers}, args.steps))
        rounds.append({name: images / s for name, s in seconds.items()})

    print(
        f"machine: {platform.machine()} {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; "
        f"{args.image_size} px JPEGs, {args.augment} augmentation, {args.steps} steps of {len(sets)} x "
        f"{args.batch_size} images, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}, "
        f"workers contender: {args.num_workers} worker(s)"
    )
    names = list(rounds[0])
    print(
        "| round | "
        + " | ".join(f"{n} images/s" for n in names)
        + " | "
        + " | ".join(f"{n} / bare" for n in names[1:])
        + " |"
    )
    print("|---" * (2 * len(names)) + "|")
    for i, r in enumerate(rounds):
        print(
            f"| {i} | "
            + " | ".join(f"{r[n]:.0f}" for n in names)
            + " | "
            + " | ".join(f"{r[n] / r['bare']:.2f}" for n in names[1:])
            + " |"
        )
    result = {
        "image_size": args.image_size,
        "augment": args.augment,
        "steps": args.steps,
        "images_per_step": args.batch_size * len(sets),
        "num_workers": args.num_workers,
        "rounds": rounds,
        **{f"{n}_over_bare": statistics.median(r[n] / r["bare"] for r in rounds) for n in names[1:]},
    }
    print("median ratios: " + ", ".join(f"{n} / bare {result[f'{n}_over_bare']:.2f}" for n in names[1:]))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
