"""Build and load llmslim's small C kernels (compiled once per machine, cached, loaded with ctypes).

The kernels are plain C with pthreads and no Python or torch headers, so a build takes about a
second with the system compiler. Without a compiler `load()` returns None and callers fall back
to the reference math in `formats.py` (correct, slower).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

from llmslim.paths import cache_dir

logger = logging.getLogger(__name__)

_SOURCES = ("quant4.c",)
_FLAGS = ("-O3", "-march=native", "-pthread", "-shared", "-fPIC", "-std=c11")


def cpu_flags() -> list[str]:
    """This CPU's feature flags as /proc/cpuinfo lists them (empty where there is none)."""
    try:
        line = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return []
    return line.partition(":")[2].split()


def cpu_half_matmul_is_native() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AVX-512 BF16 or AMX); elsewhere torch emulates them."""
    return bool({"avx512_bf16", "amx_bf16"} & set(cpu_flags()))


def _cpu_fingerprint() -> str:
    """What -march=native depends on: the CPU's flags (a cached build is only reused on the same kind)."""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return flags


def _build_key(sources: list[Path], compiler: str) -> str:
    h = hashlib.sha256()
    for src in sources:
        h.update(src.read_bytes())
    h.update(" ".join((compiler, *_FLAGS, platform.machine(), _cpu_fingerprint())).encode())
    return h.hexdigest()[:16]


