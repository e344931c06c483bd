"""Sweeps that fill a GPU (``--runs-per-gpu N``): several runs share each device slot of ``local-gpus`` and each
Slurm job, every run still its own process. No GPU needed: the runs are stand-in processes that record the device
they were given and when they ran."""

import json
import pickle
import sys
import textwrap
from pathlib import Path

import pytest

from dgzoo.cli import main
from dgzoo.errors import DGZooError
from dgzoo.experiments.launchers import PackedRun, PackedSlurmTask, SlurmTask, map_runs, pack_slots, run_sweep
from dgzoo.experiments.sweep import SweepSpec, expand

TINY = dict(backbone="test_resnet", image_size=8, steps=2, eval_every=2, batch_size=8, log_with="none", num_workers=0)

PROBE = textwrap.dedent("""\
    # Stands for `dgzoo train`: records its process, device and time span; the run holding out 45 fails.
    import json, os, sys, time
    from pathlib import Path
    args = sys.argv[1:]
    out = Path(args[args.index("--output-dir") + 1])
    probe = out.parent / "probe" / (out.name + ".json")
    probe.parent.mkdir(exist_ok=True)
    start = time.time()
    time.sleep(1.0)
    probe.write_text(json.dumps({"device": os.environ.get("CUDA_VISIBLE_DEVICES"), "pid": os.getpid(),
                                 "start": start, "end": time.time()}))
    sys.exit(1 if "-45-" in out.name and os.environ.get("PROBE_FAIL_45") else 0)
""")


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


def spans(root: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (root / "probe").iterdir()}


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    """The largest number of ``(start, end)`` intervals overlapping at one instant."""
    events = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    level = peak = 0
    for _, change in events:
        level += change
        peak = max(peak, level)
    return peak


def test_pack_slots_repeats_each_device_slot():
    assert pack_slots([("0",), ("1",)], 3) == [("0",), ("0",), ("0",), ("1",), ("1",), ("1",)]
    assert pack_slots([("0", "1")], 2) == [("0", "1"), ("0", "1")]
    assert pack_slots([("0",)], 1) == [("0",)]


def test_local_gpus_runs_per_gpu_shares_every_device_by_n_runs_at_most(tmp_path):
    (tmp_path / "probe.py").write_text(PROBE)
    s = spec(tmp_path / "sw", n_trials=2)  # 6 runs, 2 GPUs x 2 runs each
    lines = []
    outcome = run_sweep(
        s,
        "local-gpus",
        launch_prefix=f"{sys.executable} {tmp_path / 'probe.py'}",
        gpus=["3", "5"],
        runs_per_gpu=2,
        log=lines.append,
        poll_s=0.05,
    )
    assert not outcome.failed and len(outcome.trained) == 6
    probes = spans(tmp_path / "sw")
    assert sorted(probes) == sorted(r.output_dir.name for r in expand(s))
    assert len({p["pid"] for p in probes.values()}) == 6  # each run its own process
    assert "local-gpus: 4 slot(s): GPU 3; GPU 3; GPU 5; GPU 5" in lines
    per_device = {d: [(p["start"], p["end"]) for p in probes.values() if p["device"] == d] for d in ("3", "5")}
    assert sorted(per_device) == ["3", "5"] and sum(len(v) for v in per_device.values()) == 6
    assert max(most_at_once(v) for v in per_device.values()) == 2  # two runs shared a GPU ...
    assert all(most_at_once(v) <= 2 for v in per_device.values())  # ... and never more


