"""Measure the peak memory a function allocates, recomputation in the backward pass included.

CUDA: the caching allocator's peak (`torch.cuda.max_memory_allocated`) above what was allocated
before. CPU: the profiler's allocation timeline (`profile_memory=True` records every allocation
and free of PyTorch's CPU allocator, in every thread); the peak of its running sum. Both count
every tensor alive at the worst moment, not only the ones saved for the backward pass.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def peak_memory(fn: Callable[[], Any], device: str | torch.device = "cpu") -> tuple[Any, int]:
    """Run `fn()` and return (its result, the peak bytes allocated on `device` while it ran).

    The peak is above the memory in use when `fn` starts, so weights loaded before do not count.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return _cuda_peak(fn, device)
    if device.type != "cpu":
        raise ValueError(f"peak_memory measures 'cpu' or 'cuda' devices, got {str(device)!r}")
    return _cpu_peak(fn)


def _cuda_peak(fn: Callable[[], Any], device: torch.device) -> tuple[Any, int]:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    result = fn()
    torch.cuda.synchronize(device)
    return result, torch.cuda.max_memory_allocated(device) - before


def _cpu_peak(fn: Callable[[], Any]) -> tuple[Any, int]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    from torch.autograd import DeviceType

    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type() == DeviceType.CPU]
    return result, _running_peak([(e.start_ns(), e.nbytes()) for e in events])


def _running_peak(changes: list[tuple[int, int]]) -> int:
    """The highest running sum of (time, signed bytes) allocation records, taken in time order."""
    total = peak = 0
    for _, nbytes in sorted(changes, key=lambda change: change[0]):
        total += nbytes
        peak = max(peak, total)
    return peak