def _compile(sources: list[Path], target: Path, compiler: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        tmp_lib = Path(tmp) / target.name
        cmd = [compiler, *_FLAGS, *map(str, sources), "-o", str(tmp_lib), "-lm"]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        os.replace(tmp_lib, target)  # atomic: a concurrent build never sees a half-written library


@lru_cache(maxsize=1)
def load() -> ctypes.CDLL | None:
    """The compiled kernel library, building it on first use; None when it cannot be built."""
    if os.environ.get("LLMSLIM_NO_NATIVE") == "1":
        return None
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if compiler is None:
        logger.warning("no C compiler found: 4-bit quantization uses the slower pure-torch path")
        return None
    sources = [Path(__file__).parent / "csrc" / name for name in _SOURCES]
    target = cache_dir() / "kernels" / f"llmslim_cpu_{_build_key(sources, compiler)}.so"
    if not target.exists():
        try:
            _compile(sources, target, compiler)
        except (OSError, subprocess.CalledProcessError) as err:
            detail = getattr(err, "stderr", "") or str(err)
            logger.warning("building llmslim's CPU kernels failed, using the pure-torch path: %s", detail)
            return None
    lib = ctypes.CDLL(str(target))
    ptr, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.llmslim_quantize_4bit.argtypes = [ptr, i32, i64, i64, ptr, ptr, ptr, ptr, i32]
    lib.llmslim_quantize_int8_rows.argtypes = [ptr, i32, i64, i64, ptr, ptr, i32]
    lib.llmslim_quantize_4bit.restype = lib.llmslim_quantize_int8_rows.restype = i32
    return lib


_OPS_SOURCES = ("ops_cpu.cpp",)
_OPS_FLAGS = ("-O3", "-march=native", "-std=c++17", "-fopenmp")  # -fopenmp: at::parallel_for is serial without it


@lru_cache(maxsize=1)
def load_ops() -> bool:
    """Build (once per machine, cached) and load the torch operators in `csrc/ops_cpu.cpp`.

    They register as `torch.ops.llmslim.*` and run on torch's intra-op thread pool. Returns False,
    after a warning, when they cannot be built (no C++ compiler or ninja); callers then use the
    slower pure-torch path.
    """
    if os.environ.get("LLMSLIM_NO_NATIVE") == "1":
        return False
    import torch

    if hasattr(torch.ops, "llmslim") and hasattr(torch.ops.llmslim, "mm_4bit"):
        return True
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        logger.warning("no C++ compiler found: 4-bit matmuls on CPU dequantize the weight each call (slower)")
        return False
    try:
        from torch.utils import cpp_extension

        sources = [Path(__file__).parent / "csrc" / name for name in _OPS_SOURCES]
        key = hashlib.sha256()
        for src in sources:
            key.update(src.read_bytes())
        key.update(" ".join((compiler, *_OPS_FLAGS, torch.__version__, platform.machine(), _cpu_fingerprint())).encode())
        name = f"llmslim_ops_{key.hexdigest()[:16]}"
        build_dir = cache_dir() / "kernels" / name
        build_dir.mkdir(parents=True, exist_ok=True)
        library = build_dir / f"{name}.so"
        if library.exists():
            torch.ops.load_library(str(library))
        else:
            cpp_extension.load(
                name=name,
                sources=[str(s) for s in sources],
                extra_cflags=list(_OPS_FLAGS),
                extra_ldflags=["-fopenmp"],  # resolves to the libgomp.so.1 torch has already loaded
                build_directory=str(build_dir),
                is_python_module=False,
                verbose=False,
            )
    except (OSError, RuntimeError, subprocess.CalledProcessError) as err:
        detail = "\n".join(str(err).splitlines()[-20:])
        logger.warning("building llmslim's CPU matmul kernels failed; 4-bit matmuls dequantize each call (slower): %s", detail)
        return False
    _register_fakes()
    return True


def _register_fakes() -> None:
    """Shape functions of the operators, so that torch.compile (FakeTensor tracing) goes through them."""
    import torch

    def mm_fake(x, codes, *args):
        n = args[-3] if len(args) >= 8 else args[-2]  # mm_4bit: (..., n, group, row_stride); mm_int4_q8: (..., n, group)
        return x.new_empty((x.shape[0], n))

    def dequantize_fake(codes, lut, scales, zeros, nested_absmax, nested_code, nested_offset, n, k, group, row_stride, dtype):
        return codes.new_empty((n, k), dtype=dtype)

    def cpu_layout_fake(packed, absmax, lut, n, k, block):
        return packed.new_empty((n, k), dtype=torch.bfloat16)

    def gemv_4bit_fake(x, packed, absmax, lut, n, k, block):
        return x.new_empty((x.shape[0], n))

    def gemv_int8_fake(x, weight, row_absmax):
        return x.new_empty((x.shape[0], weight.shape[0]))

    def multi_fake(x, packed, absmax, lut, ns, block):
        return [x.new_empty((x.shape[0], n)) for n in ns]

    def i16_multi_fake(x, codes, lut, scales, nested_absmax, nested_code, nested_offset, ns, block):
        return [x.new_empty((x.shape[0], n)) for n in ns]

    def like_fake(x, *args):
        return torch.empty_like(x)

    def lean_qkv_fake(x, norm_weight, eps, kind, weights, scales, lut, biases, ns, block, cos, sin, head_dim):
        return tuple(x.new_empty((1, n // head_dim, 1, head_dim)) for n in ns)

    def int8_multi_fake(x, weights, row_absmax):
        return [x.new_empty((x.shape[0], w.shape[0])) for w in weights]

    fakes = {
        "gemv_4bit_multi": multi_fake,
        "lean_qkv": lean_qkv_fake,
        "lean_out": lambda x, q, k, v, scale, kind, weights, scales, lut, biases, ns, block, norm_weight, eps: torch.empty_like(x),
        "rms_norm_rows": like_fake,
        "add_rms_norm_rows": lambda x, y, weight, eps: (torch.empty_like(x), torch.empty_like(x)),
        "rotary_rows": like_fake,
        "silu_mul_rows": like_fake,
        "attend_one_rows": lambda q, k, v, scale: q.new_empty((1, q.shape[1] * q.shape[3])),
        "attend_prompt_rows": lambda q, k, v, scale: q.new_empty((1, q.shape[2], q.shape[1] * q.shape[3])),
        "mm_4bit": mm_fake,
        "mm_int4_q8": mm_fake,
        "mm_4bit_q8": mm_fake,
        "mm_4bit_i16": mm_fake,
        "block_scales_f32": lambda scales, nested_absmax, nested_code, nested_offset, blocks_per_row: scales.new_empty(
            scales.shape, dtype=torch.float32
        ),
        "mm_4bit_i16_multi": i16_multi_fake,
        "dequantize_4bit": dequantize_fake,
        "dequantize_4bit_cpu_layout": cpu_layout_fake,
        "gemv_4bit_cpu_layout": gemv_4bit_fake,
        "gemv_int8_rows": gemv_int8_fake,
        "gemv_int8_rows_multi": int8_multi_fake,
        "dequantize_int8_rows_bf16": lambda q, absmax: q.new_empty(q.shape, dtype=torch.bfloat16),
    }
    for name, fake in fakes.items():
        if hasattr(torch.ops.llmslim, name):
            try:
                torch.library.register_fake(f"llmslim::{name}")(fake)
            except RuntimeError:  # already registered in this process
                pass
