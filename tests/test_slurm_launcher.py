"""The Slurm launcher against fake Slurm commands (sinfo, sbatch, sacct, squeue on PATH answer as a cluster would):
GPUs from the partition, sbatch refusals in one line, states without accounting, the time limit against the
warning signal, the requeue limit, and the failure reasons of --status and --wait. The real cluster is
tests/test_slurm_cluster.py."""

import inspect
import json
import os
import stat
from pathlib import Path

import pytest
import yaml

from conftest import TINY_SWEEP_TRAIN
from dgzoo.cli import main
from dgzoo.errors import DGZooError
from dgzoo.experiments import launchers
from dgzoo.experiments.launchers import SlurmTask, run_sweep, sweep_status
from dgzoo.experiments.slurm import DEFAULT_MAX_REQUEUES, FAILURE_FILE, gres_gpus, sbatch_refusal
from dgzoo.experiments.sweep import SweepSpec, expand
from dgzoo.training.engine import train

submitit = pytest.importorskip("submitit")

TINY = TINY_SWEEP_TRAIN
TESTS = Path(__file__).resolve().parent
FAKES = {
    # each answers from a file beside it (absent: the command fails the way it does when the controller is down)
    # sinfo --Node (one line per node: CPUs, memory) answers from sinfo_nodes.txt, squeue asked for pending
    # reasons (%r) from squeue_pending.txt
    "sinfo": 'f="$(dirname "$0")/sinfo.txt"; case "$*" in *--Node*) f="$(dirname "$0")/sinfo_nodes.txt";; esac; '
    '[ -f "$f" ] || { echo "sinfo: error: no controller" >&2; exit 1; }; cat "$f"',
    "sbatch": 'd="$(dirname "$0")"; cp "$1" "$d/submitted.sh"; '
    'if [ -f "$d/sbatch_error.txt" ]; then cat "$d/sbatch_error.txt" >&2; exit 1; fi; '
    'echo "Submitted batch job 77"',
    "sacct": 'echo "Slurm accounting storage is disabled"',  # no accounting: sacct lists nothing
    "squeue": 'f="$(dirname "$0")/squeue.txt"; case "$*" in *%r*) f="$(dirname "$0")/squeue_pending.txt";; esac; '
    '[ -f "$f" ] || { echo "slurm_load_jobs error: Unable to contact '
    'slurm controller (connect failure)" >&2; exit 1; }; cat "$f"',
    "srun": "exit 0",
    "scancel": "exit 0",
}


@pytest.fixture
def fake_slurm(tmp_path, monkeypatch):
    """A bin folder of fake Slurm commands, first on PATH; write sinfo.txt / squeue.txt / sbatch_error.txt there."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in FAKES.items():
        path = bin_dir / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return bin_dir


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


def write_spec(tmp_path: Path, **values) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(
        yaml.safe_dump(
            dict(
                datasets=["rotated-digits"],
                algorithms=["erm"],
                test_domains=["75"],
                n_trials=1,
                output_dir=str(tmp_path / "sw"),
                train=dict(TINY),
                **values,
            )
        )
    )
    return path


def record_jobs(root: Path, jobs: dict[str, str]) -> None:
    """slurm_jobs.json as a submission of ``jobs`` (run name -> job id) left it."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "slurm_jobs.json").write_text(
        json.dumps(
            {
                "submissions": [
                    {
                        "submitted": "2026-01-01T00:00:00+00:00",
                        "cluster": "slurm",
                        "folder": str(root / "slurm"),
                        "jobs": jobs,
                    }
                ]
            }
        )
    )


# ---------------------------------------------------------------------- GPUs, refusals, time limit


def test_gres_fields_count_gpus():
    assert gres_gpus("(null)") == 0
    assert gres_gpus("gpu:4") == 4
    assert gres_gpus("gpu:a100:2(S:0-1),shard:8") == 2
    assert gres_gpus("mps:100") == 0


