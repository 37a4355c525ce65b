"""The C allocator setting that the command line and the benchmarks apply to their own process.

A network call on a CPU allocates its activations and frees them all when it returns. With its
defaults, glibc's malloc hands the freed top of the heap back to the kernel as soon as it exceeds
128 KiB (M_TRIM_THRESHOLD), so the next call faults the same pages in again. Whether a loop pays
for this depends on what it happens to keep alive between calls, so a solver that frees everything
between network calls pays it and a bare loop may not. The setting was chosen by measurement on
small U-Nets at one thread (BENCHMARKS.md, Runs).

This is a process-wide choice, like preloading jemalloc, so the library never makes it on import:
``difftime``'s entry point does, and so do the benchmarks. ``DIFFTIME_MALLOC=system`` keeps the C
library's defaults.
"""

from __future__ import annotations

import ctypes
import os
import platform

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
TRIM_THRESHOLD = 1 << 30  # freed memory goes back to the kernel only past 1 GiB at the heap's top
# Setting any threshold switches off glibc's dynamic mmap threshold, which would leave it at
# 128 KiB and map every larger activation afresh; 32 MiB is the largest value the dynamic rule reaches.
MMAP_THRESHOLD = 32 << 20


def retain_freed_memory() -> bool:
    """Raise glibc's trim and mmap thresholds for this process; True if they were set.

    A no-op (False) off glibc, or with ``DIFFTIME_MALLOC=system`` in the environment.
    """
    if os.environ.get("DIFFTIME_MALLOC") == "system" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(_M_TRIM_THRESHOLD,
                                                                                        TRIM_THRESHOLD))
