"""Returning freed heap memory to the OS after each streamed block."""

from __future__ import annotations

import platform

import pytest

from llmslim.memory.trim import release_free_memory


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_release_free_memory_gives_back_a_freed_heap_block():
    def rss_kib() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

    import ctypes

    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: keep these blocks in the heap, as fragmented streaming leaves them
    try:
        blocks = [libc.malloc(1 << 20) for _ in range(64)]  # 64 MiB in the heap
        for p in blocks:
            ctypes.memset(p, 1, 1 << 20)
        keep = libc.malloc(1 << 20)  # from the heap top, above them: the top cannot simply shrink
        for p in blocks:
            libc.free(ctypes.c_void_p(p))
        before = rss_kib()
        assert release_free_memory()
        assert before - rss_kib() > 32 * 1024
        libc.free(ctypes.c_void_p(keep))
    finally:
        libc.mallopt(-3, 128 * 1024)
