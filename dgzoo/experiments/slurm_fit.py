"""Whether a Slurm job's request fits a node of its partition: refused before submission when it cannot, and named in
``--status`` / ``--wait`` when a queued job waits for a node that does not exist.

sbatch accepts a request larger than every node of a partition on some configurations (``EnforcePartLimits=NO``,
the default); such a job then stays ``PENDING`` for good, with the reason ``Resources``, ``ReqNodeNotAvail`` or
``PartitionConfig``. The nodes come from ``sinfo --Node`` (CPUs, memory, GPU GRES of each node, whatever its state:
a node that is down now may come back); when ``sinfo`` does not answer nothing is refused, as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import DGZooError
from .slurm import _run, gres_gpus

# squeue reasons of a pending job that only a change of the job (or of the cluster's configuration) clears.
PARTITION_LIMITS = {
    "PartitionConfig": "--slurm-cpus, --slurm-mem, --slurm-gpus or --slurm-time",
    "PartitionTimeLimit": "--slurm-time",
    "PartitionNodeLimit": "--slurm-cpus, --slurm-mem or --slurm-gpus",
}
NO_NODE_REASONS = ("Resources", "ReqNodeNotAvail")  # hopeless only when no node of the partition fits
MB_PER_GB = 1024  # Slurm's (and submitit's --mem=<N>GB) gigabyte


@dataclass(frozen=True)
class Node:
    """One node of a partition as ``sinfo --Node`` lists it (None: a number sinfo did not give)."""

    cpus: int | None
    mem_mb: int | None
    gpus: int


@dataclass(frozen=True)
class Request:
    """What one job asks of one node (None: not asked, the cluster's default)."""

    cpus: int | None = None
    mem_mb: int | None = None
    gpus: int = 0


def _int(text: str) -> int | None:
    text = text.strip().rstrip("+")
    return int(text) if text.isdigit() else None


def partition_nodes() -> tuple[dict[str, list[Node]], str | None] | None:
    """Every partition's nodes and the default partition, from ``sinfo``; None when it does not answer."""
    done = _run(["sinfo", "--Node", "--noheader", "--format=%P|%G|%c|%m"])
    if done is None or done.returncode != 0:
        return None
    nodes: dict[str, list[Node]] = {}
    default = None
    for line in done.stdout.splitlines():
        fields = line.strip().split("|")
        if len(fields) != 4:
            continue
        name, gres, cpus, mem = fields
        if name.endswith("*"):
            name = default = name[:-1]
        nodes.setdefault(name, []).append(Node(_int(cpus), _int(mem), gres_gpus(gres)))
    return (nodes, default) if nodes else None


def _fits(node: Node, request: Request) -> bool:
    return (
        (request.cpus is None or node.cpus is None or request.cpus <= node.cpus)
        and (request.mem_mb is None or node.mem_mb is None or request.mem_mb <= node.mem_mb)
        and request.gpus <= node.gpus
    )


def _gb(mb: int) -> str:
    return f"{mb // MB_PER_GB} GB" if mb >= MB_PER_GB else f"{mb} MB"


def misfit(request: Request, partition: str, nodes: list[Node]) -> tuple[str, str] | None:
    """Why no node of ``partition`` can run ``request``: (the flag and what was asked, what the largest node has
    and a fix that works), or None when a node fits."""
    if not nodes or any(_fits(node, request) for node in nodes):
        return None
    cpus = max((n.cpus for n in nodes if n.cpus is not None), default=None)
    mem = max((n.mem_mb for n in nodes if n.mem_mb is not None), default=None)
    gpus = max(n.gpus for n in nodes)
    where = f"the largest node of partition {partition}"
    if request.cpus is not None and cpus is not None and request.cpus > cpus:
        return f"--slurm-cpus {request.cpus}", f"{where} has {cpus} CPUs; ask for at most {cpus}"
    if request.mem_mb is not None and mem is not None and request.mem_mb > mem:
        asked = f"--slurm-mem {request.mem_mb // MB_PER_GB}"
        if mem < MB_PER_GB:  # the nodes declare (almost) no memory: slurm.conf's RealMemory is unset
            return asked, f"{where} has {mem} MB of memory; drop --slurm-mem"
        return asked, f"{where} has {_gb(mem)} of memory; ask for at most {mem // MB_PER_GB}"
    if request.gpus > gpus:
        fix = f"ask for at most {gpus}" if gpus else "pass --slurm-gpus 0 or a GPU --slurm-partition"
        return f"--slurm-gpus {request.gpus}", f"{where} has {gpus} GPUs; {fix}"
    # each fits some node, never all on one: name the biggest node by CPUs, whose shape always fits
    best = max(nodes, key=lambda n: (n.cpus or 0, n.mem_mb or 0, n.gpus))
    shape = ", ".join(
        part
        for part in (
            f"{best.cpus} CPUs" if best.cpus is not None else "",
            _gb(best.mem_mb) if best.mem_mb is not None else "",
            f"{best.gpus} GPUs",
        )
        if part
    )
    asked = " ".join(
        part
        for part in (
            f"--slurm-cpus {request.cpus}" if request.cpus is not None else "",
            f"--slurm-mem {request.mem_mb // MB_PER_GB}" if request.mem_mb is not None else "",
            f"--slurm-gpus {request.gpus}",
        )
        if part
    )
    return asked, f"no node of partition {partition} has all of it at once (one has {shape}); ask for at most that"


def check_request(resources: dict, runs_per_gpu: int = 1) -> None:
    """Refuse, in one line and before anything is submitted, a per-job request (``--slurm-cpus``, ``--slurm-mem``,
    ``gpus`` as resolved) that no node of the partition has; nothing is refused when ``sinfo`` does not answer or
    does not list the partition (sbatch then answers)."""
    listed = partition_nodes()
    if listed is None:
        return
    nodes, default = listed
    partition = resources.get("partition") or default
    if partition is None or partition not in nodes:
        return
    mem = resources.get("mem")
    request = Request(resources.get("cpus"), None if mem is None else int(mem) * MB_PER_GB, int(resources["gpus"]))
    found = misfit(request, partition, nodes[partition])
    if found is None:
        return
    asked, fix = found
    packed = f" (per job: its {runs_per_gpu} runs, --runs-per-gpu {runs_per_gpu}, share it)" if runs_per_gpu > 1 else ""
    raise DGZooError(f"{asked}{packed}: {fix}")


# ---------------------------------------------------------------------- jobs that wait for ever


def _mem_mb(text: str) -> int | None:
    """squeue's ``%m`` (``4G``, ``500M``, ``0``) in MB; None when the job asks for no memory."""
    text = text.strip().upper()
    scale = {"K": 1 / 1024, "M": 1, "G": MB_PER_GB, "T": MB_PER_GB**2}
    number, unit = (text[:-1], text[-1]) if text and text[-1] in scale else (text, "M")
    try:
        mb = int(float(number) * scale[unit])
    except ValueError:
        return None
    return mb or None


def _gpus(tres: str) -> int:
    """GPUs in squeue's ``%b`` (``gres:gpu:1``, ``gres/gpu:a100:2``, ``N/A``)."""
    return gres_gpus(",".join(item.strip().removeprefix("gres:").removeprefix("gres/") for item in tres.split(",")))


def stuck_jobs(job_ids: Sequence[str]) -> dict[str, str]:
    """The pending jobs among ``job_ids`` that can never start, each with one line: squeue's reason, why it
    cannot clear, and the fix. Empty when squeue or sinfo do not answer (nothing is claimed then)."""
    ids = set(job_ids)
    if not ids:
        return {}
    arrays = sorted({job.split("_")[0] for job in ids})
    done = _run(
        [
            "squeue",
            "--noheader",
            "--array",
            "--states=PENDING",
            "--format=%i|%P|%C|%m|%b|%r",
            f"--jobs={','.join(arrays)}",
        ]
    )
    if done is None or done.returncode != 0:
        return {}
    listed = None
    stuck: dict[str, str] = {}
    for line in done.stdout.splitlines():
        fields = line.strip().split("|", 5)
        if len(fields) != 6 or fields[0] not in ids:
            continue
        job, partition, cpus, mem, tres, reason = fields
        reason = reason.strip()
        kind = reason.split(",")[0].strip()
        cancel = f"scancel {job.split('_')[0]}, then rerun the sweep with"
        if kind not in PARTITION_LIMITS and kind not in NO_NODE_REASONS:
            continue
        if listed is None:
            listed = partition_nodes() or ({}, None)
        found = misfit(Request(_int(cpus), _mem_mb(mem), _gpus(tres)), partition, listed[0].get(partition, []))
        if found is not None:  # no node has it: the flag, the node, the fix
            asked, fix = found
            stuck[job] = f"job {job} PENDING ({kind}) never starts: {asked}: {fix}; {cancel} that"
        elif kind in PARTITION_LIMITS:  # a limit of the partition itself (MaxTime, MaxCPUsPerNode...)
            stuck[job] = (
                f"job {job} PENDING ({kind}): it asks for more than partition {partition} allows (scontrol show "
                f"partition {partition} lists its limits), so it never starts; {cancel} a smaller "
                f"{PARTITION_LIMITS[kind]} or another --slurm-partition"
            )
    return stuck