def test_gpus_default_to_the_partition(fake_slurm, tmp_path):
    (fake_slurm / "sinfo.txt").write_text("cpu*|(null)\ngpu|gpu:a100:2(S:0-1)\n")
    lines = []
    run_sweep(spec(tmp_path / "a", test_domains=["75"]), "slurm", log=lines.append)
    assert "#SBATCH --gpus-per-node=1" not in (fake_slurm / "submitted.sh").read_text()  # CPU partition: none
    assert any("partition cpu has no GPUs" in line for line in lines)
    run_sweep(spec(tmp_path / "b", test_domains=["75"]), "slurm", slurm={"partition": "gpu"}, log=lines.append)
    assert "#SBATCH --gpus-per-node=1" in (fake_slurm / "submitted.sh").read_text()
    with pytest.raises(
        DGZooError,
        match=r"^--gpus-per-run 4: the nodes of partition gpu have at most 2 GPU\(s\); "
        r"pass --gpus-per-run 2",
    ):
        run_sweep(spec(tmp_path / "c"), "slurm", slurm={"partition": "gpu"}, gpus_per_run=4)
    with pytest.raises(
        DGZooError,
        match=r"^--slurm-partition gpus: no such partition on this cluster \(sinfo lists "
        r"cpu, gpu\)",
    ):
        run_sweep(spec(tmp_path / "d"), "slurm", slurm={"partition": "gpus"})
    assert not (tmp_path / "c").exists() and not (tmp_path / "d").exists()  # refused before anything is written


