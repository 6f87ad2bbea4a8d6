"""Process memory settings for the long-running daemons.

Model transfers allocate and free buffers of several MiB in many threads. glibc's malloc gives
each thread an arena of its own (up to 8 per core), and freed buffers stay in their arena: the
server's resident memory then creeps up by hundreds of MiB that nothing uses (measured here: a
1 GiB model's rounds took the server from 1.2x to 2.5x the model). Two arenas keep the buffers
reused instead. (Making every large buffer its own mapping, returned when freed, costs the page
faults of mapping it again: transfers ran 2x slower here.) Free pages inside the arenas still stay
resident until ``malloc_trim`` hands them back: :func:`release_memory` does that when a job ends.

Training scripts get one setting by default (:func:`training_memory_env`): PyTorch's CPU allocator
backs each tensor of 2 MiB or more with transparent huge pages (``THP_MEM_ALLOC_ENABLE=1``; the
kernel's THP mode here is ``madvise``, so nothing else changes). Fresh memory is what a script pays
for a large model: the received tensors are read into it, ``params + 1`` or an optimizer step
writes into more of it. Measured on this 2-core VM (median of 3, after the first touch): reading a
1 GiB file from /dev/shm into a fresh tensor and adding one took 1.0 s with 4 KiB pages, 0.21 s
with huge pages. Tensors under 2 MiB (a CNN's activations, hello-pt's whole model) are unaffected.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import sys
from collections.abc import Mapping

__all__ = ["TORCH_HUGE_PAGES", "release_memory", "training_memory_env", "tune_malloc"]

#: PyTorch reads it once, at the process's first allocation: it must be in the environment the
#: process (or the fork server it is forked from) starts with.
TORCH_HUGE_PAGES = "THP_MEM_ALLOC_ENABLE"

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


def training_memory_env(env: Mapping[str, str]) -> dict[str, str]:
    """The memory settings a training process gets unless ``env`` (its environment) sets them itself."""
    return {} if TORCH_HUGE_PAGES in env else {TORCH_HUGE_PAGES: "1"}
