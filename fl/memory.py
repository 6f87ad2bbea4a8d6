"""Process memory settings for the long-running daemons.

Model transfers allocate and free buffers of several MiB in many threads. glibc's malloc gives
each thread an arena of its own (up to 8 per core), and freed buffers stay in their arena: the
server's resident memory then creeps up by hundreds of MiB that nothing uses (measured here: a
1 GiB model's rounds took the server from 1.2x to 2.5x the model). Two arenas keep the buffers
reused instead. (Making every large buffer its own mapping, returned when freed, costs the page
faults of mapping it again: transfers ran 2x slower here.) Free pages inside the arenas still stay
resident until ``malloc_trim`` hands them back: :func:`release_memory` does that when a job ends.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import sys

__all__ = ["release_memory", "tune_malloc"]

_M_ARENA_MAX = -8


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """glibc, or None where there is none (other platforms, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    return libc


def tune_malloc(arena_max: int = 2) -> bool:
    """Apply the settings above (glibc on Linux only); returns whether they took effect."""
    libc = _libc()
    return libc is not None and bool(libc.mallopt(_M_ARENA_MAX, arena_max))


def release_memory(*, collect: bool = True) -> bool:
    """Give free heap pages back to the system (after large transfers), first collecting garbage cycles.

    ``collect=False`` skips the collection (cheap enough after every large upload). Returns whether
    malloc handed memory back (False where there is no glibc).
    """
    if collect:
        gc.collect()
    libc = _libc()
    return libc is not None and bool(libc.malloc_trim(0))
