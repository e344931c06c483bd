"""A real one-node Slurm cluster (Debian's slurm-wlm: slurmctld + slurmd, no accounting) started in a temporary
directory: a one-run sweep through dgzoo's Slurm launcher is preempted, requeued by submitit and resumed exactly;
a rerun while it waits in the queue submits nothing; ``--status`` reads the states from squeue.

Opt-in by what the machine has: skipped (with the reason) without slurmctld/slurmd or when not root (the daemons
run as root here). ``.ci/run`` installs the packages. The cluster uses ``auth/none`` (no munged to start) and a
5-second credential lifetime, so that a requeued job may start again within seconds.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from dgzoo.experiments.launchers import run_sweep, sweep_status
from dgzoo.experiments.sweep import SweepSpec, expand, run_status

pytestmark = pytest.mark.slow

TRAIN = dict(
    backbone="test_resnet",
    image_size=8,
    steps=150,
    eval_every=50,
    checkpoint_every=10,
    batch_size=8,
    lr=3e-3,
    eval_batch_size=512,
    log_with="none",
    num_workers=0,
)
START_S = 30  # for the daemons to answer
JOB_S = 300  # for the job to finish, requeue included


def why_not() -> str | None:
    missing = [d for d in ("slurmctld", "slurmd", "sinfo", "sbatch", "squeue", "scancel") if not shutil.which(d)]
    if missing:
        return f"{', '.join(missing)} not installed (apt-get install slurm-wlm)"
    if os.geteuid() != 0:
        return "the test cluster's daemons run as root; run as root to include this test"
    try:
        import submitit  # noqa: F401
    except ImportError:
        return "submitit is not installed (pip install 'dgzoo[slurm]')"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def slurm_conf(root: Path) -> str:
    host = socket.gethostname()
    return f"""\
ClusterName=dgzootest
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
AuthInfo=cred_expire=5
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerParameters=sched_interval=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
NodeName={host} CPUs={os.cpu_count() or 1} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def squeue(*args: str) -> str:
    return subprocess.run(["squeue", "--noheader", *args], capture_output=True, text=True, timeout=30).stdout


@pytest.fixture
def slurm_cluster(tmp_path_factory, monkeypatch):
    """slurmctld and slurmd of a fresh one-node cluster, stopped (jobs cancelled first) whatever the test does."""
    why = why_not()
    if why:
        pytest.skip(why)
    root = tmp_path_factory.mktemp("slurm-cluster")
    (root / "state").mkdir()
    (root / "spool").mkdir()
    conf = root / "slurm.conf"
    conf.write_text(slurm_conf(root))
    monkeypatch.setenv("SLURM_CONF", str(conf))
    daemons = []
    try:
        for daemon in ("slurmctld", "slurmd"):
            log = open(root / f"{daemon}.out", "w")
            daemons.append(subprocess.Popen([daemon, "-D", "-f", str(conf)], stdout=log, stderr=subprocess.STDOUT))
            log.close()
        deadline = time.time() + START_S
        while (
            "idle" not in subprocess.run(["sinfo", "--noheader", "--format=%T"], capture_output=True, text=True).stdout
        ):
            if time.time() > deadline or any(d.poll() is not None for d in daemons):
                logs = "\n".join(p.read_text()[-2000:] for p in sorted(root.glob("*.log")) if p.exists())
                pytest.fail(f"the test cluster did not come up in {START_S} s:\n{logs}")
            time.sleep(0.5)
        yield root
    finally:
        subprocess.run(["scancel", "--full", f"--user={os.getuid()}"], capture_output=True, timeout=30)
        deadline = time.time() + 30
        while daemons and time.time() < deadline and squeue().strip():
            time.sleep(0.5)
        for daemon in reversed(daemons):
            daemon.terminate()
        for daemon in reversed(daemons):
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()


def spec(root: Path) -> SweepSpec:
    return SweepSpec.from_dict(
        dict(
            datasets=["rotated-digits"],
            algorithms=["erm"],
            test_domains=["75"],
            n_trials=1,
            output_dir=str(root),
            train=dict(TRAIN),
        )
    )


def wait_for(condition, timeout: float, what: str, root: Path) -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            logs = "\n".join(p.read_text()[-3000:] for p in sorted(root.rglob("*_log.*")))
            pytest.fail(f"timed out waiting for {what}; queue: {squeue('--states=all')!r}\n{logs}")
        time.sleep(0.5)


def weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(run_dir / "model.safetensors")


