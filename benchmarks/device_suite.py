"""The parts of benchmarks/device_suite.sh (run that script; this module is its Python side).

Every part prints one JSON line starting with ``RESULT`` that the script collects:

- ``data``: synthetic images (one colour pattern per class, noise per image) as ``root/<domain>/<class>/*.png``,
  DomainBed's folder layout, which dgzoo reads as ``--dataset PATH`` and timm's ``train.py`` as an image folder.
- ``dgzoo``: dgzoo's training images/s on them: one ``train`` per setting (fp32, bf16, + channels-last,
  + compile), steady state = the images between the first and the last evaluation over the seconds between them
  (``records.jsonl``), so start-up and compilation are excluded.
- ``timm``: the same model, images, batch and settings through timm's ``train.py`` when its path is given, else
  through a timm-style loop written here (timm's model, a plain DataLoader over the same PNGs, SGD, autocast,
  channels-last, ``torch.compile``): the output says which one ran.
- ``ratios``: per-domain gradient passes / ERM step and one GGA candidate / ERM step, interleaved, in bf16.
- ``sweep``: a sweep of small runs on one GPU at 1, 2 and 4 runs per GPU (``--runs-per-gpu``): training images
  of all runs over the sweep's wall time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def result(**values: object) -> None:
    print("RESULT " + json.dumps(values), flush=True)


# ---------------------------------------------------------------------- data


def make_data(root: Path, domains: int, classes: int, per_class: int, size: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    palette = rng.integers(0, 256, (classes, 3))
    for d in range(domains):
        shift = 40 * d  # a domain is a colour shift, so domains differ as DG datasets' do
        for c in range(classes):
            folder = root / f"domain{d}" / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                noise = rng.integers(-60, 60, (size, size, 3))
                pixels = np.clip(palette[c] + shift + noise, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"{i}.png")
    result(
        part="data", root=str(root), domains=domains, classes=classes, images=domains * classes * per_class, size=size
    )


# ---------------------------------------------------------------------- dgzoo


def steady_rate(run_dir: Path) -> float:
    """Training images/s between the run's first and last evaluation (start-up and compilation excluded)."""
    records = [json.loads(line) for line in (run_dir / "records.jsonl").read_text().splitlines()]
    first, last = records[0], records[-1]
    images = last["images_per_second"] * last["train_seconds"] - first["images_per_second"] * first["train_seconds"]
    return images / max(last["train_seconds"] - first["train_seconds"], 1e-9)


def precision(args: argparse.Namespace, setting: str) -> str:
    """The setting's precision, or float32 everywhere with ``--float32`` (CPU smoke runs: see docs/performance.md)."""
    return "no" if args.float32 else SETTINGS[setting]["precision"]


def dgzoo_rates(args: argparse.Namespace) -> None:
    import dgzoo.training.fastpath
    from dgzoo.config import TrainConfig
    from dgzoo.training.engine import train

    dgzoo.training.fastpath.COMPILE_BACKEND = args.compile_backend
    targets = sorted(p.name for p in Path(args.data).iterdir() if p.is_dir())[args.domains :]
    for setting in args.settings:
        flags = SETTINGS[setting]
        with tempfile.TemporaryDirectory() as tmp:
            cfg = TrainConfig.from_dict(
                dict(
                    dataset=args.data,
                    target_domains=targets,
                    backbone=args.backbone,
                    image_size=args.image_size,
                    batch_size=args.batch_size,
                    steps=args.warm + args.steps,
                    eval_every=args.warm,
                    checkpoint_every=10**9,
                    augment="none",
                    num_workers=args.workers,
                    log_with="none",
                    eval_batch_size=256,
                    output_dir=tmp,
                    mixed_precision=precision(args, setting),
                    channels_last=flags["channels_last"],
                    compile=flags["compile"],
                )
            )
            start = time.perf_counter()
            train(cfg)
            result(
                part="dgzoo",
                setting=setting,
                images_per_second=steady_rate(Path(tmp)),
                wall_seconds=time.perf_counter() - start,
            )


SETTINGS = {
    "fp32": dict(precision="no", channels_last=False, compile=False),
    "bf16": dict(precision="bf16", channels_last=False, compile=False),
    "bf16+channels_last": dict(precision="bf16", channels_last=True, compile=False),
    "bf16+channels_last+compile": dict(precision="bf16", channels_last=True, compile=True),
}


