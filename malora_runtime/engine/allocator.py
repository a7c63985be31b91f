"""glibc malloc settings for the engine's allocation pattern on CPU.

A prefill allocates and frees the same large activations (e.g. 2048 x 1536 float32, 12.6 MB) in
every layer. With glibc's defaults such blocks are mmap'ed and unmapped, or the heap top is trimmed
back to the OS, so every layer pays page faults on fresh memory. Serving blocks up to 32 MiB from
the heap and keeping freed heap memory for reuse made a 2048-token prefill of the default model 18%
faster here (1.41-1.48 s -> 1.15-1.18 s; docs/BENCHMARKS.md). Resident memory then stays at its
peak instead of shrinking between steps, which a server's memory request has to cover anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit systems
TRIM_THRESHOLD = 2**31 - 1  # never trim in practice (mallopt takes an int)


def keep_freed_memory() -> bool:
    """Apply the settings above to this process (glibc only); returns whether they took effect."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): keep the platform's allocator as it is
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    log.info("malloc: large blocks from the heap, freed memory kept: %s", "yes" if applied else "not applied")
    return applied
