"""Keep freed memory in the process on a CPU (glibc), so large tensors stop paying page faults.

Contract: `retain_freed_memory(True)` tells glibc's malloc to serve every allocation from its heap
(`M_MMAP_MAX = 0`) and never to give freed memory back to the system (`M_TRIM_THRESHOLD` at its
maximum); `retain_freed_memory(False)` restores glibc's default thresholds and hands free memory back
(`malloc_trim(0)`). Returns False (and changes nothing) where the C library is not glibc.

Why: with glibc's defaults every tensor above 128 kB is a fresh `mmap` and is unmapped when freed, so
every activation, gradient and optimizer temporary of a training step is page-faulted in again, page by
page (on the 2-core benchmark VM a 311 MB copy took 0.28 s CPU that way and 0.03 s with memory reused).
The process's resident size then stays at its peak instead of shrinking between steps.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
DEFAULT_MMAP_THRESHOLD = 128 * 1024
DEFAULT_MMAP_MAX = 65536


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def retain_freed_memory(enable: bool = True) -> bool:
    libc = _libc()
    if libc is None:
        return False
    if enable:
        ok = libc.mallopt(M_MMAP_MAX, 0) and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
    else:
        ok = (libc.mallopt(M_MMAP_MAX, DEFAULT_MMAP_MAX) and libc.mallopt(M_MMAP_THRESHOLD, DEFAULT_MMAP_THRESHOLD)
              and libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_MMAP_THRESHOLD))
        libc.malloc_trim(0)
    return bool(ok)
