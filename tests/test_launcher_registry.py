"""Launchers as a registry: a new launcher is one function and one registration, and runs every pending run
through the same claim -> status -> train -> retry cycle as the built-in ones."""

from pathlib import Path

import pytest
import yaml

from conftest import TINY_SWEEP_TRAIN
from dgzoo.cli import main
from dgzoo.errors import DGZooError
from dgzoo.experiments.launchers import (
    LAUNCHER_REGISTRY,
    LAUNCHERS,
    LaunchOptions,
    SlurmTask,
    register_launcher,
    run_sweep,
    sequential,
)
from dgzoo.experiments.slurm import FAILURE_FILE
from dgzoo.experiments.sweep import SweepSpec, expand
from dgzoo.registry import RegistryError

SWEEP = dict(datasets=["rotated-digits"], algorithms=["erm"], test_domains=["0", "45", "75"], n_trials=1)


@pytest.fixture
def recording():
    """A launcher named ``recording`` that records the runs it is given instead of training them; the first
    attempt of the ``45`` run fails."""
    calls: list[str] = []

    def train(run):
        calls.append(run.output_dir.name)
        if "-45-" in run.output_dir.name and calls.count(run.output_dir.name) == 1:
            raise DGZooError("simulated failure")

    @register_launcher("recording")
    def setup(spec, options):
        return sequential(spec, options, train)

    yield calls
    del LAUNCHER_REGISTRY["recording"]


def test_a_registered_launcher_trains_every_pending_run_through_the_shared_retry_cycle(tmp_path, recording):
    s = SweepSpec.from_dict({**SWEEP, "output_dir": str(tmp_path / "sw"), "train": dict(TINY_SWEEP_TRAIN)})
    lines: list[str] = []
    outcome = run_sweep(s, LaunchOptions(launcher="recording", max_retries=1, log=lines.append))
    names = sorted(run.output_dir.name for run in expand(s))
    assert sorted(set(recording)) == names and len(recording) == 4  # the 45 run twice
    assert sorted(r.output_dir.name for r in outcome.trained) == names and not outcome.failed
    assert any("simulated failure; retrying (1/1)" in line for line in lines)
    assert any(line.startswith("[2/3] ") and "(new, retry 1/1)" in line for line in lines)
    # Without retries the failure is the run's, and the sweep goes on to the next run.
    recording.clear()
    outcome = run_sweep(s, "recording", log=lines.append)
    assert len(recording) == 3 and [r.output_dir.name for r, _ in outcome.failed] == [n for n in names if "-45-" in n]


def test_the_command_line_offers_a_registered_launcher(tmp_path, recording):
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(yaml.safe_dump({**SWEEP, "output_dir": str(tmp_path / "sw"), "train": TINY_SWEEP_TRAIN}))
    assert main(["sweep", str(spec_file), "--launcher", "recording", "--max-retries", "1"]) == 0
    assert len(recording) == 4


def test_launcher_names_are_refused_when_taken_or_unknown(tmp_path):
    assert LAUNCHERS == ("local", "subprocess", "print", "local-gpus", "slurm")
    with pytest.raises(RegistryError, match="launcher 'local' is already registered"):
        register_launcher("local")(lambda spec, options: lambda pending, outcome: True)
    s = SweepSpec.from_dict({**SWEEP, "output_dir": str(tmp_path / "sw")})
    with pytest.raises(DGZooError, match=r"--launcher 'locl' is not one of local, subprocess.*did you mean: local\?"):
        run_sweep(s, "locl")
    with pytest.raises(DGZooError, match="--max-retries must be a whole number >= 0, got -1"):
        run_sweep(s, LaunchOptions(), max_retries=-1)
    assert not Path(tmp_path / "sw").exists()  # refused before anything is written


def test_a_slurm_task_retries_in_its_job_but_never_after_submitit_gave_up(tmp_path, monkeypatch, capsys):
    s = SweepSpec.from_dict({**SWEEP, "test_domains": ["75"], "output_dir": str(tmp_path / "sw")})
    [run] = expand(s)
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    calls: list[int] = []

    def fails_once(cfg):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("flaky node")

    assert SlurmTask("test", max_retries=1, train_fn=fails_once)(run) == "trained"
    assert len(calls) == 2 and f"retrying {run.describe()} (1/1)" in capsys.readouterr().out
    assert not (run.output_dir / FAILURE_FILE).exists()

    class UncompletedJobError(RuntimeError):  # submitit's, raised when it will not requeue a job out of time
        pass

    def out_of_time(cfg):
        calls.append(1)
        raise UncompletedJobError("job 7 was not requeued")

    calls.clear()
    with pytest.raises(UncompletedJobError):
        SlurmTask("test", max_retries=3, train_fn=out_of_time)(run)
    assert len(calls) == 1  # retries left, but the job is over
    reason = (run.output_dir / FAILURE_FILE).read_text()
    assert reason.startswith("job 7: job 7 was not requeued (") and "--slurm-max-requeues" in reason
