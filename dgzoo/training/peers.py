"""A stalled or dead peer process ends a multi-process run with one line, within a bounded time.

Every process of a ``torchrun`` / ``accelerate launch`` run waits for the others at each collective (the gradient
all-reduce, the barriers around evaluation and checkpoints). When one of them stops (killed, out of memory, stuck
on a file system), the others used to wait in silence, then end in a traceback from the communication library. The
process group is created with a timeout (``DGZOO_COLLECTIVE_TIMEOUT`` seconds, default 900: long enough for the
main process to save a large checkpoint while the others wait), and :func:`peer_failures` turns the error a
collective raises (a timeout, or a peer's closed connection) into one line saying what happened and how to go on.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from datetime import timedelta

from ..errors import DGZooError

DEFAULT_COLLECTIVE_TIMEOUT_S = 900.0
# Words in the errors torch.distributed raises when a peer is gone or silent (gloo, NCCL, the TCP store).
_PEER_MARKERS = (
    "timed out",
    "timeout",
    "connection closed",
    "connection reset",
    "broken pipe",
    "peer",
    "nccl communicator was aborted",
    "watchdog",
    "socket",
)


def collective_timeout() -> timedelta:
    """How long a collective waits for a silent peer (``DGZOO_COLLECTIVE_TIMEOUT`` seconds)."""
    try:
        seconds = float(os.environ.get("DGZOO_COLLECTIVE_TIMEOUT", DEFAULT_COLLECTIVE_TIMEOUT_S))
    except ValueError:
        seconds = DEFAULT_COLLECTIVE_TIMEOUT_S
    return timedelta(seconds=seconds if seconds > 0 else DEFAULT_COLLECTIVE_TIMEOUT_S)


def is_peer_failure(error: BaseException) -> bool:
    """Whether ``error`` is a collective that failed because another process stopped or stopped answering."""
    import torch.distributed as dist

    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    return (
        isinstance(error, RuntimeError)
        and any(m in str(error).lower() for m in _PEER_MARKERS)
        and dist.is_available()
        and dist.is_initialized()
    )


@contextlib.contextmanager
def peer_failures(num_processes: int, continue_with: str) -> Iterator[None]:
    """In a multi-process run, turn a collective's failure into one line ending with ``continue_with``."""
    try:
        yield
    except (RuntimeError, OSError) as e:
        if num_processes <= 1 or not is_peer_failure(e):
            raise
        first = " ".join(str(e).split())[:160]
        raise DGZooError(
            f"another process of this {num_processes}-process run stopped or stopped answering "
            f"(waited at most {collective_timeout().total_seconds():.0f} s; {type(e).__name__}: "
            f"{first}); look for the first error in the other processes' output; {continue_with}"
        ) from None
