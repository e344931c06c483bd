"""Every benchmark script runs end to end at its ``--smoke`` size, so none rots unnoticed (gga_cost.py once crashed
for months after an API change). The numbers a smoke run prints mean nothing; what is checked is that the script
runs and prints its table."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
HELPERS = {"smoke.py", "device_suite.py"}  # imported by the scripts, or run by device_suite.sh

# script -> (extra arguments, text its output must contain)
SCRIPTS = {
    "composition_table.py": ([], "Per-step training cost"),
    "engine_overhead.py": ([], "new/previous"),
    "equilibrium_accuracy.py": ([], "source 0°"),
    "gga_accuracy.py": ([], "Held-out accuracy (%)"),
    "gga_cost.py": ([], "Whole run on rotated-digits"),
    "gradient_step.py": ([], "| pcgrad |"),
    "iu_accuracy.py": ([], "| variant |"),
    "iu_call_cost.py": ([], "| variant |"),
    "iu_cost.py": ([], "fast vs faithful-head"),
    "modern_cost.py": ([], "| erm+gga |"),
    "seed_methods.py": ([], "standard error"),
    "sure.py": ([], "--forget class=3"),
    "throughput.py": ([], "pipeline_over_compute"),
    "weights_identity.py": (["{tmp}/weights.json"], ""),
    "device_suite.sh": ([], "## Sweep throughput on one GPU"),
}
# Scripts whose --smoke run another test file already makes (not run twice): script -> that file.
ELSEWHERE = {
    "loader.py": "test_benchmarks_loader.py",
    "soups.py": "test_soup.py",
    "startup.py": "test_benchmarks_data.py",
    "vs_timm.py": "test_benchmarks_data.py",
}
SLOW = set(SCRIPTS)  # each smoke run trains or times real steps (7-55 s): all run in .ci/run with -m slow


def test_every_benchmark_script_has_a_smoke_run():
    scripts = {p.name for p in BENCHMARKS.iterdir() if p.suffix in (".py", ".sh")} - HELPERS
    assert scripts == set(SCRIPTS) | set(ELSEWHERE)
    for script, test_file in ELSEWHERE.items():
        text = (Path(__file__).parent / test_file).read_text()
        # that file runs the script (at --smoke, or at explicit small sizes)
        assert f'"{script}"' in text or f'"benchmarks/{script}"' in text


@pytest.mark.parametrize("script", [pytest.param(s, marks=pytest.mark.slow) if s in SLOW else s for s in SCRIPTS])
def test_benchmark_runs_at_its_smoke_size(script, tmp_path):
    extra, expected = SCRIPTS[script]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    command = [str(BENCHMARKS / script)] if script.endswith(".sh") else [sys.executable, str(BENCHMARKS / script)]
    command += ["--smoke", *(a.format(tmp=tmp_path) for a in extra)]
    proc = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    assert expected in output, output[-3000:]
    assert "--smoke" in output  # it says its numbers are a smoke run's
    if script == "weights_identity.py":
        assert sorted(json.loads((tmp_path / "weights.json").read_text())) == ["default", "erm+gga"]
    if script == "device_suite.sh":
        assert "timm-style loop" in output and "| fp32 |" in output and "gga_candidate / ERM step" in output
    assert not any(tmp_path.glob("benchmark_runs")) and not any(tmp_path.glob("runs"))  # writes only to temp
