"""The hardware a plan targets: GPU, CPU and disk capacities, and the bandwidths that bound decoding."""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass, field

from llmslim.quant.native import cpu_half_matmul_is_native

GiB = 2**30
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)
_COUNT = re.compile(r"^\s*(\d+)\s*x\s*(.+)$", re.IGNORECASE)

# Defaults for the tokens/s bound: an RTX 4090-class GPU (1008 GB/s), PCIe 4.0 x16 in practice,
# this project's measured CPU GEMV bandwidth (DESIGN.md: ~25 GB/s), a PCIe 4.0 NVMe drive.
DEFAULT_BANDWIDTH = {"gpu": 1000e9, "pcie": 25e9, "cpu": 25e9, "disk": 3e9}
GPU_RESERVE = int(0.75 * GiB)  # CUDA context and allocator slack per GPU
CPU_RESERVE = int(1.0 * GiB)  # Python, torch and transformers themselves


def parse_size(value: str | int | float) -> int:
    """Bytes of a size such as `24GiB`, `80GB`, `1.5T` or a plain number of bytes.

    Raises:
        ValueError: naming the value and the accepted forms.
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not 0 <= value < float("inf"):
            raise ValueError(f"a size must be a finite number of bytes >= 0, got {value!r}")
        return int(value)
    match = _SIZE.match(value) if isinstance(value, str) else None
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"a size must look like 24GiB, 80GB, 512MiB or a number of bytes, got {value!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def parse_gpus(values: list[str] | None) -> list[int]:
    """GPU capacities from `--gpu` values: each `24GiB`, or `4x24GiB` for four of them."""
    sizes = []
    for value in values or []:
        match = _COUNT.match(str(value))
        count, size = (int(match.group(1)), parse_size(match.group(2))) if match else (1, parse_size(value))
        if count < 1 or size <= 0:
            raise ValueError(f"--gpu must be a positive size such as 24GiB or 2x24GiB, got {value!r}")
        sizes += [size] * count
    return sizes


def parse_bandwidth(value: str | int | float) -> float:
    """Bytes per second of `25GB/s` (or `25GB`)."""
    return float(parse_size(str(value).removesuffix("/s") if isinstance(value, str) else value))


@dataclass
class Hardware:
    """Capacities (bytes) and bandwidths (bytes/s) of the machine a plan is for.

    Args:
        gpus: memory of each GPU (empty: compute on the CPU).
        cpu: host memory llmslim may use.
        disk: free disk space for offloaded layers.
        bandwidth: bytes/s of `gpu` memory, the `pcie` link, `cpu` memory and `disk` reads.
        cpu_half_gemm: whether the CPU multiplies bf16 matrices in hardware (AVX-512 BF16 or AMX); without it
            llmslim's prompts and training run their dense products in float32, and with it int8 prompts multiply the
            weight dequantized to bf16 instead of running LLM.int8 (`quant.kernels.int8_prompt_matmul_bf16`) (default:
            this machine's CPU).
    """

    gpus: list[int]
    cpu: int
    disk: int
    bandwidth: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_BANDWIDTH))
    cpu_half_gemm: bool = field(default_factory=cpu_half_matmul_is_native)

    def __post_init__(self) -> None:
        if isinstance(self.cpu, bool) or not isinstance(self.cpu, int) or self.cpu <= 0:
            raise ValueError(f"cpu memory must be > 0 bytes, got {self.cpu!r}")
        if isinstance(self.disk, bool) or not isinstance(self.disk, int) or self.disk < 0:
            raise ValueError(f"disk space must be >= 0 bytes, got {self.disk!r}")
        if not all(isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in self.gpus):
            raise ValueError(f"gpus must list each GPU's memory in bytes (> 0), got {self.gpus!r}")
        unknown = set(self.bandwidth) - set(DEFAULT_BANDWIDTH)
        if unknown:
            raise ValueError(f"bandwidth keys must be among {list(DEFAULT_BANDWIDTH)}, got {sorted(unknown)}")
        self.bandwidth = {**DEFAULT_BANDWIDTH, **self.bandwidth}
        bad = {
            k: v for k, v in self.bandwidth.items() if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < float("inf")
        }
        if bad:
            raise ValueError(f"bandwidths must be bytes/s > 0, got {bad}")

    @property
    def compute(self) -> str:
        return "gpu" if self.gpus else "cpu"

    def describe(self) -> str:
        gpus = ", ".join(f"{g / GiB:.0f} GiB" for g in self.gpus) or "none"
        return f"GPUs: {gpus}; CPU RAM {self.cpu / GiB:.0f} GiB; disk {self.disk / GiB:.0f} GiB"


def total_ram() -> int:
    """This machine's RAM (Linux /proc/meminfo), or 16 GiB where unknown."""
    return _meminfo("MemTotal") or 16 * GiB


def available_ram() -> int:
    """Memory a new allocation can get now without swapping (MemAvailable), or the total where unknown."""
    return _meminfo("MemAvailable") or total_ram()


def _meminfo(field_name: str) -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith(f"{field_name}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def free_disk(path: str | os.PathLike = ".") -> int:
    return shutil.disk_usage(path).free


def detected_gpus() -> list[int]:
    """Memory of each visible CUDA GPU (empty without CUDA; initializes CUDA only if torch says it is there)."""
    import torch

    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_properties(i).total_memory for i in range(torch.cuda.device_count())]


def this_machine(gpus: list[int] | None = None, cpu: int | None = None, disk: int | None = None, bandwidth: dict | None = None) -> Hardware:
    """A `Hardware` with the given values, the rest detected on this machine."""
    return Hardware(
        gpus=detected_gpus() if gpus is None else gpus,
        cpu=total_ram() if cpu is None else cpu,
        disk=free_disk() if disk is None else disk,
        bandwidth=dict(bandwidth or {}),
    )
