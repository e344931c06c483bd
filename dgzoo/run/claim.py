"""An exclusive claim on a run directory for the life of one process (training, unlearning, a sweep's run).

Two writers into one ``--output-dir`` would leave a directory mixing both runs' files, so every command that writes
a run directory first takes its claim: a small JSON file, ``.dgzoo-claim``, created with ``O_EXCL`` (atomic on local
and NFS file systems) and holding who holds it. A claim must not outlive its holder, because a killed job would
otherwise block its own rerun forever. A claim is *stale*, and is taken over, when

- its process is gone (same host: the pid no longer exists, or is a different process than the one that claimed), or
- its heartbeat is older than :data:`CLAIM_TTL_S` (another host, where the pid cannot be checked: a live holder
  touches the file every ``CLAIM_TTL_S / 4`` seconds from a daemon thread).
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from ..errors import DGZooError

CLAIM_FILE = ".dgzoo-claim"
CLAIM_TTL_S = 120.0
EXIT_CLAIMED = 75  # EX_TEMPFAIL: the run is held by another live process; try again later, it is not a failure


class RunDirClaimed(DGZooError):
    """Another live process holds the run directory."""

    exit_code = EXIT_CLAIMED


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (Linux), so a reused pid is not mistaken for the claim's holder."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive_here(record: dict[str, Any]) -> bool:
    pid = int(record.get("pid", -1))
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    started = record.get("process_start")
    return started is None or _process_start(pid) in (None, started)


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # half-written by a holder that died between create and write: stale unless fresh


def _live(path: Path, record: dict[str, Any] | None) -> bool:
    if record is None:
        return False
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return False
    if record.get("host") == socket.gethostname():
        return _alive_here(record)
    return age < CLAIM_TTL_S


def claim_holder(run_dir: str | Path) -> dict[str, Any] | None:
    """The live claim on ``run_dir`` (``pid``, ``host``, ``purpose``, ``started``), or None if free or stale."""
    path = Path(run_dir) / CLAIM_FILE
    record = _read(path)
    return record if _live(path, record) else None


def claimed_by_another(run_dir: str | Path) -> dict[str, Any] | None:
    """The live claim on ``run_dir`` unless this very process holds it (a run that pushes itself when done)."""
    record = claim_holder(run_dir)
    if record and record.get("pid") == os.getpid() and record.get("host") == socket.gethostname():
        return None
    return record


def describe_holder(record: dict[str, Any]) -> str:
    return (f"{record.get('purpose', 'a dgzoo process')} (pid {record.get('pid', '?')} on "
            f"{record.get('host', '?')}, since {record.get('started', '?')})")


def _heartbeat(path: Path, stop: threading.Event) -> None:
    while not stop.wait(CLAIM_TTL_S / 4):
        with contextlib.suppress(OSError):
            os.utime(path)


@contextlib.contextmanager
def claim_run_dir(run_dir: str | Path, purpose: str) -> Iterator[Path]:
    """Hold ``run_dir`` exclusively while the block runs; raise :class:`RunDirClaimed` if a live process holds it.

    Creates ``run_dir`` if needed (a claim has to live somewhere). The claim is released on exit, including on an
    exception or Ctrl-C; a SIGKILLed holder leaves a stale claim that the next claimant takes over.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / CLAIM_FILE
    record = {"pid": os.getpid(), "host": socket.gethostname(), "purpose": purpose,
              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "process_start": _process_start(os.getpid())}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read(path)
            if _live(path, holder):
                raise RunDirClaimed(f"{run_dir} is in use by {describe_holder(holder or {})}; wait for it to finish "
                                    f"or choose another --output-dir") from None
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # stale: its holder is gone
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        break
    else:
        raise RunDirClaimed(f"could not claim {run_dir}: another process keeps taking it; retry")
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(path, stop), daemon=True)
    beat.start()
    try:
        yield run_dir
    finally:
        stop.set()
        if (_read(path) or {}).get("pid") == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
