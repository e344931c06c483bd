"""Host memory between steps: what a step frees stays in the process for the next step.

A training step allocates its activations and gradients, frees them at its end, and allocates the same sizes again
at the next step's start. glibc's malloc gives such memory back to the kernel in two cases: a block above its mmap
threshold (which glibc raises by itself only up to 32 MiB) is unmapped when freed, and the free top of the heap is
trimmed once it exceeds the trim threshold. Either way the next step faults the same memory back in, one zeroed
page at a time, in the kernel. On a CPU that is a few percent of every step (more at larger images), and it is the
same in the data loader's workers, which inherit these settings when they are forked.

:func:`keep_freed_host_memory` raises both thresholds once per process, when a run's session starts, so freed
blocks are reused. It changes where memory comes from, never what is computed: the weights are bit-identical with
and without it (tested). The cost is that the process keeps its peak heap until it exits instead of shrinking
between steps. ``DGZOO_KEEP_HOST_MEMORY=0`` keeps glibc's defaults; so does any ``MALLOC_*_THRESHOLD_`` or
``glibc.malloc`` tunable the user set (theirs wins), and any C library other than glibc.
Measurements: benchmarks/results/vs_timm.md.
"""

from __future__ import annotations

import ctypes
import os

ENV = "DGZOO_KEEP_HOST_MEMORY"
# mallopt's parameter numbers (glibc's malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
# Blocks up to 1 GiB come from the heap and are reused: a 224 px step's largest activations (96 images, 64
# channels at 112 px) are about 0.3 GiB. Larger one-off blocks are still mapped and returned.
MMAP_THRESHOLD = 1 << 30
TRIM_THRESHOLD = 2**31 - 1  # the largest value mallopt takes: the heap's free top is never given back
USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def keep_freed_host_memory() -> bool:
    """Make this process keep and reuse the host memory it frees (see the module docstring); return whether the
    setting is on. Idempotent; does nothing when switched off, when the user tuned glibc's malloc, or off glibc."""
    if os.environ.get(ENV, "1").strip() == "0":
        return False
    if any(name in os.environ for name in USER_SETTINGS) or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    if not glibc():
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def glibc() -> bool:
    """Whether this process runs on GNU libc (the only C library whose ``mallopt`` takes these settings)."""
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")  # type: ignore[union-attr]
    except (AttributeError, ValueError, OSError):
        return False
