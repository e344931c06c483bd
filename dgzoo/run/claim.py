"""An exclusive claim on a run directory for the life of one process (training, unlearning, a sweep's run).

Two writers into one ``--output-dir`` would leave a directory mixing both runs' files, so every command that writes
a run directory first takes its claim: a small JSON file, ``.dgzoo-claim``, created with ``O_EXCL`` (atomic on local
and NFS file systems) and holding who holds it. A claim must not outlive its holder, because a killed job would
otherwise block its own rerun forever. A claim is *stale*, and is taken over, when

- its process is gone (same host: the pid no longer exists, or is a different process than the one that claimed), or
- another host holds it (where the pid cannot be checked) and its heartbeat stopped: a live holder touches the file
  every ``CLAIM_TTL_S / 4`` seconds (recorded as ``heartbeat_s``) from a daemon thread. A heartbeat younger than
  :data:`CLAIM_TTL_S` by this host's clock is live. One that looks older, or lies in the future, may only mean the
  two clocks disagree, so it is not trusted: the claimant watches the file for a few heartbeat intervals and
  declares it stale only when its modification time did not move (clock-independent evidence of a dead holder).

The claim is written to a temporary file and linked into place, so it is never seen empty or half-written (a run
started on a full disk fails with one line and leaves no claim); an unreadable claim is left over from a crash and
is stale.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import DGZooError, writing

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
        record = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # left empty by a crash (claims are linked into place whole): stale
    return record if isinstance(record, dict) else {}


CLOCK_SLACK_S = 5.0  # a heartbeat this far in the future still counts as fresh (clocks a few seconds apart)
_dead_heartbeats: dict[str, float] = {}  # claim path -> an mtime this process watched stand still


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return None


def _heartbeat_moves(path: Path, record: dict[str, Any], mtime: float) -> bool:
    """Whether another host's claim file is still being touched: watch its mtime for 2.5 of its holder's heartbeat
    intervals. Only the file's own timestamps are compared, so clock skew between the hosts cannot fool it."""
    if _dead_heartbeats.get(str(path)) == mtime:
        return False  # already watched standing still by this process (a run checks its directory several times)
    try:
        interval = float(record.get("heartbeat_s", CLAIM_TTL_S / 4))
    except (TypeError, ValueError):
        interval = CLAIM_TTL_S / 4
    deadline = time.monotonic() + 2.5 * min(max(interval, 0.05), CLAIM_TTL_S)
    while time.monotonic() < deadline:
        time.sleep(min(0.5, interval / 4))
        now = _mtime(path)
        if now is None:
            return False
        if now != mtime:
            return True
    _dead_heartbeats[str(path)] = mtime
    return False


def _live(path: Path, record: dict[str, Any] | None) -> bool:
    if not record or "pid" not in record or "host" not in record:
        return False  # free, or an unreadable leftover of a crash
    mtime = _mtime(path)
    if mtime is None:
        return False
    if record.get("host") == socket.gethostname():
        return _alive_here(record)
    age = time.time() - mtime
    if -CLOCK_SLACK_S <= age < CLAIM_TTL_S:
        return True
    return _heartbeat_moves(path, record, mtime)  # looks old, or in the future: the clocks may disagree


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
    return (
        f"{record.get('purpose', 'a dgzoo process')} (pid {record.get('pid', '?')} on "
        f"{record.get('host', '?')}, since {record.get('started', '?')})"
    )


def _heartbeat(path: Path, stop: threading.Event) -> None:
    while not stop.wait(CLAIM_TTL_S / 4):
        with contextlib.suppress(OSError):
            os.utime(path)


def _create(path: Path, text: str) -> bool:
    """Create the claim file ``path`` holding ``text`` exclusively and whole; False if it exists already.

    The text goes to a temporary file first, then is hard-linked to ``path`` (atomic and exclusive on local file
    systems and NFS), so nobody ever reads an empty claim. File systems without hard links fall back to ``O_EXCL``.
    """
    tmp = path.with_name(f"{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    with writing(path, cleanup=[tmp]):
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            try:  # no hard links here: exclusive create, then write (a crash in between leaves an unreadable claim)
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(text)
            except OSError:
                path.unlink(missing_ok=True)
                raise
        finally:
            tmp.unlink(missing_ok=True)
    return True


@contextlib.contextmanager
def claim_run_dir(run_dir: str | Path, purpose: str) -> Iterator[Path]:
    """Hold ``run_dir`` exclusively while the block runs; raise :class:`RunDirClaimed` if a live process holds it.

    Creates ``run_dir`` if needed (a claim has to live somewhere). The claim is released on exit, including on an
    exception or Ctrl-C; a SIGKILLed holder leaves a stale claim that the next claimant takes over.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / CLAIM_FILE
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "purpose": purpose,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "process_start": _process_start(os.getpid()),
        "heartbeat_s": CLAIM_TTL_S / 4,
    }
    for _ in range(3):
        if _create(path, json.dumps(record)):
            break
        holder = _read(path)
        if _live(path, holder):
            raise RunDirClaimed(
                f"{run_dir} is in use by {describe_holder(holder or {})}; wait for it to finish "
                f"or choose another --output-dir"
            ) from None
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # stale: its holder is gone
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
