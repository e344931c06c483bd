"""Start-up to the first training step against dataset size: warm caches (should not grow) and cold (per image).

A synthetic parquet dataset (64 px JPEGs; ``image`` / ``label`` / ``domain`` columns; 4 domains, 10 classes) is
written for every size, then ``dgzoo train`` runs on it as a local dataset path, each run a fresh process, until
its first training step ends: the time from launching the process to that moment is the start-up. The first run
of a size uses empty caches (Hugging Face datasets and dgzoo's), the later ones reuse them; warm runs are
interleaved over sizes (1k 10k 50k 1k 10k 50k ...) so a busy machine weighs on every size alike, and each round's
ratio to the smallest size is taken within the round.

    python benchmarks/startup.py --sizes 1000 10000 50000 --rounds 3
    python benchmarks/startup.py --sizes 200 400 --rounds 1 --work /tmp/s   # smoke size (the tests)

``--profile`` then times, in one process per size on the warm caches, the start-up stages that read the data
(loading the table, the class and domain tables, the splits, the image check, the whole ``plan_run``), with
dgzoo's plan cache (:mod:`dgzoo.data.plan_cache`) and without it (its entries moved aside: everything computed,
as before the cache existed), the two interleaved; ``--profile-only`` skips the start-up runs.
"""

from __future__ import annotations

import argparse
import inspect
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

DOMAINS = ("d0", "d1", "d2", "d3")
CLASSES = 10


def make_dataset(folder: Path, n: int, size: int = 64, seed: int = 0) -> Path:
    """Write ``folder/train.parquet``: ``n`` JPEGs of ``size`` px (smooth class- and domain-dependent colour fields,
    so they compress like photographs, not noise), an integer ``label`` and a string ``domain``. Returns the folder."""
    import datasets
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "train.parquet").exists():
        return folder
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, n)
    domains = rng.integers(0, len(DOMAINS), n)
    palette = np.random.default_rng(seed + 1).uniform(0, 255, size=(CLASSES, len(DOMAINS), 3))
    images = []
    for label, domain in zip(labels, domains):
        small = palette[label, domain] + rng.normal(0, 40, size=(8, 8, 3))
        image = Image.fromarray(np.clip(small, 0, 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        images.append({"bytes": buffer.getvalue(), "path": None})
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.Value("int64"), "domain": datasets.Value("string")}
    )
    table = datasets.Dataset.from_dict(
        {"image": images, "label": labels.tolist(), "domain": [DOMAINS[d] for d in domains]}, features=features
    )
    table.to_parquet(str(folder / "train.parquet"))
    return folder


def train_arguments(dataset: Path, output_dir: Path, steps: int, extra: list[str]) -> list[str]:
    """``dgzoo train`` flags of the measured run: ResNet-18 from scratch at 64 px, 32 images per source domain."""
    return [
        "--dataset",
        str(dataset),
        "--target-domains",
        DOMAINS[-1],
        "--backbone",
        "resnet18",
        "--no-pretrained",
        "--image-size",
        "64",
        "--batch-size",
        "32",
        "--steps",
        str(steps),
        "--eval-every",
        str(max(steps, 1)),
        "--log-with",
        "none",
        "--output-dir",
        str(output_dir),
        "--overwrite",
        *extra,
    ]