@pytest.mark.parametrize(
    "said, flag",
    [
        ("sbatch: error: Invalid generic resource (gres) specification", "--slurm-gpus"),
        (
            "sbatch: error: invalid partition specified: big\nsbatch: error: Batch job submission failed: Invalid "
            "partition name specified",
            "--slurm-partition",
        ),
        (
            "sbatch: error: Batch job submission failed: Invalid account or account/partition combination specified",
            "--slurm-account",
        ),
        (
            "sbatch: error: Batch job submission failed: Requested time limit is invalid (missing or exceeds some limit)",
            "--slurm-time",
        ),
        ("sbatch: error: Memory specification can not be satisfied", "--slurm-mem"),
        (
            "sbatch: error: CPU count per node can not be satisfied\nsbatch: error: Batch job submission failed: "
            "Requested node configuration is not available",
            "--slurm-cpus",
        ),
    ],
)
def test_every_sbatch_refusal_is_one_line_naming_the_flag(fake_slurm, tmp_path, capsys, said, flag):
    (fake_slurm / "sbatch_error.txt").write_text(said + "\n")
    assert main(["sweep", str(write_spec(tmp_path)), "--launcher", "slurm", "--slurm-gpus", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dgzoo: error: sbatch refused the job array: ") and flag in err[0]
    assert said.splitlines()[-1].split("error: ")[-1] in err[0]  # sbatch's own words


def test_an_unknown_refusal_still_names_the_flags():
    line = sbatch_refusal("sbatch: error: Something new went wrong")
    assert line == (
        "sbatch refused the job array: Something new went wrong; change the --slurm-* flags (partition, "
        "gpus, cpus, mem, time, account)"
    )


@pytest.mark.parametrize("minutes", [1, 2, 3])
def test_a_time_limit_shorter_than_the_warning_signal_allows_is_refused(fake_slurm, tmp_path, capsys, minutes):
    assert main(["sweep", str(write_spec(tmp_path)), "--launcher", "slurm", "--slurm-time", str(minutes)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"dgzoo: error: --slurm-time {minutes} is too short: Slurm signals a job 90 s before its limit so that it can "
        f"checkpoint and requeue, which leaves {minutes * 60 - 90} s to start and train; pass --slurm-time 4 or more"
    )
    assert not (tmp_path / "sw").exists()
    assert main(["sweep", str(write_spec(tmp_path)), "--launcher", "slurm", "--slurm-time", "4"]) == 0


def test_the_requeue_limit_is_submitits_and_a_flag(fake_slurm, tmp_path):
    default = inspect.signature(submitit.SlurmExecutor.__init__).parameters["max_num_timeout"].default
    assert default == DEFAULT_MAX_REQUEUES == 3  # what docs/sweeps.md says
    assert launchers.slurm._executor(tmp_path, {}, "slurm", 1)._executor.max_num_timeout == 3
    assert launchers.slurm._executor(tmp_path, {"max_requeues": 10}, "slurm", 1)._executor.max_num_timeout == 10
    assert main(["sweep", str(write_spec(tmp_path)), "--launcher", "slurm", "--slurm-max-requeues", "0"]) == 0
    with pytest.raises(DGZooError, match=r"max_requeues in the slurm flags .* must be an integer >= 0, got -1"):
        run_sweep(spec(tmp_path / "x"), "slurm", slurm={"max_requeues": -1})


# ---------------------------------------------------------------------- states without accounting


def test_without_accounting_queued_jobs_are_found_through_squeue_and_never_resubmitted(fake_slurm, tmp_path):
    s = spec(tmp_path / "sw")
    names = [r.output_dir.name for r in expand(s)]
    record_jobs(tmp_path / "sw", {names[0]: "55_0", names[1]: "55_1", names[2]: "55_2"})
    (fake_slurm / "squeue.txt").write_text("55_0|PENDING\n55_1|RUNNING\n")  # 55_2 has left the queue
    lines = []
    outcome = run_sweep(s, "slurm", slurm={"gpus": 0}, log=lines.append)
    assert sorted(r.output_dir.name for r in outcome.elsewhere) == names[:2]
    assert list(outcome.jobs) == [names[2]]  # only the run whose job ended is submitted again
    assert sum("from squeue" in line for line in lines) == 1

    record_jobs(tmp_path / "sw", {names[0]: "55_0", names[1]: "55_1", names[2]: "55_2"})
    (fake_slurm / "squeue.txt").unlink()  # the controller does not answer: states unknown, possibly queued
    lines = []
    outcome = run_sweep(s, "slurm", slurm={"gpus": 0}, log=lines.append)
    assert outcome.jobs == {} and len(outcome.elsewhere) == 3
    assert sum("possibly queued" in line for line in lines) == 3
    status = []
    sweep_status(s, log=status.append)
    assert status[1] == "jobs: 3 UNKNOWN"
    assert status[2].startswith(
        "3 job state(s) UNKNOWN: sacct has no record of them (this cluster keeps no "
        "accounting, or not yet) and squeue did not answer (slurm_load_jobs error: Unable "
        "to contact slurm controller (connect failure)); they may still be queued, so a rerun "
        "does not submit them again"
    )
    assert len(status) == 3 + 3  # one note for all jobs, then one line per run


# ---------------------------------------------------------------------- why a run failed


def test_a_failed_task_writes_its_reason_and_status_prints_it(fake_slurm, tmp_path, monkeypatch):
    s = spec(tmp_path / "sw", test_domains=["75"])
    [run] = expand(s)
    monkeypatch.setenv("SLURM_JOB_ID", "55")

    def broken(cfg):
        raise DGZooError("--dataset rotated-digits: the cache is unreadable; delete it and run again")

    with pytest.raises(DGZooError):
        SlurmTask("test", train_fn=broken)(run)
    assert (run.output_dir / FAILURE_FILE).read_text() == (
        "job 55: --dataset rotated-digits: the cache is unreadable; delete it and run again\n"
    )
    record_jobs(tmp_path / "sw", {run.output_dir.name: "55_0"})
    (fake_slurm / "squeue.txt").write_text("55_0|FAILED\n")
    status = []
    sweep_status(s, log=status.append)
    assert status[-1] == (
        "         failed: job 55: --dataset rotated-digits: the cache is unreadable; delete it and run again"
    )

    (fake_slurm / "squeue.txt").write_text("55_0|TIMEOUT\n")
    (run.output_dir / FAILURE_FILE).unlink()  # killed before it could write anything: the log says the rest
    status = []
    sweep_status(s, log=status.append)
    assert status[-1].startswith("         failed: job 55_0 TIMEOUT before the run could say why; log: ")

    assert SlurmTask("test", train_fn=lambda cfg: None)(run) == "trained"
    assert not (run.output_dir / FAILURE_FILE).exists()  # a success clears the old reason


def failing_train(cfg):
    """Module-level, so that submitit's local job can unpickle it."""
    raise DGZooError("--lr 0.1 diverged at step 1; lower --lr")


@pytest.mark.slow
def test_wait_prints_the_reason_the_failed_run_wrote(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    s = spec(tmp_path / "sw", test_domains=["75"], slurm={"time": 10, "gpus": 0, "cpus": 1})
    lines = []
    outcome = run_sweep(s, "slurm", cluster="local", train_fn=failing_train, log=lines.append, poll_s=0.2)
    [(run, reason)] = outcome.failed
    assert reason.endswith(": --lr 0.1 diverged at step 1; lower --lr") and reason.startswith("job ")
    assert any(
        line.startswith(f"run failed: {run.describe()}: job ") and "--lr 0.1 diverged" in line and "; log: " in line
        for line in lines
    )


def test_a_slurm_task_retry_reads_the_status_again_and_skips_a_run_finished_meanwhile(tmp_path, monkeypatch):
    s = spec(tmp_path / "sw", test_domains=["75"])
    [run] = expand(s)
    monkeypatch.setenv("SLURM_JOB_ID", "56")
    calls: list[int] = []

    def finishes_then_fails(cfg):
        calls.append(1)
        if len(calls) == 1:
            train(cfg)  # the run is written to the end, then the node fails before the task can report it
            raise RuntimeError("node lost after the run finished")
        raise AssertionError("a finished run was trained again")

    assert SlurmTask("test", max_retries=2, train_fn=finishes_then_fails)(run) == "done"
    assert len(calls) == 1
    assert not (run.output_dir / FAILURE_FILE).exists()


# ---------------------------------------------------------------------- requests no node can run

NODES = "debug*|(null)|2|3800\ndebug*|(null)|2|3800\ngpu|gpu:a100:2(S:0-1)|16|64000\ngpu|(null)|32|2000\n"


@pytest.mark.parametrize(
    "flags, line",
    [
        (
            ["--slurm-cpus", "64"],
            "--slurm-cpus 64: the largest node of partition debug has 2 CPUs; ask for at most 2",
        ),
        (
            ["--slurm-mem", "8"],
            "--slurm-mem 8: the largest node of partition debug has 3 GB of memory; ask for at most 3",
        ),
        (
            ["--slurm-gpus", "1"],
            "--slurm-gpus 1: the largest node of partition debug has 0 GPUs; pass --slurm-gpus 0 or a GPU "
            "--slurm-partition",
        ),
        (
            ["--slurm-partition", "gpu", "--slurm-gpus", "4"],
            "--slurm-gpus 4: the largest node of partition gpu has 2 GPUs; ask for at most 2",
        ),
        (  # each fits a node of gpu, never one node: 32 CPUs are on the node without GPUs
            ["--slurm-partition", "gpu", "--slurm-gpus", "1", "--slurm-cpus", "32"],
            "--slurm-cpus 32 --slurm-gpus 1: no node of partition gpu has all of it at once (one has 32 CPUs, "
            "1 GB, 0 GPUs); ask for at most that",
        ),
        (
            ["--slurm-cpus", "4", "--runs-per-gpu", "2"],
            "--slurm-cpus 4 (per job: its 2 runs, --runs-per-gpu 2, share it): the largest node of partition debug "
            "has 2 CPUs; ask for at most 2",
        ),
    ],
)
def test_a_request_no_node_has_is_refused_before_submission(fake_slurm, tmp_path, capsys, flags, line):
    (fake_slurm / "sinfo.txt").write_text("debug*|(null)\ngpu|gpu:a100:2(S:0-1)\n")
    (fake_slurm / "sinfo_nodes.txt").write_text(NODES)
    assert main(["sweep", str(write_spec(tmp_path)), "--launcher", "slurm", *flags]) == 2
    assert capsys.readouterr().err.strip() == f"dgzoo: error: {line}"
    assert not (fake_slurm / "submitted.sh").exists() and not (tmp_path / "sw").exists()


def test_a_request_that_fits_or_that_sinfo_cannot_judge_is_submitted(fake_slurm, tmp_path):
    (fake_slurm / "sinfo.txt").write_text("debug*|(null)\ngpu|gpu:a100:2(S:0-1)\n")
    (fake_slurm / "sinfo_nodes.txt").write_text(NODES)
    fits = {"partition": "gpu", "gpus": 2, "cpus": 16, "mem": 62}
    assert run_sweep(spec(tmp_path / "a", test_domains=["75"]), "slurm", slurm=fits).jobs
    (fake_slurm / "sinfo_nodes.txt").unlink()  # sinfo does not answer: submitted as before, sbatch judges
    assert run_sweep(spec(tmp_path / "b", test_domains=["75"]), "slurm", slurm={"cpus": 64, "gpus": 0}).jobs


def test_status_and_wait_name_a_pending_job_that_can_never_start(fake_slurm, tmp_path, monkeypatch):
    s = spec(tmp_path / "sw")
    names = [r.output_dir.name for r in expand(s)]
    record_jobs(tmp_path / "sw", {names[0]: "55_0", names[1]: "55_1", names[2]: "55_2"})
    (fake_slurm / "sinfo_nodes.txt").write_text(NODES)
    (fake_slurm / "squeue.txt").write_text("55_0|PENDING\n55_1|PENDING\n55_2|PENDING\n")
    (fake_slurm / "squeue_pending.txt").write_text(
        "55_0|debug|64|1G|N/A|Resources\n"  # more CPUs than any node: never
        "55_1|debug|2|1G|N/A|Resources\n"  # fits a busy node: waits, as a queue does
        "55_2|debug|2|0|gres:gpu:1|ReqNodeNotAvail, UnavailableNodes:n[1-2]\n"  # a GPU on a partition without
    )
    status: list[str] = []
    sweep_status(s, log=status.append)
    stuck = [line.strip() for line in status if line.strip().startswith("stuck: ")]
    assert stuck == [
        "stuck: job 55_0 PENDING (Resources) never starts: --slurm-cpus 64: the largest node of partition debug "
        "has 2 CPUs; ask for at most 2; scancel 55, then rerun the sweep with that",
        "stuck: job 55_2 PENDING (ReqNodeNotAvail) never starts: --slurm-gpus 1: the largest node of partition "
        "debug has 0 GPUs; pass --slurm-gpus 0 or a GPU --slurm-partition; scancel 55, then rerun the sweep with "
        "that",
    ]
    assert status[status.index(next(x for x in status if "55_0" in x and "stuck" not in x)) + 1].strip() == stuck[0]

    (fake_slurm / "squeue_pending.txt").write_text("55_1|debug|2|1G|N/A|PartitionConfig\n")
    status = []
    sweep_status(s, log=status.append)
    assert [line.strip() for line in status if "stuck: " in line] == [
        "stuck: job 55_1 PENDING (PartitionConfig): it asks for more than partition debug allows (scontrol show "
        "partition debug lists its limits), so it never starts; scancel 55, then rerun the sweep with a smaller "
        "--slurm-cpus, --slurm-mem, --slurm-gpus or --slurm-time or another --slurm-partition"
    ]

    # --wait: the submitted job pends for ever; the sweep says why and returns instead of waiting
    monkeypatch.setattr(launchers.slurm, "ENDED_CHECK_S", 0.0)
    (fake_slurm / "squeue.txt").write_text("77|PENDING\n")
    (fake_slurm / "squeue_pending.txt").write_text("77|debug|2|0|N/A|PartitionTimeLimit\n")
    lines: list[str] = []
    outcome = run_sweep(
        spec(tmp_path / "w", test_domains=["75"]), "slurm", slurm={"gpus": 0}, wait=True, poll_s=0.01, log=lines.append
    )
    [(run, reason)] = outcome.failed
    assert reason.startswith("job 77 PENDING (PartitionTimeLimit): ") and reason.endswith(
        "a smaller --slurm-time or another --slurm-partition"
    )
    assert f"run stuck: {run.describe()}: {reason}" in lines
