"""Where offloaded (still quantized) tensors live between uses: CPU RAM, or files mapped from disk.

`CpuStore` keeps each tensor in host memory (pinned when a GPU will read it, so copies overlap
compute). `DiskStore` maps files into the address space without reading them: a tensor is a view
of the mapping, its pages are read on first touch and dropped again with `release` (madvise
DONTNEED), so they do not stay resident. Its files are the shards of a quantized llmslim
checkpoint (safetensors, read in place) or one file `DiskWriter` fills while a float checkpoint is
quantized on load.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

FAULT_AROUND = 64 * 2**10
ALIGN = 64  # the CPU kernels want 64-byte aligned weights (see quant.kernels.aligned)
_SAFETENSORS_DTYPES = {
    "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64, "BOOL": torch.bool,
}  # fmt: skip
_NAMES = {dtype: str(dtype).removeprefix("torch.") for dtype in _SAFETENSORS_DTYPES.values()}


class CpuStore:
    """Offloaded tensors in host memory (pinned if `pin`)."""

    def __init__(self, pin: bool = False):
        self.pin = pin
        self.tensors: dict[str, torch.Tensor] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().to("cpu").contiguous()
        self.tensors[name] = tensor.pin_memory() if self.pin else tensor

    def get(self, name: str) -> torch.Tensor:
        return self.tensors[name]

    def release(self, name: str) -> None:
        """Nothing to drop: the tensor lives in RAM by design."""

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


@dataclass(frozen=True)
class Location:
    """A tensor inside a file: byte offset and length, dtype and shape."""

    file: str
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


class DiskStore:
    """Offloaded tensors read in place from memory-mapped files; pages released after each use."""

    def __init__(self, index: dict[str, Location]):
        self.index = index
        self._maps: dict[str, mmap.mmap] = {}

    def _map(self, file: str) -> mmap.mmap:
        if file not in self._maps:
            with open(file, "rb") as handle:  # the mapping keeps its own reference to the file
                self._maps[file] = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)  # private: views are writable, file never is
        return self._maps[file]

    def get(self, name: str) -> torch.Tensor:
        """A view of the mapped bytes (no read happens until the tensor is used)."""
        loc = self.index[name]
        if loc.nbytes == 0:
            return torch.empty(loc.shape, dtype=loc.dtype)
        flat = torch.frombuffer(self._map(loc.file), dtype=torch.uint8, count=loc.nbytes, offset=loc.offset)
        return flat.view(loc.dtype).view(loc.shape)

    def release(self, name: str) -> None:
        """Drop the tensor's pages from this process's resident memory (they stay in the page cache)."""
        loc = self.index[name]
        page, mapping = mmap.PAGESIZE, self._map(loc.file)
        # a read fault also maps the cached pages around it (Linux fault-around, 64 KiB): drop those too
        start = max(0, (loc.offset - FAULT_AROUND) // page * page)
        end = min(-(-(loc.offset + loc.nbytes + FAULT_AROUND) // page) * page, len(mapping))
        if end > start:
            mapping.madvise(mmap.MADV_DONTNEED, start, end - start)

    def __contains__(self, name: str) -> bool:
        return name in self.index

    @property
    def nbytes(self) -> int:
        return sum(loc.nbytes for loc in self.index.values())

    @classmethod
    def from_safetensors(cls, files: list[Path], names: set[str], prefix: str = "") -> DiskStore:
        """The tensors `names` of a safetensors checkpoint, found by key (with or without the model's `prefix.`)."""
        index: dict[str, Location] = {}
        for file in files:
            for key, loc in safetensors_index(Path(file)).items():
                for name in (key, f"{prefix}.{key}", key.removeprefix(f"{prefix}.")):
                    if name in names:
                        index[name] = loc
        missing = sorted(names - set(index))
        if missing:
            raise ValueError(f"the checkpoint has no tensor for {missing[:3]} ({len(missing)} missing): it cannot be offloaded in place")
        return cls(index)


def safetensors_index(file: Path) -> dict[str, Location]:
    """Key -> `Location` of every tensor of a safetensors file, from its header alone."""
    with open(file, "rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        if header_len > os.fstat(handle.fileno()).st_size - 8:
            raise ValueError(f"{file}: safetensors header length {header_len} exceeds the file: truncated or corrupt")
        header = json.loads(handle.read(header_len))
    start = 8 + header_len
    index = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        index[key] = Location(str(file), start + begin, end - begin, _SAFETENSORS_DTYPES[info["dtype"]], tuple(info["shape"]))
    return index


class DiskWriter:
    """Appends tensors to one file at 64-byte aligned offsets; `finish` returns their `DiskStore`."""

    def __init__(self, folder: str | os.PathLike, name: str = "llmslim-offload.bin"):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / name
        self.handle = open(self.path, "wb")  # noqa: SIM115 - closed in finish()
        self.index: dict[str, Location] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        offset = self.handle.tell()
        pad = -offset % ALIGN
        self.handle.write(b"\0" * pad)
        data = tensor.detach().to("cpu").contiguous()
        raw = data.reshape(-1).view(torch.uint8).numpy()  # (nbytes,) a view, written without a copy
        self.handle.write(memoryview(raw))
        self.index[name] = Location(str(self.path), offset + pad, raw.size, data.dtype, tuple(data.shape))

    def finish(self) -> DiskStore:
        self.handle.close()
        manifest = {
            n: {"offset": loc.offset, "nbytes": loc.nbytes, "dtype": _NAMES[loc.dtype], "shape": list(loc.shape)}
            for n, loc in self.index.items()
        }
        (self.folder / "llmslim-offload.json").write_text(json.dumps(manifest))
        return DiskStore(self.index)