def child(argv: list[str]) -> None:
    """Run ``dgzoo train argv`` in this process; print the seconds since $DGZOO_BENCH_T0 after the first step (and,
    with ``--time-steps``, after the last one) and leave at once."""
    t0 = float(os.environ["DGZOO_BENCH_T0"])
    from dgzoo.cli import main
    from dgzoo.training import engine

    fit = engine.fit
    signature = inspect.signature(fit)

    def timed_fit(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        after = bound.arguments.get("after_step")
        steps = bound.arguments["steps"]

        def after_step(state, metrics):
            if state.step == 1 or state.step == steps:
                print(f"BENCH step {state.step} {time.time() - t0:.4f}", flush=True)
            if state.step == steps:
                os._exit(0)  # the measurement ends here: no evaluation, export or card
            if after is not None:
                after(state, metrics)

        bound.arguments["after_step"] = after_step
        return fit(*bound.args, **bound.kwargs)

    engine.fit = timed_fit
    sys.exit(main(["train", *argv]))


def launch(argv: list[str], env: dict[str, str], timeout: float = 900) -> dict[int, float]:
    """Start a child process running dgzoo train; return ``{step: seconds since launch}`` of its BENCH lines."""
    env = {**env, "DGZOO_BENCH_T0": repr(time.time())}
    done = subprocess.run(
        [sys.executable, __file__, "--child", *argv],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    marks = {
        int(p[2]): float(p[3])
        for p in (line.split() for line in done.stdout.splitlines())
        if len(p) == 4 and p[0] == "BENCH"
    }
    if not marks:
        raise RuntimeError(f"dgzoo train exited {done.returncode} without a step:\n{done.stderr[-3000:]}")
    return marks


def measure(sizes: list[int], rounds: int, work: Path, threads: int, image_px: int = 64) -> dict:
    """Cold then interleaved warm start-ups for every size."""
    env_base = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "TQDM_DISABLE": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH")])),
    }
    envs, datasets_ = {}, {}
    for n in sizes:
        datasets_[n] = make_dataset(work / f"data-{n}", n, image_px)
        cache = work / f"cache-{n}"
        shutil.rmtree(cache, ignore_errors=True)
        envs[n] = {**env_base, "HF_DATASETS_CACHE": str(cache / "hf"), "DGZOO_CACHE": str(cache / "dgzoo")}
    cold = {n: launch(train_arguments(datasets_[n], work / f"run-{n}", 1, []), envs[n])[1] for n in sizes}
    warm: dict[int, list[float]] = {n: [] for n in sizes}
    for _ in range(rounds):
        for n in sizes:
            warm[n].append(launch(train_arguments(datasets_[n], work / f"run-{n}", 1, []), envs[n])[1])
    smallest = min(sizes)
    return {
        "sizes": sizes,
        "rounds": rounds,
        "threads": threads,
        "cold": cold,
        "warm": warm,
        "warm_ratio": {n: [w / s for w, s in zip(warm[n], warm[smallest])] for n in sizes},
    }


def table(result: dict) -> str:
    """The scaling table, markdown."""
    smallest = min(result["sizes"])
    lines = [
        (
            f"| images | warm start-up, s (median) | warm / warm at {smallest} (median of rounds) | cold start-up, s | "
            "cold, ms per image | cold - warm, ms per image |"
        ),
        "|---|---|---|---|---|---|",
    ]
    for n in result["sizes"]:
        warm = statistics.median(result["warm"][n])
        lines.append(
            f"| {n} | {warm:.2f} ({', '.join(f'{w:.2f}' for w in result['warm'][n])}) | "
            f"{statistics.median(result['warm_ratio'][n]):.2f} | {result['cold'][n]:.2f} | "
            f"{1000 * result['cold'][n] / n:.3f} | {1000 * (result['cold'][n] - warm) / n:.3f} |"
        )
    return "\n".join(lines)


STAGES = ("load", "classes", "splits", "image check", "plan_run")


def profile_child(n: int, dataset: str, rounds: int) -> None:
    """In this process: the data stages of a warm start on ``dataset``, with the plan cache and without, interleaved;
    prints one JSON line ``{"cached": {stage: [s...]}, "computed": {...}}``."""
    import dgzoo.training.engine as engine
    from dgzoo.config import TrainConfig
    from dgzoo.data import check_images, load_dg_dataset, make_splits, plan_cache, resolve_protocol
    from dgzoo.training.datachecks import check_classes

    cfg = TrainConfig(  # the measured runs' recipe (train_arguments)
        dataset=dataset,
        target_domains=[DOMAINS[-1]],
        backbone="resnet18",
        pretrained=False,
        image_size=64,
        batch_size=32,
        steps=1,
        log_with="none",
        output_dir=os.environ["DGZOO_BENCH_RUN"],
        overwrite=True,
    )
    plans = plan_cache.plan_dir()
    aside = plans.with_name("plans-aside")
    times: dict[str, dict[str, list[float]]] = {m: {s: [] for s in STAGES} for m in ("cached", "computed")}
    engine.plan_run(cfg)  # the plan cache filled (the start-up runs before this one filled the rest)
    for _ in range(rounds):
        for mode in ("cached", "computed"):
            if mode == "computed":
                plans.rename(aside)
            try:
                remember = mode == "cached"
                marks = [time.perf_counter()]
                data = load_dg_dataset(dataset, remember=remember)
                marks.append(time.perf_counter())
                protocol = resolve_protocol(data, [DOMAINS[-1]], None)
                check_classes(data, protocol)
                marks.append(time.perf_counter())
                make_splits(data, cfg.holdout_fraction, cfg.resolved_split_seed(), list(data.domains), remember)
                marks.append(time.perf_counter())
                check_images(data, list(data.domains), remember)
                marks.append(time.perf_counter())
                engine.plan_run(cfg, remember_checks=remember)
                marks.append(time.perf_counter())
            finally:
                if mode == "computed":
                    aside.rename(plans)
            for stage, start, end in zip(STAGES, marks, marks[1:]):
                times[mode][stage].append(end - start)
    print("PROFILE " + json.dumps(times), flush=True)


def profile(sizes: list[int], rounds: int, work: Path, threads: int, image_px: int = 64) -> dict:
    """:func:`profile_child` for every size, each in its own process on the caches :func:`measure` warmed."""
    result = {}
    for n in sizes:
        cache = work / f"cache-{n}"
        env = {
            **os.environ,
            "OMP_NUM_THREADS": str(threads),
            "HF_DATASETS_OFFLINE": "1",
            "HF_HUB_OFFLINE": "1",
            "TQDM_DISABLE": "1",
            "HF_DATASETS_CACHE": str(cache / "hf"),
            "DGZOO_CACHE": str(cache / "dgzoo"),
            "DGZOO_BENCH_RUN": str(work / f"profile-run-{n}"),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH")])),
        }
        dataset = str(make_dataset(work / f"data-{n}", n, image_px))
        done = subprocess.run(
            [sys.executable, __file__, "--profile-child", str(n), dataset, str(rounds)],
            env=env,
            capture_output=True,
            text=True,
            timeout=1800,
            check=False,
        )
        lines = [line for line in done.stdout.splitlines() if line.startswith("PROFILE ")]
        if not lines:
            raise RuntimeError(f"the profile of {n} images exited {done.returncode}:\n{done.stderr[-3000:]}")
        result[n] = json.loads(lines[-1][len("PROFILE ") :])
    return result


def profile_table(result: dict) -> str:
    """The in-process profile, markdown: median seconds (ms) of each stage, with the plan cache and without."""
    lines = [
        "| images | plan cache | " + " | ".join(f"{s}, ms" for s in STAGES) + " |",
        "|---|---|" + "---|" * len(STAGES),
    ]
    for n, modes in result.items():
        for mode, stages in modes.items():
            cells = [f"{1000 * statistics.median(stages[s]):.1f}" for s in STAGES]
            lines.append(f"| {n} | {'read' if mode == 'cached' else 'none (computed)'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2:])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--profile-child":
        profile_child(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 50000])
    parser.add_argument("--rounds", type=int, default=3, help="warm runs per size, interleaved over sizes")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of the measured processes")
    parser.add_argument(
        "--work",
        type=Path,
        default=Path("/tmp/dgzoo-startup"),
        help="datasets, caches and run directories (outside the repository)",
    )
    parser.add_argument("--json", type=Path, help="also write the raw numbers here")
    parser.add_argument(
        "--image-px",
        type=int,
        default=64,
        help="side of the synthetic JPEGs (small ones make a DomainNet-sized table quick to write; use a --work of "
        "its own, a size's dataset is written once per folder)",
    )
    parser.add_argument("--profile", action="store_true", help="then profile the data stages in-process (see above)")
    parser.add_argument("--profile-only", action="store_true", help="only the profile (on caches warmed before)")
    args = parser.parse_args()
    sizes = sorted(args.sizes)
    result: dict = {"load_average": list(os.getloadavg())}
    if not args.profile_only:
        result.update(measure(sizes, args.rounds, args.work, args.threads, args.image_px))
        print(table(result))
    if args.profile or args.profile_only:
        result["profile"] = profile(sizes, args.rounds, args.work, args.threads, args.image_px)
        print()
        print(profile_table(result["profile"]))
    result["load_average_after"] = list(os.getloadavg())
    result["machine"] = f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}"
    print(f"\nload average before {result['load_average']}, after {result['load_average_after']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
