"""benchmarks/loader.py (the training loader against a bare decode + augment loop) runs at a smoke size, so it does
not rot. It times nothing here: only that every contender runs and the table and JSON report them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # a benchmark smoke (about 7 s of CPU): with the others, under -m slow
def test_loader_benchmark_runs_at_a_smoke_size(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "benchmarks/loader.py",
            "--smoke",
            "--work",
            str(tmp_path),
            "--json",
            str(tmp_path / "r.json"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "r.json").read_text())
    (only,) = result["rounds"]
    assert set(only) == {"bare", "inline", "workers", "v2"} and all(v > 0 for v in only.values())
    assert result["inline_over_bare"] == only["inline"] / only["bare"]
    assert any(line.startswith("| 0 | ") for line in done.stdout.splitlines())
