"""Keep freed activation memory mapped between CPU training steps (glibc malloc on Linux; elsewhere nothing).

Why: every step frees and re-allocates the same few hundred MB of activations and gradients. By default glibc gives
big blocks straight back to the kernel (blocks above its mmap threshold are unmapped on free; a free heap top above
the trim threshold is trimmed), so the next step takes a page fault on every 4 KB it writes again: about 20 000
minor faults and 0.1-0.3 s of system time per small-music step on the bench machine, landing on whichever kernel
writes first (bench/train_step.py; measured with getrusage). A fixed 32 MB mmap threshold (the largest glibc takes
through mallopt) and no trimming keep those pages mapped: the process holds its training peak, which it reaches at
every step anyway.

This is process-wide allocator state, so it is switched on only while a CPU run trains (`Trainer.train`) or a CPU
step is measured, counted across concurrent runs, and handed back at the end: trimming restored to glibc's default
and `malloc_trim` returns the kept memory. (glibc cannot re-enable its dynamic mmap threshold; 32 MB fixed only
means blocks up to 32 MB come from the heap.)
"""

from __future__ import annotations

import ctypes
import platform
import threading

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit (HEAP_MAX_SIZE / 2)
NO_TRIM_BYTES = 2**31 - 1  # mallopt takes a C int
DEFAULT_TRIM_BYTES = 128 << 10  # glibc's default M_TRIM_THRESHOLD

_lock = threading.Lock()
_holders = 0


def _glibc():
    """The C library when it is glibc with mallopt/malloc_trim, else None (musl, macOS, Windows)."""
    if platform.system() != "Linux":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt.argtypes, libc.malloc_trim.argtypes = [ctypes.c_int, ctypes.c_int], [ctypes.c_size_t]
        if not hasattr(libc, "gnu_get_libc_version"):
            return None
    except (OSError, AttributeError):
        return None
    return libc


def keep_heap() -> bool:
    """Start keeping freed memory mapped (first holder sets it); True if this allocator supports it."""
    global _holders
    libc = _glibc()
    if libc is None:
        return False
    with _lock:
        if _holders == 0:
            libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
            libc.mallopt(M_TRIM_THRESHOLD, NO_TRIM_BYTES)
        _holders += 1
    return True


def release_heap() -> None:
    """Undo one `keep_heap` (the last holder restores trimming and returns the kept memory to the system)."""
    global _holders
    libc = _glibc()
    if libc is None:
        return
    with _lock:
        if _holders == 0:
            return
        _holders -= 1
        if _holders == 0:
            libc.mallopt(M_TRIM_THRESHOLD, DEFAULT_TRIM_BYTES)
            libc.malloc_trim(0)


def trim_heap() -> None:
    """Return free heap memory to the system now (e.g. between two measured configurations), holders or not."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


__all__ = ["keep_heap", "release_heap", "trim_heap"]