def test_runs_per_gpu_is_refused_where_runs_get_no_device(tmp_path, capsys):
    with pytest.raises(DGZooError, match="--runs-per-gpu must be a positive integer, got 0"):
        run_sweep(spec(tmp_path / "a"), "local-gpus", gpus=["0"], runs_per_gpu=0)
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(
        json.dumps(
            dict(
                datasets=["rotated-digits"],
                algorithms=["erm"],
                test_domains=["0"],
                n_trials=1,
                output_dir=str(tmp_path / "b"),
                train=TINY,
            )
        )
    )
    assert main(["sweep", str(spec_file), "--runs-per-gpu", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "dgzoo: error: --runs-per-gpu packs runs onto the GPUs of --launcher local-gpus or slurm, not "
        "local; use one of those, or drop --runs-per-gpu"
    ]
    assert not (tmp_path / "b").exists()  # refused before anything was written


def test_a_packed_slurm_task_trains_its_runs_side_by_side_each_in_its_own_process(tmp_path, monkeypatch):
    (tmp_path / "probe.py").write_text(PROBE)
    monkeypatch.setenv("PROBE_FAIL_45", "1")
    s = spec(tmp_path / "sw")
    runs = expand(s)
    task = PackedSlurmTask(SlurmTask("test", launch_prefix=f"{sys.executable} {tmp_path / 'probe.py'}"))
    task = pickle.loads(pickle.dumps(task))  # submitit pickles it to the node
    outcomes = task(runs)
    failed = [r.output_dir.name for r, o in zip(runs, outcomes) if o.startswith("failed: ")]
    assert [o for o in outcomes if not o.startswith("failed: ")] == ["trained", "trained"]
    assert len(failed) == 1 and "-45-" in failed[0]  # one run's failure does not stop the others
    probes = spans(tmp_path / "sw")
    assert len({p["pid"] for p in probes.values()}) == 3
    assert most_at_once([(p["start"], p["end"]) for p in probes.values()]) == 3  # concurrently, in one job


class FakeJob:
    def __init__(self, job_id, items):
        self.job_id, self.items, self.paths = job_id, items, None

    def done(self):
        return True

    def result(self):
        return ["trained" if i % 2 == 0 else "failed: boom" for i in range(len(self.items))]


class FakeExecutor:
    def __init__(self):
        self.submitted = []

    def map_array(self, fn, items):
        self.submitted.append((fn, items))
        return [FakeJob(f"7_{i}", item) for i, item in enumerate(items)]


def test_map_runs_groups_runs_per_gpu_into_one_array_task_each_and_reports_each_run():
    executor = FakeExecutor()
    runs = list("abcde")
    jobs = map_runs(executor, SlurmTask("p"), runs, 2)
    [(fn, groups)] = executor.submitted
    assert isinstance(fn, PackedSlurmTask) and groups == [["a", "b"], ["c", "d"], ["e"]]
    assert [j.job_id for j in jobs] == ["7_0", "7_0", "7_1", "7_1", "7_2"]
    assert all(isinstance(j, PackedRun) for j in jobs)
    assert jobs[0].result() == "trained"
    with pytest.raises(RuntimeError, match="^boom$"):
        jobs[1].result()
    executor = FakeExecutor()
    jobs = map_runs(executor, SlurmTask("p"), runs, 1)  # unpacked: one run per task, as before
    assert isinstance(executor.submitted[0][0], SlurmTask) and executor.submitted[0][1] == runs


def test_slurm_submits_one_array_task_per_n_runs_with_the_gpus_of_one_run(tmp_path, monkeypatch):
    pytest.importorskip("submitit")
    import os
    import re
    import stat

    from test_slurm_launcher import FAKES  # fake sinfo/sbatch/squeue answering as a cluster would

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in FAKES.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod((bin_dir / name).stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    (bin_dir / "sinfo.txt").write_text("gpu*|gpu:a100:2(S:0-1)\n")
    s = spec(tmp_path / "sw", n_trials=2)  # 6 runs, 4 per GPU: two array tasks
    outcome = run_sweep(s, "slurm", runs_per_gpu=4, log=lambda line: None)
    script = (bin_dir / "submitted.sh").read_text()
    assert re.search(r"#SBATCH --array=0-1\b", script)
    assert "#SBATCH --gpus-per-node=1" in script  # the GPUs of one run, shared by its task's runs
    assert sorted(outcome.jobs) == sorted(r.output_dir.name for r in expand(s))
    assert sorted(outcome.jobs.values()) == ["77_0"] * 4 + ["77_1"] * 2
    recorded = json.loads((tmp_path / "sw" / "slurm_jobs.json").read_text())["submissions"][-1]["jobs"]
    assert recorded == outcome.jobs  # --status and reruns see the job of every packed run
