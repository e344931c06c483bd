"""The data benchmarks (start-up against dataset size; end to end against timm's train.py) run at a smoke size, so
neither rots. They time nothing here: only that each runs end to end and reports what its results file shows."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_script(*args: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=600, env=env, cwd=ROOT, check=False
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


def test_synthetic_dataset_loads_with_its_domains_and_classes(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from startup import DOMAINS, make_dataset
    finally:
        sys.path.pop(0)
    from dgzoo.data import load_dg_dataset

    data = load_dg_dataset(str(make_dataset(tmp_path / "d", 40)))
    assert data.domains == list(DOMAINS) and len(data.labels) == 40 and data.num_classes <= 10
    assert data.decode_image(0).size == (64, 64)


@pytest.mark.slow
def test_startup_benchmark_runs_at_a_smoke_size(tmp_path):
    out = run_script(
        "benchmarks/startup.py",
        "--sizes",
        "40",
        "--rounds",
        "1",
        "--work",
        str(tmp_path),
        "--json",
        str(tmp_path / "r.json"),
        "--profile",
    )
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["cold"]["40"] > 0 and len(result["warm"]["40"]) == 1 and result["warm_ratio"]["40"] == [1.0]
    assert out.splitlines()[2].startswith("| 40 | ")
    # the in-process profile, with the plan cache read back and without it, each stage timed
    assert set(result["profile"]["40"]) == {"cached", "computed"}
    assert all(len(v) == 1 and v[0] > 0 for v in result["profile"]["40"]["cached"].values())
    assert "| 40 | read |" in out and "| 40 | none (computed) |" in out


@pytest.mark.slow
def test_vs_timm_benchmark_runs_at_a_smoke_size(tmp_path):
    """timm's train.py is not part of timm's wheel: with $DGZOO_TIMM_TRAIN pointing at it both sides run, else
    dgzoo's side alone."""
    timm_train = os.environ.get("DGZOO_TIMM_TRAIN", str(tmp_path / "absent.py"))
    out = run_script(
        "benchmarks/vs_timm.py",
        "--timm-train",
        timm_train,
        "--steps",
        "3",
        "--batch-size",
        "4",
        "--pairs",
        "1",
        "--work",
        str(tmp_path),
        "--control-env",
        "DGZOO_KEEP_HOST_MEMORY=0",
    )
    lines = out.splitlines()
    header = [c.strip() for c in next(x for x in lines if x.startswith("| round |")).strip("|").split("|")]
    row = dict(zip(header, (c.strip() for c in next(x for x in lines if x.startswith("| 0 |")).strip("|").split("|"))))
    for name in ("dgzoo", "control"):  # each contender's images/s and time to the first step
        assert float(row[f"{name} images/s"]) > 0 and float(row[f"{name} first step, s"]) > 0
    assert "median ratios (dgzoo / control)" in out
    if Path(timm_train).exists():
        assert "median ratios (dgzoo / timm)" in out and "median ratios (control / timm)" in out
