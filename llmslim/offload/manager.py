"""Run a model whose decoder blocks do not all fit: stream offloaded blocks to the compute device.

Each offloaded block's tensors (still quantized) live in a store (`CpuStore` or `DiskStore`); the
block's modules hold the store's tensors as placeholders. A forward pre-hook puts the block's
tensors on the compute device just before it runs, and starts copying the next offloaded block in
a background thread (on a separate CUDA stream on a GPU), so reading block i+1 overlaps computing
block i; a forward hook drops the copies after the block ran. At most two offloaded blocks are
materialized at any time, which is what `resident_bytes` counts and `peak_resident_bytes` records.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from torch import nn

from llmslim.memory.trim import release_free_memory

logger = logging.getLogger(__name__)


@dataclass
class _Slot:
    """One tensor of an offloaded block: where it sits in its module and under which store name."""

    module: nn.Module
    attr: str
    is_param: bool
    name: str


def block_slots(block: nn.Module, prefix: str) -> list[_Slot]:
    """Every parameter and buffer directly owned by a module of `block` (prefix: the block's full name)."""
    slots = []
    for mod_name, module in block.named_modules():
        full = f"{prefix}.{mod_name}" if mod_name else prefix
        slots += [_Slot(module, n, True, f"{full}.{n}") for n, p in module._parameters.items() if p is not None]
        slots += [_Slot(module, n, False, f"{full}.{n}") for n, b in module._buffers.items() if b is not None]
    return slots


def _install(slot: _Slot, tensor: torch.Tensor) -> None:
    if slot.is_param:
        slot.module._parameters[slot.attr] = nn.Parameter(tensor, requires_grad=False)
    else:
        slot.module._buffers[slot.attr] = tensor


class OffloadManager:
    """Streams the offloaded blocks of a model from `store` to `device`, one ahead.

    Args:
        blocks: the model's decoder blocks, in execution order.
        prefixes: their full module names (store names are `prefix.tensor`).
        offloaded: indices of the blocks kept in `store`.
        store: a `CpuStore` or `DiskStore` holding every tensor of the offloaded blocks.
        device: the compute device.
    """

    def __init__(self, blocks: list[nn.Module], prefixes: list[str], offloaded: list[int], store, device: torch.device):
        self.device = torch.device(device)
        self.store = store
        self.order = sorted(offloaded)
        # tensors the store does not hold (buffers that are not in a checkpoint) simply stay where they are
        self.slots = {i: [s for s in block_slots(blocks[i], prefixes[i]) if s.name in store] for i in self.order}
        for slot in (s for slots in self.slots.values() for s in slots):
            slot.module.streamed = True  # its tensors are swapped every call: layers keep the stored layout (no CPU repacking)
        self.block_bytes = {i: sum(_nbytes(store.get(s.name)) for s in self.slots[i]) for i in self.order}
        self.resident_bytes = 0
        self.peak_resident_bytes = 0
        self.loads = 0
        self._index = {id(blocks[i]): i for i in self.order}
        self._pending: dict[int, Future] = {}
        self._installed: set[int] = set()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmslim-prefetch")
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._handles = []
        for i in self.order:
            self._put_back(i)
            self._handles.append(blocks[i].register_forward_pre_hook(self._pre_hook))
            self._handles.append(blocks[i].register_forward_hook(self._post_hook))

    def _count(self, nbytes: int) -> None:
        with self._lock:
            self.resident_bytes += nbytes
            self.peak_resident_bytes = max(self.peak_resident_bytes, self.resident_bytes)

    def _materialize(self, i: int) -> tuple[list[torch.Tensor], torch.cuda.Event | None]:
        """Copies of block i's tensors on the compute device (runs in the prefetch thread)."""
        self._count(self.block_bytes[i])
        if self._stream is None:
            return [self._copy(slot.name) for slot in self.slots[i]], None
        with torch.cuda.stream(self._stream):
            copies = [self._copy(slot.name) for slot in self.slots[i]]
            event = torch.cuda.Event()
            event.record(self._stream)
        return copies, event

    def _copy(self, name: str) -> torch.Tensor:
        source = self.store.get(name)
        if self.device.type == "cpu":
            copy = source.clone()  # torch's allocator aligns it for the CPU kernels
        else:  # pinned (CpuStore): asynchronous; pageable (DiskStore): the host side is done when this returns
            copy = source.to(self.device, non_blocking=True)
        self.store.release(name)
        return copy

    def _prefetch(self, i: int) -> None:
        if i not in self._pending and i not in self._installed:
            self._pending[i] = self._pool.submit(self._materialize, i)

    def _pre_hook(self, block: nn.Module, args) -> None:
        i = self._index[id(block)]
        if i in self._installed:
            return
        future = self._pending.pop(i, None)
        copies, event = future.result() if future is not None else self._materialize(i)
        if event is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(event)
            for tensor in copies:
                tensor.record_stream(stream)  # allocated on the prefetch stream, used on this one
        for slot, tensor in zip(self.slots[i], copies, strict=True):
            _install(slot, tensor)
        self._installed.add(i)
        self.loads += 1
        self._prefetch(self._next(i))

    def _post_hook(self, block: nn.Module, args, output) -> None:
        self._put_back(self._index[id(block)])

    def _put_back(self, i: int) -> None:
        """Point block i back at the store's tensors, freeing the compute-device copies."""
        for slot in self.slots[i]:
            _install(slot, self.store.get(slot.name))
        if i in self._installed:
            self._installed.discard(i)
            self._count(-self.block_bytes[i])
            if self.device.type == "cpu":
                # the freed copies would otherwise stay in the heap, resident. It costs decode time (fresh pages
                # per block: 1.1B, 8 tokens, 2.3 s vs 1.5 s); reusing two preallocated block buffers would not.
                release_free_memory()

    def _next(self, i: int) -> int:
        position = self.order.index(i)
        return self.order[(position + 1) % len(self.order)]

    def close(self) -> None:
        """Remove the hooks, drop pending prefetches and leave the blocks pointing at the store."""
        for handle in self._handles:
            handle.remove()
        for i, future in list(self._pending.items()):
            future.result()
            self._count(-self.block_bytes[i])
        self._pending.clear()
        self._pool.shutdown(wait=True)


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
