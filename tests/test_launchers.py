"""Sweep launchers that leave one process: a pool over (fake) GPU slots, Slurm through submitit's local executor,
and the claims that keep concurrent invocations from training a run twice."""

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

import dgzoo.training.engine
from conftest import TINY_SWEEP_TRAIN
from dgzoo.cli import main
from dgzoo.errors import DGZooError
from dgzoo.experiments.launchers import device_slots, run_sweep, sweep_status
from dgzoo.experiments.report import report_dirs
from dgzoo.experiments.sweep import SweepSpec, expand, run_status, sweep_claim_dir
from dgzoo.run.claim import CLAIM_FILE

TINY = TINY_SWEEP_TRAIN
TESTS = Path(__file__).resolve().parent


def spec(root: Path, **values) -> SweepSpec:
    base = dict(
        datasets=["rotated-digits"],
        algorithms=["erm"],
        test_domains=["0", "45", "75"],
        n_trials=1,
        output_dir=str(root),
        train=dict(TINY),
    )
    base.update(values)
    return SweepSpec.from_dict(base)


def write_spec(path: Path, root: Path, **values) -> Path:
    base = dict(
        datasets=["rotated-digits"],
        algorithms=["erm"],
        test_domains=["0", "45", "75"],
        n_trials=1,
        output_dir=str(root),
        train=dict(TINY),
    )
    base.update(values)
    path.write_text(yaml.safe_dump(base))
    return path


@pytest.fixture
def live_process():
    """A live process other than this one, to stand for another sweep or training job."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield child
    child.kill()
    child.wait()


def hold(path: Path, pid: int) -> None:
    """Write the claim a live process ``pid`` on this host would hold on ``path``."""
    path.mkdir(parents=True, exist_ok=True)
    (path / CLAIM_FILE).write_text(
        json.dumps(
            {"pid": pid, "host": socket.gethostname(), "purpose": "dgzoo train erm", "started": "2026-01-01T00:00:00"}
        )
    )


# ---------------------------------------------------------------------- claims and retries (no training)


def test_a_run_held_by_a_live_process_is_skipped_as_running_elsewhere_not_failed(tmp_path, live_process):
    s = spec(tmp_path / "sw", test_domains=["75"])
    [run] = expand(s)
    hold(run.output_dir, live_process.pid)
    assert run_status(run) == "running"
    called, lines = [], []
    outcome = run_sweep(s, train_fn=called.append, log=lines.append)
    assert called == [] and outcome.failed == [] and [r.output_dir for r in outcome.elsewhere] == [run.output_dir]
    assert "1 runs: 0 done, 1 running elsewhere, 0 to resume" in lines[0]
    assert any(
        line.startswith(
            "[1/1] running elsewhere: rotated-digits erm held-out 75 hp0 trial0, held by dgzoo "
            f"train erm (pid {live_process.pid}"
        )
        for line in lines
    )
    # Another sweep invocation launching the run (its claim beside the run directory) counts the same.
    (run.output_dir / CLAIM_FILE).unlink()
    hold(sweep_claim_dir(run), live_process.pid)
    assert run_sweep(s, train_fn=called.append, log=lines.append).elsewhere and called == []
    # A dead holder holds nothing: its claim is stale and the run trains.
    live_process.kill()
    live_process.wait()
    assert run_sweep(s, train_fn=called.append, log=lines.append).trained and len(called) == 1


def test_a_failed_run_is_retried_at_most_max_retries_times(tmp_path):
    s = spec(tmp_path / "sw", test_domains=["75"])
    calls = []

    def fails_twice(cfg):
        calls.append(cfg.output_dir)
        if len(calls) <= 2:
            raise DGZooError("simulated failure")

    lines = []
    outcome = run_sweep(s, train_fn=fails_twice, max_retries=1, log=lines.append)
    assert len(calls) == 2 and len(outcome.failed) == 1 and not outcome.trained  # 1 try + 1 retry, both failed
    assert any("simulated failure; retrying (1/1)" in line for line in lines)
    calls.clear()
    outcome = run_sweep(s, train_fn=fails_twice, max_retries=2, log=lines.append)
    assert len(calls) == 3 and not outcome.failed and len(outcome.trained) == 1


def test_device_slots_and_missing_submitit(tmp_path, monkeypatch, capsys):
    assert device_slots(["0", "1", "2", "3", "4"], 2) == [("0", "1"), ("2", "3")]  # GPU 4 stays idle
    with pytest.raises(DGZooError, match="--gpus-per-run 3 needs at least that many GPUs; 2 visible"):
        device_slots(["0", "1"], 3)
    with pytest.raises(DGZooError, match="found no GPU"):
        device_slots([], 1)
    monkeypatch.setitem(sys.modules, "submitit", None)  # as if not installed
    spec_file = write_spec(tmp_path / "spec.yaml", tmp_path / "sw")
    assert main(["sweep", str(spec_file), "--launcher", "slurm"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["dgzoo: error: --launcher slurm needs submitit, which is not installed: pip install 'dgzoo[slurm]'"]
    assert not (tmp_path / "sw").exists()  # refused before anything is written


# ---------------------------------------------------------------------- local-gpus over fake device slots

PROBE = textwrap.dedent("""\
    # Stands for `dgzoo train` on a GPU: records the device it was given and when it ran; the 45 run fails once.
    import json, os, sys, time
    from pathlib import Path
    args = sys.argv[1:]
    out = Path(args[args.index("--output-dir") + 1])
    probe = out.parent / "probe" / (out.name + ".json")
    probe.parent.mkdir(exist_ok=True)
    start = time.time()
    time.sleep(1.5)
    spans = json.loads(probe.read_text()) if probe.exists() else []
    spans.append({"device": os.environ["CUDA_VISIBLE_DEVICES"], "start": start, "end": time.time()})
    probe.write_text(json.dumps(spans))
    print("trained", out)
    sys.exit(1 if "-45-" in out.name and len(spans) == 1 else 0)
