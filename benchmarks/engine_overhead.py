"""Step time of this tree's engine against another dgzoo tree (e.g. a git worktree of the previous release).

Both trees train the same recipe through their own ``train`` in fresh processes, alternating A, B, A, B so that
drift in the machine's load affects both alike; each run reports ``timing.train_seconds / steps`` (training only,
evaluation excluded). The ratio new / old per algorithm is the number that matters: 1.0 is no slowdown.

    git worktree add /tmp/dgzoo-prev <previous commit>
    OMP_NUM_THREADS=1 python benchmarks/engine_overhead.py --baseline /tmp/dgzoo-prev --repeats 3
    python benchmarks/engine_overhead.py --smoke    # this tree against itself, tiny: checks the script runs

The tiny ``test_resnet`` is the default backbone on purpose: its steps are short, so per-step overhead in the
engine (Python, hooks, the DDP-style forward dispatch) is the largest share of a step it can ever be.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from smoke import add_smoke, apply_smoke

HERE = Path(__file__).resolve().parent.parent
CASES = {
    "erm": {},
    "equilibrium": {},
    "erm+gga": {"gga.start": 10, "gga.end": 29, "gga.candidates": 4},
}
RUN = """
import json, sys
from dgzoo.config import TrainConfig
try:  # a tree from before the layered package (tried first: an editable install may map dgzoo.training)
    from dgzoo.engine import train
except ImportError:
    from dgzoo.training.engine import train
cfg = TrainConfig.from_dict(json.loads(sys.argv[1]))
res = train(cfg)
print("RESULT", json.dumps({"step_seconds": res["timing"]["train_seconds"] / res["steps"]}))
"""


def step_seconds(tree: Path, values: dict) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(
        [sys.executable, "-c", RUN, json.dumps(values)], capture_output=True, text=True, env=env, cwd=tree
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"run in {tree} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])["step_seconds"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", type=Path, help="the other dgzoo tree (its repository root); required")
    parser.add_argument("--backbone", default="test_resnet")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--algorithms", nargs="+", default=list(CASES))
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    add_smoke(parser)
    args = apply_smoke(parser.parse_args(), baseline=HERE, steps=2, repeats=1, algorithms=["erm"], json=None)
    if args.baseline is None:
        parser.error("--baseline DIR is required (a dgzoo tree to compare with, e.g. a git worktree)")
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        for algorithm in args.algorithms:
            times: dict[str, list[float]] = {"baseline": [], "current": []}
            for r in range(args.repeats):
                for label, tree in (("baseline", args.baseline.resolve()), ("current", HERE)):
                    values = {
                        "algorithm": algorithm,
                        "hparams": CASES.get(algorithm, {}),
                        "backbone": args.backbone,
                        "steps": args.steps,
                        "eval_every": args.steps,
                        "log_with": "none",
                        "seed": r,
                        "output_dir": f"{tmp}/{algorithm}-{label}-{r}",
                    }
                    times[label].append(step_seconds(tree, values))
            old, new = statistics.median(times["baseline"]), statistics.median(times["current"])
            report[algorithm] = {
                "baseline_ms": 1e3 * old,
                "current_ms": 1e3 * new,
                "ratio": new / old,
                "runs": {k: [round(1e3 * t, 2) for t in v] for k, v in times.items()},
            }
            print(
                f"{algorithm:12s} previous {1e3 * old:8.1f} ms/step  new {1e3 * new:8.1f} ms/step  "
                f"new/previous {new / old:.3f}",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