# ---------------------------------------------------------------------- timm


class Folder(torch.utils.data.Dataset):
    """The PNGs of every domain, as normalised float tensors (no augmentation: a compute comparison)."""

    def __init__(self, root: Path, size: int):
        self.files = sorted(root.glob("*/*/*.png"))
        classes = sorted({f.parent.name for f in self.files})
        self.labels = [classes.index(f.parent.name) for f in self.files]
        self.size = size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        image = Image.open(self.files[i]).convert("RGB").resize((self.size, self.size))
        x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (x - 0.45) / 0.225, self.labels[i]


def timm_loop_rates(args: argparse.Namespace, device: torch.device) -> None:
    """A timm-style training loop (own code): timm's model, a DataLoader, SGD, autocast, channels-last, compile."""
    import timm

    batch = args.batch_size * args.domains  # the same images per step as dgzoo's (batch per domain x domains)
    data = Folder(Path(args.data), args.image_size)
    for setting in args.settings:
        flags = SETTINGS[setting]
        torch.manual_seed(0)
        model = timm.create_model(args.backbone, pretrained=False, num_classes=len(set(data.labels))).to(device)
        if flags["channels_last"]:
            model.to(memory_format=torch.channels_last)
        step_model = torch.compile(model, backend=args.compile_backend) if flags["compile"] else model
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        loader = torch.utils.data.DataLoader(
            data,
            batch_size=batch,
            shuffle=True,
            drop_last=True,
            num_workers=args.workers,
            pin_memory=device.type == "cuda",
            persistent_workers=args.workers > 0,
        )
        autocast = (
            torch.autocast(device.type, dtype=torch.bfloat16)
            if precision(args, setting) == "bf16"
            else contextlib.nullcontext()
        )
        seen, tick, step, start = 0, None, 0, time.perf_counter()
        while step < args.warm + args.steps:
            for x, y in loader:
                if step == args.warm:  # steady state from here
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    tick, seen = time.perf_counter(), 0
                x = x.to(device, non_blocking=True)
                if flags["channels_last"]:
                    x = x.contiguous(memory_format=torch.channels_last)
                with autocast:
                    loss = torch.nn.functional.cross_entropy(step_model(x), y.to(device, non_blocking=True))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                step += 1
                seen += len(x)
                if step == args.warm + args.steps:
                    break
        if device.type == "cuda":
            torch.cuda.synchronize()
        result(
            part="timm",
            runner="timm-style loop (benchmarks/device_suite.py; timm's train.py not given)",
            setting=setting,
            images_per_second=seen / (time.perf_counter() - tick),
            wall_seconds=time.perf_counter() - start,
        )


def timm_train_rates(args: argparse.Namespace) -> None:
    """timm's own train.py on the same images (its image-folder dataset reads ``<data>/train/<class>``)."""
    batch = args.batch_size * args.domains
    with tempfile.TemporaryDirectory() as tmp:
        train_dir = Path(tmp) / "data" / "train"
        for image in Path(args.data).glob("*/*/*.png"):  # one folder per class over every domain, by link
            target = train_dir / image.parent.name / f"{image.parent.parent.name}_{image.name}"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(image.resolve())
        for setting in args.settings:
            flags = SETTINGS[setting]
            command = [
                sys.executable,
                args.timm_train,
                str(Path(tmp) / "data"),
                "--model",
                args.backbone,
                "--num-classes",
                str(len(list(train_dir.iterdir()))),
                "--img-size",
                str(args.image_size),
                "-b",
                str(batch),
                "--epochs",
                "1000",
                "--no-aug",
                "--workers",
                str(args.workers),
                "--log-interval",
                "1",
                "--output",
                str(Path(tmp) / "out"),
                "--opt",
                "sgd",
                "--lr",
                "0.01",
                "--sched",
                "none",
                "--checkpoint-hist",
                "1",
            ]
            command += ["--amp", "--amp-dtype", "bfloat16"] if flags["precision"] == "bf16" else []
            command += ["--channels-last"] if flags["channels_last"] else []
            command += ["--torchcompile"] if flags["compile"] else []
            start = time.perf_counter()
            rates: list[float] = []
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            assert process.stdout is not None
            for line in process.stdout:  # timm logs "... <rate>/s" per logged step
                match = re.search(r"([0-9.]+)/s", line)
                if match:
                    rates.append(float(match.group(1)))
                if len(rates) >= args.warm + args.steps:
                    process.terminate()
                    break
            process.wait()
            steady = rates[args.warm :] or rates
            result(
                part="timm",
                runner=f"timm train.py ({args.timm_train})",
                setting=setting,
                images_per_second=statistics.median(steady) if steady else float("nan"),
                wall_seconds=time.perf_counter() - start,
            )


