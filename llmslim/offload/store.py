"""Where offloaded (still quantized) tensors live between uses: CPU RAM, or files mapped from disk.

`CpuStore` keeps each tensor in host memory (pinned when a GPU will read it, so copies overlap
compute). `DiskStore` maps files into the address space without reading them: a tensor is a view
of the mapping, its pages are read on first touch and dropped again with `release` (madvise
DONTNEED), so they do not stay resident. Its files are the shards of a quantized llmslim
checkpoint (safetensors, read in place) or one file `DiskWriter` fills while a float checkpoint is
quantized on load: a file of that load's own in the offload folder (`llmslim.offload.folder`),
removed with the store.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from llmslim.offload.folder import OffloadFiles

FAULT_AROUND = 64 * 2**10
ALIGN = 64  # the CPU kernels want 64-byte aligned weights (see quant.kernels.aligned)
_SAFETENSORS_DTYPES = {
    "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
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
    dtype: torch.dtype | None  # None: a safetensors dtype llmslim does not read
    shape: tuple[int, ...]


class DiskStore:
    """Offloaded tensors read in place from memory-mapped files; pages released after each use.

    Args:
        index: where each tensor is.
        files: the `OffloadFiles` that own the files, when this load wrote them: kept alive (and the
            files kept on disk) as long as this store.
    """

    def __init__(self, index: dict[str, Location], files: OffloadFiles | None = None):
        self.index = index
        self.files = files
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
        unknown = [f"{loc.file}: {name}" for name, loc in index.items() if loc.dtype is None]
        if unknown:
            raise ValueError(f"tensors of a dtype llmslim does not read, so cannot offload in place: {unknown[:3]}")
        return cls(index)


def safetensors_index(file: Path) -> dict[str, Location]:
    """Key -> `Location` of every tensor of a safetensors file, from its header alone.

    Raises:
        ValueError: the file is not a complete safetensors file (truncated, corrupt or another format).
    """
    size = os.path.getsize(file)
    with open(file, "rb") as handle:
        prefix = handle.read(8)
        header_len = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else None
        if header_len is None or header_len > size - 8:
            raise _unreadable(file, f"{size} bytes cannot hold a header of {header_len} bytes" if header_len else f"only {size} bytes")
        try:
            header = json.loads(handle.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise _unreadable(file, f"its header is not JSON: {err}") from err
    if not isinstance(header, dict):
        raise _unreadable(file, "its header is not a JSON object")
    start = 8 + header_len
    index = {key: _location(file, key, info, start) for key, info in header.items() if key != "__metadata__"}
    for key, loc in index.items():
        if loc.offset + loc.nbytes > size:
            raise _unreadable(file, f"tensor {key} ends at byte {loc.offset + loc.nbytes} but the file has {size} bytes")
    return index


def _location(file: Path, key: str, info, start: int) -> Location:
    try:
        dtype, shape, (begin, end) = _SAFETENSORS_DTYPES.get(info["dtype"]), tuple(info["shape"]), info["data_offsets"]
        expected = math.prod(shape) * (dtype.itemsize if dtype is not None else 0)
        consistent = 0 <= begin <= end and (dtype is None or end - begin == expected)  # an unknown dtype: bounds alone
    except (KeyError, TypeError, ValueError) as err:
        raise _unreadable(file, f"tensor {key!r} has a malformed entry {info!r}") from err
    if not consistent:
        raise _unreadable(file, f"tensor {key} spans bytes {begin}..{end}, not the {expected} bytes of {info['dtype']} {list(shape)}")
    return Location(str(file), start + begin, end - begin, dtype, shape)


def _unreadable(file: Path, why: str) -> ValueError:
    return ValueError(f"{file}: not a readable safetensors file ({why}); it may be truncated or corrupt: re-download or re-save it")


class DiskWriter:
    """Appends tensors to a file of its own in `folder`, at 64-byte aligned offsets; `finish` returns their `DiskStore`.

    The file is created by the first `add` (a load that offloads nothing writes nothing), is named for
    this load alone (`llmslim.offload.folder`), so other loads into the same folder neither truncate
    nor read it, and is written as `<name>.bin.partial`, renamed to `<name>.bin` with its manifest
    `<name>.json` once complete. Both are removed when the returned store is garbage collected.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.files: OffloadFiles | None = None
        self.handle = None
        self.index: dict[str, Location] = {}

    @property
    def path(self) -> Path | None:
        """The finished file (None until the first `add`)."""
        return self.files.path(".bin") if self.files is not None else None

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self.handle is None:
            self.files = OffloadFiles(self.folder)
            self.handle = open(self.files.path(".bin.partial"), "wb")  # noqa: SIM115 - closed in finish()
        offset = self.handle.tell()
        pad = -offset % ALIGN
        self.handle.write(b"\0" * pad)
        data = tensor.detach().to("cpu").contiguous()
        raw = data.reshape(-1).view(torch.uint8).numpy()  # (nbytes,) a view, written without a copy
        self.handle.write(memoryview(raw))
        self.index[name] = Location(str(self.path), offset + pad, raw.size, data.dtype, tuple(data.shape))

    def finish(self) -> DiskStore:
        if self.handle is not None:
            self.handle.close()
            os.replace(self.files.path(".bin.partial"), self.path)
            manifest = {
                n: {"offset": loc.offset, "nbytes": loc.nbytes, "dtype": _NAMES[loc.dtype], "shape": list(loc.shape)}
                for n, loc in self.index.items()
            }
            self.files.path(".json").write_text(json.dumps(manifest))
        return DiskStore(self.index, self.files)
