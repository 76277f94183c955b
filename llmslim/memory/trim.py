"""Give freed heap memory back to the operating system (glibc's `malloc_trim`).

Streaming code frees a block's temporaries after each step; glibc keeps those pages in its
arenas (the prefetch thread's arena especially) instead of returning them, so resident memory
drifts up towards the sum of every block streamed. Trimming after each block bounds it. A
no-op where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to call
        return None


def release_free_memory() -> bool:
    """Return free heap pages to the OS; True when the C library could do it."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