# ---------------------------------------------------------------------- per-domain gradient and GGA ratios


def ratios(args: argparse.Namespace, device: torch.device) -> None:
    from dgzoo.algorithms import Runtime, create_algorithm
    from dgzoo.algorithms.gga import scoring_groups
    from dgzoo.algorithms.gradients import per_domain_gradients
    from dgzoo.algorithms.registry import plain_loss_step
    from dgzoo.models import create_backbone

    torch.manual_seed(0)
    network = create_backbone(args.backbone, num_classes=10, image_size=args.image_size)
    hparams = {"gga.start": 0, "gga.end": 10**9, "gga.candidates": args.candidates, "gga.rho": 1e-5}
    algorithm = create_algorithm(
        "erm+gga",
        network,
        args.domains,
        hparams,
        runtime=Runtime(device),
        make_optimizer=lambda g: torch.optim.Adam(g, lr=1e-5),
    )
    gga = algorithm.addons[0]
    g = torch.Generator().manual_seed(0)
    batches = [
        (
            torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=g).to(device),
            torch.randint(0, 10, (args.batch_size,), generator=g).to(device),
        )
        for _ in range(args.domains)
    ]
    groups = scoring_groups(batches)
    buffer = gga.scored.empty(len(groups))

    def timed(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    contenders = {
        "erm": lambda r: plain_loss_step(algorithm.host, batches, r),
        "per_domain_passes": lambda r: per_domain_gradients(network, groups, gga.scored, out=buffer),
        "gga_candidate": lambda r: gga.anneal(groups, r),
    }
    per = {"erm": 1, "per_domain_passes": 1, "gga_candidate": args.candidates + 1}  # theta0 is scored too
    times: dict[str, list[float]] = {name: [] for name in contenders}
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=not args.float32):
        for r in range(args.warm_rounds + args.rounds):  # interleaved: erm, passes, candidate, erm, ...
            for name, fn in contenders.items():
                seconds = timed(lambda: fn(r)) / per[name]
                if r >= args.warm_rounds:
                    times[name].append(seconds)
    for name in ("per_domain_passes", "gga_candidate"):
        result(
            part="ratios",
            what=f"{name} / ERM step",
            precision="no" if args.float32 else "bf16",
            image_size=args.image_size,
            ratio=statistics.median(t / e for t, e in zip(times[name], times["erm"])),
            erm_step_seconds=statistics.median(times["erm"]),
        )


# ---------------------------------------------------------------------- sweep packing


def sweep(args: argparse.Namespace) -> None:
    from dgzoo.experiments.launchers import run_sweep
    from dgzoo.experiments.sweep import SweepSpec

    domains = sorted(p.name for p in Path(args.data).iterdir() if p.is_dir())
    for per_gpu in args.runs_per_gpu:
        with tempfile.TemporaryDirectory() as tmp:
            spec = SweepSpec.from_dict(
                dict(
                    datasets=[args.data],
                    algorithms=["erm"],
                    test_domains=domains[-1:],
                    n_trials=args.runs,
                    output_dir=tmp,
                    train=dict(
                        backbone=args.backbone,
                        image_size=args.image_size,
                        steps=args.steps,
                        eval_every=args.steps,
                        batch_size=args.batch_size,
                        augment="none",
                        num_workers=args.workers,
                        log_with="none",
                        mixed_precision="bf16" if args.device == "cuda" else "no",
                        channels_last=args.device == "cuda",
                    ),
                )
            )
            start = time.perf_counter()
            outcome = run_sweep(spec, "local-gpus", gpus=[args.gpu], runs_per_gpu=per_gpu, log=lambda line: None)
            wall = time.perf_counter() - start
            if outcome.failed:
                raise SystemExit(f"sweep at {per_gpu} run(s) per GPU failed: {outcome.failed[0][1]}")
            images = sum(json.loads(p.read_text())["timing"]["train_images"] for p in Path(tmp).glob("*/results.json"))
            result(
                part="sweep",
                runs_per_gpu=per_gpu,
                runs=len(outcome.trained),
                wall_seconds=wall,
                training_images_per_wall_second=images / wall,
            )