""")


def test_local_gpus_pool_gives_each_run_its_own_device_runs_them_in_parallel_and_retries(tmp_path):
    (tmp_path / "probe.py").write_text(PROBE)
    s = spec(tmp_path / "sw", n_trials=2)  # 6 runs on 2 slots
    lines = []
    outcome = run_sweep(
        s,
        "local-gpus",
        launch_prefix=f"{sys.executable} {tmp_path / 'probe.py'}",
        gpus=["3", "5"],
        max_retries=1,
        log=lines.append,
        poll_s=0.05,
    )
    names = sorted(r.output_dir.name for r in expand(s))
    assert not outcome.failed and sorted(r.output_dir.name for r in outcome.trained) == names
    probes = {p.stem: json.loads(p.read_text()) for p in (tmp_path / "sw" / "probe").iterdir()}
    assert sorted(probes) == names
    assert {n: len(p) for n, p in probes.items() if len(p) > 1} == {  # each ran once; the failing ones twice
        n: 2 for n in names if "-45-" in n
    }
    started = [
        (line.split(" -> ")[1].split(" ")[0], line.split(" on GPU ")[1].split(" ")[0])
        for line in lines
        if line.startswith("start ")
    ]
    for name, spans in probes.items():  # the launcher's slot reached the run, attempt by attempt
        assert [p["device"] for p in spans] == [gpu for path, gpu in started if path == str(tmp_path / "sw" / name)]
    spans = sorted((p["start"], p["end"], p["device"]) for runs in probes.values() for p in runs)
    overlapping = [(a, b) for i, a in enumerate(spans) for b in spans[i + 1 :] if b[0] < a[1]]
    assert overlapping, "no two runs ran at the same time"
    assert all(a[2] != b[2] for a, b in overlapping)  # never two runs on one slot at once
    assert {p[2] for p in spans} == {"3", "5"}
    assert sum("retrying (1/1)" in line for line in lines) == 2
    assert lines[-3] == "progress: 6 done, 0 running, 0 failed, 0 queued (of 6)"
    log = (tmp_path / "sw" / "launch_logs" / f"{names[0]}.log").read_text().splitlines()
    assert log[0].startswith("# ") and "CUDA_VISIBLE_DEVICES=" in log[0] and log[1].startswith("trained ")


def test_pool_commands_train_the_planned_run():
    from dgzoo.cli import build_parser
    from dgzoo.config import config_from_args
    from dgzoo.experiments.launchers import pool_prefix
    from dgzoo.experiments.sweep import train_command

    [run] = expand(spec(Path("sw"), test_domains=["75"]))
    words = shlex.split(train_command(run.config, pool_prefix(1, 0)))
    assert words[:4] == [sys.executable, "-m", "dgzoo.cli", "train"]
    assert config_from_args(build_parser().parse_args(words[3:])).to_dict() == run.config.to_dict()
    assert shlex.split(pool_prefix(4, 2))[1:] == [
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "4",
        "--main_process_port",
        "29502",
        "-m",
        "dgzoo.cli",
        "train",
    ]


# ---------------------------------------------------------------------- two invocations at once


@pytest.mark.slow
def test_two_concurrent_sweeps_of_one_spec_never_train_a_run_twice(tmp_path):
    spec_file = write_spec(tmp_path / "spec.yaml", tmp_path / "sw")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "dgzoo.cli", "sweep", str(spec_file)]
    procs = [
        subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    runs = expand(SweepSpec.from_yaml(spec_file))
    launched = [
        line.rsplit(" -> ", 1)[1]
        for out in outputs
        for line in out.splitlines()
        if line.startswith("[") and " -> " in line
    ]
    assert sorted(launched) == sorted(str(r.output_dir) for r in runs)  # each run launched by exactly one of them
    for run in runs:
        assert run_status(run) == "done"
        starts = [line for line in (run.output_dir / "train.log").read_text().splitlines() if " | sources " in line]
        assert len(starts) == 1  # trained once, never restarted by the other invocation
    assert "failed" not in "".join(outputs)


# ---------------------------------------------------------------------- Slurm through submitit's local executor

VICTIM = "rotated-digits-erm-45-hp0-trial0"


def train_killed_once(cfg):
    """The engine's train, except the victim run's first attempt dies by SIGKILL right after its first checkpoint,
    as a job killed by a node failure would."""
    out = Path(cfg.output_dir)
    marker = out.parent / "victim-killed"
    if out.name == VICTIM and not marker.exists():
        marker.write_text("")
        save = dgzoo.training.engine._save_checkpoint

        def save_then_die(accelerator, run_dir, step, keep, *more):
            save(accelerator, run_dir, step, keep, *more)
            if step == 1:
                os.kill(os.getpid(), signal.SIGKILL)

        dgzoo.training.engine._save_checkpoint = save_then_die
    return dgzoo.training.engine.train(cfg)


def _tables(report):
    return [(t.method, t.dataset, t.columns, t.rows) for t in report.tables]


@pytest.mark.slow
def test_slurm_launcher_end_to_end_on_the_local_executor(tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    import torch

    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the jobs compute as the sequential run in this process does
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        s = spec(
            tmp_path / "slurm",
            test_domains=["45", "75"],
            train={**TINY, "steps": 3},
            slurm={"time": 10, "gpus": 0, "cpus": 1},
        )
        lines = []
        first = run_sweep(s, "slurm", cluster="local", train_fn=train_killed_once, log=lines.append, poll_s=0.5)
        assert [r.output_dir.name for r, _ in first.failed] == [VICTIM]
        assert sorted(r.output_dir.name for r in first.trained) == sorted(
            r.output_dir.name for r in expand(s) if r.output_dir.name != VICTIM
        )
        assert any(line.startswith("slurm: submitted 2 run(s) as job array") for line in lines)
        statuses = {r.output_dir.name: run_status(r) for r in expand(s)}
        assert statuses[VICTIM] == "resume" and list(statuses.values()).count("done") == 1
        status_lines = []
        sweep_status(s, log=status_lines.append)
        assert status_lines[0].endswith("2 runs: 1 done, 1 to resume, 0 to restart, 0 to start")
        assert status_lines[1] == "jobs: 1 COMPLETED, 1 INTERRUPTED"  # the killed job left no result
        assert status_lines[2].startswith("resume   job ") and " INTERRUPTED " in status_lines[2]  # held-out 45
        assert status_lines[3].startswith("done     job ") and " COMPLETED " in status_lines[3]

        rerun = run_sweep(s, "slurm", cluster="local", train_fn=train_killed_once, log=lines.append, poll_s=0.5)
        assert [r.output_dir.name for r in rerun.trained] == [VICTIM] and not rerun.failed
        victim = tmp_path / "slurm" / VICTIM
        assert "resumed from" in (victim / "train.log").read_text()
        assert json.loads((victim / "results.json").read_text())["steps"] == 3

        sequential = spec(tmp_path / "local", test_domains=["45", "75"], train={**TINY, "steps": 3})
        assert not run_sweep(sequential, log=lambda line: None).failed
    finally:
        torch.set_num_threads(threads)
    assert _tables(report_dirs([tmp_path / "slurm"])) == _tables(report_dirs([tmp_path / "local"]))
    assert run_sweep(s, "slurm", cluster="local", log=lines.append).jobs == {}  # a third call submits nothing
