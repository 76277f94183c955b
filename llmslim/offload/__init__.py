"""Quantized offload: decoder blocks that do not fit the compute device stay quantized in CPU RAM or
on disk (memory-mapped) and are streamed to it block by block, the next one prefetched."""

from __future__ import annotations

from llmslim.offload.manager import OffloadManager
from llmslim.offload.placement import OFFLOAD_MODES, offload_, offload_manager, split_blocks
from llmslim.offload.store import CpuStore, DiskStore, DiskWriter

__all__ = ["OFFLOAD_MODES", "CpuStore", "DiskStore", "DiskWriter", "OffloadManager", "offload_", "offload_manager", "split_blocks"]
