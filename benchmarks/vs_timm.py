"""End to end against timm's own ``train.py``: images/s and time to the first step, same images, model, batch, steps.

Both read the same local parquet dataset (benchmarks/startup.py's synthetic 64 px JPEGs) through Hugging Face
``datasets`` (timm as ``--dataset hfds/PATH``), train ResNet-18 from scratch at 64 px on CPU with one compute
thread each, each with its own defaults otherwise (timm: 4 loader workers, its augmentation; dgzoo: its worker
default, DomainBed's augmentation). dgzoo trains ``B`` images per source domain on 3 source domains, so timm gets
a batch of ``3 B``; timm trains one epoch of a dataset sized to give the same number of steps.

Each run is a fresh process; the parent stamps every output line as it arrives. Time to the first step: launch to
the line that follows the first optimizer step (timm's ``Train: 0 [   0/...`` log line; dgzoo's ``BENCH step 1``).
Images/s: the images of steps 2..N over the time between the first and the last step's line. Runs alternate
(dgzoo, timm, dgzoo, timm, ...) and ratios are taken within each pair.

``--control-env KEY=VALUE`` adds a third contender to every round: dgzoo again, with those variables set (e.g.
``DGZOO_KEEP_HOST_MEMORY=0``, dgzoo without its host-memory setting), to tell what one of dgzoo's settings is worth
against timm and against dgzoo itself; each round then starts with the next contender in turn. ``--timm-env`` sets
variables for timm's runs (e.g. glibc's malloc settings, to give timm by hand what dgzoo sets itself).

timm's ``train.py`` is not in the pip wheel; fetch it from github.com/huggingface/pytorch-image-models into a
folder outside this repository and pass ``--timm-train PATH``. Without it only dgzoo's side runs.

    python benchmarks/vs_timm.py --timm-train /tmp/timm/train.py --steps 30 --pairs 3
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from startup import DOMAINS, make_dataset, train_arguments

SOURCES = len(DOMAINS) - 1


def stamped_run(command: list[str], env: dict[str, str], cwd: Path, timeout: float = 1800) -> list[tuple[float, str]]:
    """Run ``command``; return each output line (stdout and stderr merged) with its arrival time since launch."""
    start = time.time()
    process = subprocess.Popen(
        command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    lines = []
    assert process.stdout is not None
    for line in process.stdout:
        lines.append((time.time() - start, line.rstrip("\n")))
        if time.time() - start > timeout:
            process.kill()
            break
    process.wait()
    if process.returncode:
        raise RuntimeError(
            f"{' '.join(command[:3])} ... exited {process.returncode}:\n" + "\n".join(text for _, text in lines[-30:])
        )
    return lines


def dgzoo_run(
    dataset: Path, work: Path, steps: int, batch: int, env: dict[str, str], extra: tuple[str, ...] = ()
) -> dict[str, float]:
    args = train_arguments(dataset, work / "dgzoo-run", steps, list(extra))
    args[args.index("--batch-size") + 1] = str(batch)
    lines = stamped_run(
        [sys.executable, str(Path(__file__).with_name("startup.py")), "--child", *args],
        {**env, "DGZOO_BENCH_T0": repr(time.time())},
        work,
    )
    # the progress bar shares the merged output stream: a mark may follow a bar update on the same line
    marks = {int(text.split("BENCH step", 1)[1].split()[0]): t for t, text in lines if "BENCH step" in text}
    return {"first_step": marks[1], "images_per_second": (steps - 1) * batch * SOURCES / (marks[steps] - marks[1])}


def timm_run(
    timm_train: Path,
    dataset: Path,
    work: Path,
    steps: int,
    batch: int,
    env: dict[str, str],
    extra: tuple[str, ...] = (),
) -> dict:
    total = batch * SOURCES
    command = [
        sys.executable,
        str(timm_train),
        "--dataset",
        f"hfds/{dataset}",
        "--train-split",
        "train",
        "--val-split",
        "",
        "--model",
        "resnet18",
        "--num-classes",
        "10",
        "--img-size",
        "64",
        "--batch-size",
        str(total),
        "--epochs",
        "1",
        "--log-interval",
        "100000",
        "--output",
        str(work / "timm-out"),
        "--experiment",
        "bench",
        "--no-prefetcher",
        "--device",
        "cpu",
        *extra,
    ]
    lines = stamped_run(command, env, work)
    marks = [(t, text) for t, text in lines if "Train: 0 [" in text]
    if len(marks) < 2:
        raise RuntimeError("timm's train.py logged fewer than two steps:\n" + "\n".join(x for _, x in lines[-20:]))
    (first, _), (last, text) = marks[0], marks[-1]
    done = int(text.split("[", 1)[1].split("/")[0].strip())  # the index of the last update
    return {"first_step": first, "images_per_second": done * total / (last - first), "steps": done + 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timm-train", type=Path, help="timm's train.py (outside this repository)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=32, help="per source domain (timm: 3x this)")
    parser.add_argument("--pairs", type=int, default=3, help="dgzoo/timm pairs, alternated")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of both")
    parser.add_argument("--work", type=Path, default=Path("/tmp/dgzoo-vs-timm"))
    parser.add_argument(
        "--dgzoo-args", default="", help="extra `dgzoo train` flags, e.g. '--augment none' (the augmentation's share)"
    )
    parser.add_argument(
        "--control-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="add a dgzoo run with these variables to every round (repeatable), e.g. DGZOO_KEEP_HOST_MEMORY=0",
    )
    parser.add_argument("--timm-env", action="append", default=[], metavar="KEY=VALUE", help="variables of timm's runs")
    parser.add_argument(
        "--timm-args",
        default="",
        help="extra timm train.py flags, e.g. '--opt adam --lr 5e-5 --weight-decay 0' (dgzoo's ERM optimizer: the "
        "two then differ in the framework only, not in the optimizer's cost)",
    )
    args = parser.parse_args()

    # timm drops the last partial batch: one epoch of steps * 3B images is exactly `steps` steps
    n = args.steps * args.batch_size * SOURCES
    dataset = make_dataset(args.work / f"data-{n}", n)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(args.threads),
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "TQDM_DISABLE": "1",
        "HF_DATASETS_CACHE": str(args.work / "hf-cache"),
        "DGZOO_CACHE": str(args.work / "dg"),
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")])
        ),
    }
    have_timm = args.timm_train is not None and args.timm_train.exists()
    # one untimed run of each fills the caches both read (datasets' Arrow copy; dgzoo's image check)
    dgzoo_run(dataset, args.work, 2, args.batch_size, env)
    if have_timm:
        timm_run(args.timm_train, dataset, args.work, 2, args.batch_size, env)
    extra = tuple(args.dgzoo_args.split())
    timm_extra = tuple(args.timm_args.split())
    control_env, timm_env = assignments(args.control_env), assignments(args.timm_env)
    contenders = {"dgzoo": lambda: dgzoo_run(dataset, args.work, args.steps, args.batch_size, env, extra)}
    if control_env:
        contenders["control"] = lambda: dgzoo_run(
            dataset, args.work, args.steps, args.batch_size, {**env, **control_env}, extra
        )
    if have_timm:
        contenders["timm"] = lambda: timm_run(
            args.timm_train, dataset, args.work, args.steps, args.batch_size, {**env, **timm_env}, timm_extra
        )
    names = list(contenders)
    rows = []
    for i in range(args.pairs):
        order = names[i % len(names) :] + names[: i % len(names)] if control_env else names
        rows.append({name: contenders[name]() for name in order})
    print(
        f"machine: {platform.machine()} {os.cpu_count()} cores; resnet18 64 px, {args.steps} steps of "
        f"{args.batch_size * SOURCES} images, OMP_NUM_THREADS={args.threads}, {n} images"
        + (f", dgzoo flags: {args.dgzoo_args}" if extra else "")
        + (f", timm flags: {args.timm_args}" if timm_extra else "")
        + (f", control: dgzoo with {' '.join(args.control_env)}" if control_env else "")
        + (f", timm with {' '.join(args.timm_env)}" if timm_env else "")
    )
    columns = [f"{name} images/s" for name in names] + [f"{name} first step, s" for name in names]
    ratios = [("dgzoo", "timm"), ("control", "timm"), ("dgzoo", "control")]
    ratios = [(a, b) for a, b in ratios if a in names and b in names]
    columns += [f"{a}/{b} images/s" for a, b in ratios] + [f"{a}/{b} first step" for a, b in ratios]
    print("| round | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for i, row in enumerate(rows):
        cells = [f"{row[name]['images_per_second']:.1f}" for name in names]
        cells += [f"{row[name]['first_step']:.2f}" for name in names]
        cells += [f"{row[a]['images_per_second'] / row[b]['images_per_second']:.2f}" for a, b in ratios]
        cells += [f"{row[a]['first_step'] / row[b]['first_step']:.2f}" for a, b in ratios]
        print(f"| {i} | " + " | ".join(cells) + " |")
    for a, b in ratios:
        speed = statistics.median(r[a]["images_per_second"] / r[b]["images_per_second"] for r in rows)
        start = statistics.median(r[a]["first_step"] / r[b]["first_step"] for r in rows)
        print(f"median ratios ({a} / {b}): images/s {speed:.2f}, time to first step {start:.2f}")


def assignments(pairs: list[str]) -> dict[str, str]:
    """``KEY=VALUE`` arguments as a mapping (one line naming a malformed one)."""
    bad = [p for p in pairs if "=" not in p or not p.split("=", 1)[0]]
    if bad:
        raise SystemExit(f"vs_timm.py: error: expected KEY=VALUE, got {bad[0]!r}")
    return dict(p.split("=", 1) for p in pairs)


if __name__ == "__main__":
    main()