def test_a_preempted_slurm_run_resumes_exactly_and_a_rerun_never_resubmits_it(slurm_cluster, tmp_path, monkeypatch):
    started = time.time()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the job computes as the local reference run does
    s = spec(tmp_path / "slurm")
    [run] = expand(s)
    lines: list[str] = []
    first = run_sweep(s, "slurm", slurm={"time": 10}, log=lines.append)
    assert any("has no GPUs" in line for line in lines)  # sinfo lists no GRES: the job asks for none
    [job] = first.jobs.values()
    wait_for(lambda: any((run.output_dir / "checkpoints").glob("step_*")), JOB_S, "the first checkpoint", tmp_path)
    subprocess.run(["scancel", "--signal=USR2", job], check=True, timeout=30)  # preemption: submitit requeues
    logs = tmp_path / "slurm" / "slurm"
    wait_for(
        lambda: "Caught signal SIGUSR2" in "".join(p.read_text() for p in logs.glob("*_log.err")),
        60,
        "submitit to catch the signal",
        tmp_path,
    )

    # Requeued (pending, or running again): no accounting here, squeue says it is live, so nothing is resubmitted.
    rerun_lines: list[str] = []
    rerun = run_sweep(s, "slurm", slurm={"time": 10}, log=rerun_lines.append)
    assert rerun.jobs == {} and [r.output_dir for r in rerun.elsewhere] == [run.output_dir], rerun_lines

    # The uninterrupted reference, trained on this machine meanwhile.
    (tmp_path / "local.yaml").write_text(
        yaml.safe_dump(
            dict(
                datasets=["rotated-digits"],
                algorithms=["erm"],
                test_domains=["75"],
                n_trials=1,
                output_dir=str(tmp_path / "local"),
                train=dict(TRAIN),
            )
        )
    )
    reference = subprocess.run(
        [sys.executable, "-m", "dgzoo.cli", "sweep", str(tmp_path / "local.yaml")],
        capture_output=True,
        text=True,
        timeout=JOB_S,
    )
    assert reference.returncode == 0, reference.stderr[-2000:]
    wait_for(lambda: not squeue(f"--jobs={job}").strip(), JOB_S, "the requeued job to finish", tmp_path)

    log = (run.output_dir / "train.log").read_text()
    assert "resumed from" in log, log
    assert run_status(run) == "done"
    local_dir = tmp_path / "local" / run.output_dir.name
    ours, theirs = weights(run.output_dir), weights(local_dir)
    assert ours.keys() == theirs.keys() and all(bool((ours[k] == theirs[k]).all()) for k in ours)
    assert (
        json.loads((run.output_dir / "records.jsonl").read_text().splitlines()[-1])["acc"]
        == json.loads((local_dir / "records.jsonl").read_text().splitlines()[-1])["acc"]
    )

    status: list[str] = []
    sweep_status(s, log=status.append)
    assert status[0].endswith("1 runs: 1 done, 0 to resume, 0 to restart, 0 to start")
    assert status[1] == "jobs: 1 COMPLETED"  # from squeue: the cluster keeps no accounting
    assert status[2].startswith("job states of 1 job(s) from squeue: sacct has no record")
    assert status[3].startswith(f"done     job {job} COMPLETED") and len(status) == 4
    last = run_sweep(s, "slurm", slurm={"time": 10}, log=lines.append)
    assert last.jobs == {} and lines[-1] == "slurm: nothing to submit"
    print(f"real Slurm test: {time.time() - started:.0f} s")


def test_a_request_larger_than_every_node_is_refused_before_submission(slurm_cluster, tmp_path):
    from dgzoo.errors import DGZooError

    cpus = os.cpu_count() or 1
    s = spec(tmp_path / "big")
    with pytest.raises(DGZooError, match=rf"^--slurm-cpus 64: the largest node of partition debug has {cpus} CPUs; "):
        run_sweep(s, "slurm", slurm={"time": 10, "cpus": 64})
    assert not (tmp_path / "big").exists() and not squeue("--states=all").strip()  # nothing written, nothing queued

    # Such a job submitted anyway (by hand, or by an older dgzoo): this sbatch accepts it and it pends for good.
    [run] = expand(s)
    job = subprocess.run(
        ["sbatch", "--parsable", "--cpus-per-task=64", f"--output={tmp_path}/big.out", "--wrap", "true"],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout.strip()
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "slurm_jobs.json").write_text(
        json.dumps(
            {"submissions": [{"submitted": "", "cluster": "slurm", "folder": "", "jobs": {run.output_dir.name: job}}]}
        )
    )
    wait_for(lambda: "PartitionConfig" in squeue("--format=%r", f"--jobs={job}"), 30, "the job's reason", tmp_path)
    status: list[str] = []
    sweep_status(s, log=status.append)
    assert status[-1].strip() == (
        f"stuck: job {job} PENDING (PartitionConfig) never starts: --slurm-cpus 64: the largest node of partition "
        f"debug has {cpus} CPUs; ask for at most {cpus}; scancel {job}, then rerun the sweep with that"
    )