def report(rows: list[dict], command: str) -> str:
    """benchmarks/results/device.md from the RESULT lines of one run of the suite."""
    import platform
    from datetime import datetime, timezone

    import timm

    device = (
        torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else f"{platform.machine()} CPU ({os.cpu_count()} cores)"
    )
    data = next(r for r in rows if r["part"] == "data")
    lines = [
        "# Device suite (benchmarks/device_suite.sh)",
        "",
        f"- Date: {datetime.now(timezone.utc).date()}",
        f"- Device: {device}",
        f"- torch {torch.__version__}, timm {timm.__version__}",
        f"- Command: `{command}`",
        f"- Data: {data['images']} synthetic {data['size']} px PNGs, {data['domains']} domains x "
        f"{data['classes']} classes (made by the suite; pretrained=False everywhere)",
        "",
        "## Training images/s, steady state (start-up and compilation excluded)",
        "",
        "| setting | dgzoo | timm | dgzoo / timm |",
        "|---|--:|--:|--:|",
    ]
    timm_rows = {r["setting"]: r for r in rows if r["part"] == "timm"}
    for r in (r for r in rows if r["part"] == "dgzoo"):
        other = timm_rows.get(r["setting"], {}).get("images_per_second", float("nan"))
        lines.append(
            f"| {r['setting']} | {r['images_per_second']:.1f} | {other:.1f} | {r['images_per_second'] / other:.2f} |"
        )
    runners = sorted({r["runner"] for r in timm_rows.values()})
    lines += [
        "",
        f"timm column: {', '.join(runners)}.",
        "",
        "## Per-domain gradients and GGA candidates",
        "",
        "| what | precision | image size | ratio | ERM step (s) |",
        "|---|---|--:|--:|--:|",
    ]
    lines += [
        f"| {r['what']} | {r['precision']} | {r['image_size']} | {r['ratio']:.2f} | {r['erm_step_seconds']:.4f} |"
        for r in rows
        if r["part"] == "ratios"
    ]
    lines += [
        "",
        "## Sweep throughput on one GPU (--runs-per-gpu)",
        "",
        "| runs per GPU | runs | wall (s) | training images / wall second |",
        "|--:|--:|--:|--:|",
    ]
    lines += [
        f"| {r['runs_per_gpu']} | {r['runs']} | {r['wall_seconds']:.1f} | {r['training_images_per_wall_second']:.1f} |"
        for r in rows
        if r["part"] == "sweep"
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=("data", "dgzoo", "timm", "ratios", "sweep", "report"))
    parser.add_argument("--data", required=True, help="the synthetic image folder")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--domains", type=int, default=3, help="source domains (the data has one more, held out)")
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--per-class", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32, help="images per domain per step")
    parser.add_argument("--warm", type=int, default=10, help="untimed steps (warm-up, compilation)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument(
        "--timm-train",
        default=os.environ.get("TIMM_TRAIN_PY"),
        help="path of timm's train.py (default: $TIMM_TRAIN_PY; absent: a timm-style loop)",
    )
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warm-rounds", type=int, default=1)
    parser.add_argument("--runs", type=int, default=4, help="sweep: runs per setting")
    parser.add_argument("--runs-per-gpu", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--gpu", default="0", help="sweep: the GPU id the runs share")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend (smoke: eager)")
    parser.add_argument("--float32", action="store_true", help="every setting in float32 (CPU smoke runs)")
    parser.add_argument("--results", help="report: the RESULT lines' file")
    parser.add_argument("--command", default="", help="report: the command that ran the suite")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.part == "data":
        make_data(Path(args.data), args.domains + 1, args.classes, args.per_class, args.image_size)  # + held-out
    elif args.part == "dgzoo":
        dgzoo_rates(args)
    elif args.part == "timm":
        if args.timm_train and Path(args.timm_train).exists():
            timm_train_rates(args)
        else:
            timm_loop_rates(args, device)
    elif args.part == "report":
        print(report([json.loads(line) for line in Path(args.results).read_text().splitlines()], args.command))
    elif args.part == "ratios":
        ratios(args, device)
    else:
        sweep(args)


if __name__ == "__main__":
    main()
