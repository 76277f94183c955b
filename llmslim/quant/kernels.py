"""Fastest correct implementation per device of the operations defined in `formats.py`.

- CUDA: bitsandbytes' kernels.
- CPU: llmslim's C kernels for 4-bit and int8 quantization (bitsandbytes' CPU 4-bit quantizer
  is pure torch and runs at ~60 Mparam/s on 2 cores, which would dominate load time),
  bitsandbytes' CPU kernels for 8-bit blockwise (double quantization) and 4-bit dequantization.
- CPU matmuls in bfloat16 for a few tokens (decode), on a CPU with AVX-512 BF16/VNNI: llmslim's
  torch operators (`csrc/ops_cpu.cpp`). NF4/FP4 run on bitsandbytes' 32-row interleaved CPU
  layout, into which the layer repacks its codes at its first inference call (`gemv_4bit_cpu_layout`;
  bitsandbytes' own kernel on that layout where llmslim's operators could not be built); int8 on
  the stored row-major weight with 16-bit activations (`gemv_int8_rows`, also built for AVX2, where
  it takes int8 layers and the int8 decode head); int4 on the stored codes.
  Prompts: one dequantization then the dense GEMM, and for int8 the LLM.int8 decomposition on
  `torch._int_mm`. float32 inputs: the table kernels with split activations, and PyTorch's
  weight-only int8 kernel.
- Anywhere else, or when a backend is missing: the reference math in `formats.py`.

Every function here is tested against `formats.py`.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import math
from functools import cache, lru_cache

import torch

from llmslim.quant import formats, native

logger = logging.getLogger(__name__)

_CHUNK_ELEMENTS = 1 << 22  # fp16 input is converted to float32 in chunks of this many elements


def _not_the_kernels_hub_notice(record: logging.LogRecord) -> bool:
    # bitsandbytes 0.50 looks for an optional CPU GEMM in the `kernels` package (it downloads from a
    # model hub) and warns that it is missing; its own CPU kernel, which llmslim uses, needs none
    return not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


@lru_cache(maxsize=1)
def bnb_functional():
    """`bitsandbytes.functional`, imported on first use (None when bitsandbytes is missing)."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_not_the_kernels_hub_notice)
    try:
        import bitsandbytes.functional as bnb_f
    except ImportError:  # pragma: no cover - bitsandbytes is a hard dependency
        return None
    return bnb_f


def _ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def _native_input(weight: torch.Tensor) -> tuple[ctypes.CDLL, torch.Tensor, int] | None:
    """The C library and a contiguous CPU float32/bf16 view of `weight`, or None to fall back."""
    lib = native.load()
    if lib is None or weight.device.type != "cpu":
        return None
    flat = weight.detach().contiguous()
    if flat.dtype not in (torch.float32, torch.bfloat16):
        flat = flat.float()
    return lib, flat, int(flat.dtype == torch.bfloat16)


def _native_quantize_4bit(weight: torch.Tensor, fmt: str, block_size: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    native_input = _native_input(weight)
    if native_input is None or block_size > 4096:
        return None
    lib, flat, is_bf16 = native_input
    n = flat.numel()
    bounds, order = formats.rounding_bounds_4bit(fmt)
    codes = torch.empty(((n + 1) // 2, 1), dtype=torch.uint8)
    absmax = torch.empty(-(-n // block_size), dtype=torch.float32)
    threads = torch.get_num_threads()
    rc = lib.llmslim_quantize_4bit(_ptr(flat), is_bf16, n, block_size, _ptr(bounds), _ptr(order), _ptr(codes), _ptr(absmax), threads)
    if rc != 0:  # pragma: no cover - arguments are validated by SlimConfig
        raise RuntimeError(f"llmslim_quantize_4bit failed with code {rc} for block_size={block_size}")
    return codes, absmax


def _double_quantize(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    bnb_f = bnb_functional()
    if bnb_f is None:
        return formats.double_quantize(absmax)
    offset = absmax.mean()
    codes, state2 = bnb_f.quantize_blockwise(absmax - offset, blocksize=formats.NESTED_BLOCK_SIZE)
    return codes, state2.absmax, offset


def quantize_4bit(weight: torch.Tensor, fmt: str, block_size: int, double_quant: bool) -> formats.FourBitWeight:
    """Quantize a float weight to NF4/FP4 on its own device.

    Codes and float absmax equal `formats.quantize_4bit`; with double quantization the absmax is
    quantized by bitsandbytes' own 8-bit kernel on every path, so the stored bytes equal what
    `bitsandbytes.functional.quantize_4bit` stores whether or not the C kernel could be built.
    """
    shape = tuple(weight.shape)
    bnb_f = bnb_functional()
    if weight.device.type == "cuda" and bnb_f is not None:
        codes, state = bnb_f.quantize_4bit(weight, blocksize=block_size, compress_statistics=double_quant, quant_type=fmt)
        return four_bit_from_state(codes, state, shape)
    packed = _native_quantize_4bit(weight, fmt, block_size)
    if packed is None:
        reference = formats.quantize_4bit(weight, fmt, block_size, double_quant=False)
        packed = reference.codes, reference.absmax
    codes, absmax = packed
    nested_absmax = nested_offset = None
    if double_quant:
        absmax, nested_absmax, nested_offset = _double_quantize(absmax)
    return formats.FourBitWeight(codes, absmax, nested_absmax, nested_offset, shape, fmt, block_size)


def four_bit_from_state(codes: torch.Tensor, state, shape: tuple[int, ...]) -> formats.FourBitWeight:
    """Our container from a bitsandbytes `QuantState`."""
    nested = state.state2 is not None
    return formats.FourBitWeight(
        codes=codes,
        absmax=state.absmax,
        nested_absmax=state.state2.absmax if nested else None,
        nested_offset=state.offset.reshape(()) if nested else None,
        shape=shape,
        fmt=state.quant_type,
        block_size=state.blocksize,
    )


def quant_state(w: formats.FourBitWeight, dtype: torch.dtype):
    """A bitsandbytes `QuantState` viewing our tensors (no copies), for its kernels and its format."""
    bnb_f = bnb_functional()
    device = w.codes.device
    state2 = None
    if w.nested_absmax is not None:
        state2 = bnb_f.QuantState(
            absmax=w.nested_absmax,
            code=formats.dynamic_map().to(device),
            blocksize=formats.NESTED_BLOCK_SIZE,
            dtype=torch.float32,
        )
    return bnb_f.QuantState(
        absmax=w.absmax,
        shape=torch.Size(w.shape),
        code=formats.code_4bit(w.fmt).to(device),
        blocksize=w.block_size,
        quant_type=w.fmt,
        dtype=dtype,
        offset=w.nested_offset,
        state2=state2,
    )


def dequantize_4bit(w: formats.FourBitWeight, dtype: torch.dtype) -> torch.Tensor:
    """Dequantize to `dtype` (bitsandbytes' kernels on CPU and CUDA)."""
    bnb_f = bnb_functional()
    n = math.prod(w.shape)
    # bitsandbytes sends odd lengths to a torch.compile'd fallback (seconds of compile per shape), and
    # its CPU operator's shape function rejects our flat view while torch.compile traces
    if bnb_f is None or n % 2 or torch.compiler.is_compiling():
        return formats.dequantize_4bit(w, dtype)
    # Its CPU kernel takes one absmax per block *within a row*; our blocks run over the flattened
    # weight (as bitsandbytes quantizes it), so hand it one long row and reshape after.
    flat = dataclasses.replace(w, shape=(n,))
    return bnb_f.dequantize_4bit(w.codes, quant_state(flat, dtype)).view(w.shape)


# ---- NF4/FP4 on CPU in bitsandbytes' CPU layout -------------------------------------------------
#
# bitsandbytes 0.50 reads the codes of 32 output rows interleaved (`torch.ops.bitsandbytes.gemv_4bit`),
# so one sequential stream feeds 32 accumulators, with the absmax in bfloat16, transposed to
# (K / block, N). llmslim's `gemv_4bit_cpu_layout` reads the same codes with fewer instructions per
# byte (on the AMX Xeon of benchmarks/README.md ~15-17 GB/s against bitsandbytes' ~13 GB/s over the
# 1.1B shape's 154 decode matmuls) and its absmax copy tile by tile, (N / 32, K / block, 32), which
# streams beside the codes (~1.25x on a Zen 5 EPYC). `SlimLinear4bit` repacks its codes into that layout at its
# first CPU inference call and repacks them back for saving (bitsandbytes' `Linear4bit` does the
# same); these functions convert.

CPU_PACK_ROWS = 32  # output rows whose codes the CPU layout interleaves


# Whether this CPU multiplies bf16 matrices in hardware (AVX-512 BF16 or AMX). Without it PyTorch's bf16 / fp16 GEMMs
# are emulated: a QLoRA step of SmolLM2 (4 x 128 tokens, nf4, checkpointing) took 77 s in bf16 and 5.2 s in float32 on
# the AVX2 EPYC this was measured on. A constant (read once), so that compiled code reads it without tracing a file read.
CPU_HALF_MATMUL_IS_NATIVE = native.cpu_half_matmul_is_native()


@lru_cache(maxsize=1)
def bnb_cpu_4bit_kernel() -> bool:
    """Whether bitsandbytes' CPU 4-bit kernel runs here (it needs AVX-512 BF16)."""
    bnb_f = bnb_functional()
    try:
        return bnb_f is not None and bool(bnb_f.has_avx512bf16()) and hasattr(torch.ops.bitsandbytes, "gemv_4bit")
    except (AttributeError, RuntimeError):  # pragma: no cover - an older bitsandbytes
        return False


def cpu_packable(shape: tuple[int, int], block_size: int) -> bool:
    """Whether a (N, K) 4-bit weight fits the CPU layout (N a multiple of 32, blocks inside rows)
    and a kernel for it runs here."""
    n, k = shape
    fits = n % CPU_PACK_ROWS == 0 and k % block_size == 0 and 32 <= block_size <= 4096
    return fits and (decode_kernels() or bnb_cpu_4bit_kernel())


_REPACK_ROWS = 256  # rows converted at a time: the temporaries stay ~3 bytes x 256 x K


def pack_4bit_for_cpu(w: formats.FourBitWeight) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes in bitsandbytes' CPU layout, absmax as bfloat16 (N / 32, K / block, 32)) of a row-major 4-bit weight.

    The absmax copy is tile by tile: each 32-row tile's block scales in a row, read in the order of its codes
    (`csrc/ops_cpu.cpp` says why); `bnb_cpu_absmax` gives bitsandbytes' (K / block, N) of it."""
    n, k = w.shape
    stored = w.codes.view(n, k // 2)
    packed = torch.empty(n // CPU_PACK_ROWS, k // 2, 32, dtype=torch.uint8)
    for start in range(0, n, _REPACK_ROWS):
        rows = stored[start : start + _REPACK_ROWS]
        tiles = len(rows) // CPU_PACK_ROWS
        codes = torch.stack([rows >> 4, rows & 0xF], dim=-1)  # (rows, K / 2, 2): one code per byte
        codes = codes.view(tiles, CPU_PACK_ROWS, k // 2, 2).transpose(1, 2).reshape(tiles, k // 2, 64)
        torch.bitwise_or(codes[..., 32:] << 4, codes[..., :32], out=packed[start // CPU_PACK_ROWS :][:tiles])  # rows 16-31 high
    blocks = k // w.block_size
    absmax = w.float_absmax().view(n // CPU_PACK_ROWS, CPU_PACK_ROWS, blocks).transpose(1, 2).to(torch.bfloat16).contiguous()
    return packed.view(-1, 1), absmax  # (N / 32, K / block, 32)


def bnb_cpu_absmax(absmax: torch.Tensor) -> torch.Tensor:
    """`pack_4bit_for_cpu`'s absmax (N / 32, K / block, 32) in bitsandbytes' CPU layout, (K / block, N)."""
    return absmax.transpose(0, 1).reshape(absmax.shape[1], -1)


def unpack_4bit_from_cpu(packed: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """Inverse of `pack_4bit_for_cpu` for the codes: the row-major (bitsandbytes' stored) layout."""
    n, k = shape
    tiled = packed.view(n // CPU_PACK_ROWS, k // 2, 32)
    stored = torch.empty(n, k // 2, dtype=torch.uint8)
    for start in range(0, n, _REPACK_ROWS):
        p = tiled[start // CPU_PACK_ROWS : (start + _REPACK_ROWS) // CPU_PACK_ROWS]
        codes = torch.cat([p & 0xF, p >> 4], dim=-1)  # (tiles, K / 2, 64)
        codes = codes.view(len(p), k // 2, CPU_PACK_ROWS, 2).transpose(1, 2).reshape(-1, k // 2, 2)  # (rows, K / 2, 2)
        torch.bitwise_or(codes[..., 0] << 4, codes[..., 1], out=stored[start : start + len(p) * CPU_PACK_ROWS])
    return stored.view(-1, 1)


PACKED_GEMV_MAX_TOKENS = 64  # beyond this many rows, llmslim's dequantization + a dense GEMM beats the kernel's tiles


def linear_4bit_packed(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, int], fmt: str, block_size: int):
    """`x @ W.T` (bfloat16 `x`) for a weight in the CPU layout: for a few tokens llmslim's kernel
    (bitsandbytes' where it could not be built); for a prompt, one bfloat16 dequantization
    (`csrc/ops_cpu.cpp`) then the dense GEMM."""
    n, k = shape
    if x.numel() // k > PACKED_GEMV_MAX_TOKENS and _ops_loaded():
        dense = torch.ops.llmslim.dequantize_4bit_cpu_layout(packed, absmax, _code_4bit(fmt), n, k, block_size)
        return torch.nn.functional.linear(x, dense)
    if decode_kernels():
        out = torch.ops.llmslim.gemv_4bit_cpu_layout(x.reshape(-1, k), packed, absmax, _code_4bit(fmt), n, k, block_size)
        return out.view(*x.shape[:-1], n)
    # bitsandbytes' kernel, where llmslim's could not be built: its absmax layout, rebuilt per call (a 1/32 of the codes)
    return torch.ops.bitsandbytes.gemv_4bit(x, packed, list(shape), bnb_cpu_absmax(absmax), _code_4bit(fmt), block_size)


@cache
def _code_4bit(fmt: str) -> torch.Tensor:
    return formats.code_4bit(fmt)  # one tensor per format, built once (it is only read)


def quantize_int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise int8 weight quantization (same bits as `formats.quantize_int8_rows`).

    CPU: one pass of the C kernel (the torch expression makes ~6 float32 passes and their
    temporaries fragment the heap on large models). Elsewhere: the torch expression.
    """
    native_input = _native_input(weight)
    if native_input is None or weight.dim() != 2:
        return formats.quantize_int8_rows(weight)
    lib, flat, is_bf16 = native_input
    rows, cols = flat.shape
    q = torch.empty((rows, cols), dtype=torch.int8)
    absmax = torch.empty(rows, dtype=torch.float32)
    if lib.llmslim_quantize_int8_rows(_ptr(flat), is_bf16, rows, cols, _ptr(q), _ptr(absmax), torch.get_num_threads()) != 0:
        raise RuntimeError(f"llmslim_quantize_int8_rows failed for a weight of shape {(rows, cols)}")  # pragma: no cover
    return q, absmax


_INT8_BLOCK_ROWS = 4096  # rows quantized at a time by `quantize_int8_blocks` (bounds its float32 temporaries)


def quantize_int8_blocks(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`formats.quantize_int8_blocks` (blocks of `formats.INT8_BLOCK` columns, as `gemv_int8_rows` reads them), a few
    thousand rows at a time, so that a vocabulary-sized head's temporaries stay small."""
    parts = [formats.quantize_int8_blocks(weight[r0 : r0 + _INT8_BLOCK_ROWS]) for r0 in range(0, weight.shape[0], _INT8_BLOCK_ROWS)]
    return torch.cat([q for q, _ in parts]), torch.cat([absmax for _, absmax in parts])


DECODE_MAX_TOKENS = 32  # up to this many rows (tiles of 4) the packed 4-bit kernels beat dequantize + GEMM
INT8_DECODE_MAX_TOKENS = 8  # beyond this many rows LLM.int8 on torch._int_mm beats the weight-only int8 kernel
# up to this many 16-bit rows int4 takes the integer-dot kernel (each row alone: two int8 rows per 32 activations, the
# second holding what the first's rounding left over). On for one-token decode: scored with every token through it,
# SmolLM2 int4 g64 reads 41.72 against 41.74 (20k tokens, bench_quality's llmslim-int4-g64-q8; with one int8 row, as
# llama.cpp, it was 41.90, +0.40%). One-token matmuls on an AMX Xeon, 2 threads, against the bf16-table kernel: AVX-512
# build 1.01-1.17x (5632 x 2048: 0.30 vs 0.35 ms), AVX2 build 0.90-1.53x (49152 x 2048: 5.0 vs 7.7 ms); the AVX2 EPYC
# gave 2.4x with one int8 row. Each row re-reads the weight, so batches of rows keep the tiled kernel.
# bench_quality's `-q8` cases raise it to score whole windows with decode's numerics
INT4_Q8_MAX_TOKENS = 1


def _ops_usable(x: torch.Tensor, in_features: int) -> bool:
    """Whether llmslim's CPU matmul operators can take `x` (rows of `in_features`) for decode."""
    return x.device.type == "cpu" and in_features % 64 == 0 and x.numel() // in_features <= DECODE_MAX_TOKENS and _ops_loaded()


# torch.compile treats these as constants (evaluated once while tracing) instead of tracing into
# the build and file checks behind them
@torch.compiler.assume_constant_result
def _ops_loaded() -> bool:
    return native.load_ops()


@torch.compiler.assume_constant_result
def _has_vnni_kernel() -> bool:
    return _vnni_kernel()


@lru_cache(maxsize=1)
def _vnni_kernel() -> bool:
    return bool(torch.ops.llmslim.simd_available().item())


@torch.compiler.assume_constant_result
def _has_int4_q8_kernel() -> bool:
    return _int4_q8_kernel()


@lru_cache(maxsize=1)
def _int4_q8_kernel() -> bool:
    """Whether `mm_int4_q8` (int4 x int8 activations) is built here: AVX-512 VNNI or AVX2."""
    return bool(torch.ops.llmslim.int4_q8_available().item())


@torch.compiler.assume_constant_result
def decode_kernels() -> bool:
    """Whether llmslim's AVX-512 BF16/VNNI decode operators (`gemv_4bit_cpu_layout`, the fused layer operators) run here."""
    return _ops_loaded() and _vnni_kernel()


@torch.compiler.assume_constant_result
def fused_decode_ops() -> bool:
    """Whether the lean decode step's fused row operators (norms, rotary, SiLU-times-up) run here: any CPU they were
    built for (vectorized for AVX-512 BF16 and AVX2)."""
    return _ops_loaded()


def lean_layer_ops() -> bool:
    """Whether a lean decode step can run as two operators (`lean_qkv`, `lean_out`): the AVX2 and AVX-512 BF16 builds
    (4-bit and int8 weights; which 4-bit layout depends on the build)."""
    return int8_rows_kernel()


@torch.compiler.assume_constant_result
def int8_rows_kernel() -> bool:
    """Whether llmslim's `gemv_int8_rows` (int8 weights x 16-bit activations, exact integer products) runs here: built
    for AVX-512 VNNI and for AVX2."""
    return _ops_loaded() and _int8_rows_built()


@lru_cache(maxsize=1)
def _int8_rows_built() -> bool:
    return bool(torch.ops.llmslim.int8_rows_available().item())


@torch.compiler.assume_constant_result
def prompt_attention_kernel() -> bool:
    """Whether llmslim's `attend_prompt_rows` (a bf16 prompt's causal attention) runs here: built for AVX-512 BF16."""
    return _ops_loaded() and _vnni_kernel()


NF4_INT8_LEVELS = formats.int8_levels("nf4")  # NF4's values x 127, rounded (at most 0.5 / 127 of the absmax off)
# up to this many 16-bit rows (decode, batched or not) NF4 takes the integer-dot kernel where it is built (AVX2), each
# row quantized alone. Off (0), on two counts. Numerics: with the activations as two int8 rows (as int4's, whose cost
# that made ~0) SmolLM2 reads 37.66 against 37.44 (+0.58%, 20k tokens, bench_quality's llmslim-nf4-q8; 37.81 with one
# row): NF4's values rounded to int8 steps of 1/127 cost the rest, over issue 21's 0.1% budget. Speed: with two rows
# it no longer beats the table kernel (`mm_4bit`): a decoded token's 4-bit matmuls take 1.08x as long on an AVX2 EPYC,
# 2 threads (SmolLM2 11.13 vs 10.31 ms, 1.1B shape 54.74 vs 50.88 ms; benchmarks/bench_q8_kernels.py).
NF4_Q8_MAX_TOKENS = 0


def _nf4_q8_usable(x: torch.Tensor, w: formats.FourBitWeight) -> bool:
    """Whether `mm_4bit_q8` takes this decode step: NF4, a 16-bit token on CPU, whole blocks per row, the AVX2 build."""
    out_features, in_features = w.shape
    tokens = x.numel() // in_features
    return (
        w.fmt == "nf4"
        and tokens <= NF4_Q8_MAX_TOKENS
        and x.dtype in (torch.bfloat16, torch.float16)
        and x.device.type == "cpu"
        and in_features % 64 == 0
        and in_features % w.block_size == 0
        and _ops_loaded()
        and _has_nf4_q8_kernel()
    )


@torch.compiler.assume_constant_result
def _has_nf4_q8_kernel() -> bool:
    return _nf4_q8_kernel()


@lru_cache(maxsize=1)
def _nf4_q8_kernel() -> bool:
    """Whether `mm_4bit_q8` is built here (the AVX2 build; AVX-512 BF16 machines decode NF4 in bitsandbytes' CPU layout)."""
    return bool(torch.ops.llmslim.nf4_q8_available().item())


# NF4/FP4 decode rows on an AVX2 CPU take `mm_4bit_i16` (16-bit integer levels x int16 activations, exact products; more
# precise than the table kernel's bf16 levels) up to this many rows; 0 sends them to the table kernel (`mm_4bit`).
# AVX2 EPYC, one thread, 2048 x 5632: 0.70 vs 1.08 ms (benchmarks/bench_q8_kernels.py measures it per token).
I16_4BIT_MAX_TOKENS = DECODE_MAX_TOKENS


def _i16_usable(x: torch.Tensor, w: formats.FourBitWeight) -> bool:
    """Whether `mm_4bit_i16` takes these rows: at most `I16_4BIT_MAX_TOKENS` of them, and `i16_takes`."""
    return x.numel() // w.shape[1] <= I16_4BIT_MAX_TOKENS and i16_takes(x, w)


def i16_takes(x: torch.Tensor, w: formats.FourBitWeight) -> bool:
    """Whether `mm_4bit_i16` takes rows like `x` (whatever their number): NF4/FP4, 16-bit rows on CPU, blocks of 64 or
    more that divide the rows, the AVX2 build."""
    return (
        x.dtype in (torch.bfloat16, torch.float16)
        and x.device.type == "cpu"
        and w.block_size >= 64
        and w.shape[1] % w.block_size == 0
        and _ops_loaded()
        and _has_i16_kernel()
    )


@torch.compiler.assume_constant_result
def _has_i16_kernel() -> bool:
    return _i16_kernel()


@lru_cache(maxsize=1)
def _i16_kernel() -> bool:
    """Whether `mm_4bit_i16` is built here (the AVX2 build)."""
    return bool(torch.ops.llmslim.i16_4bit_available().item())


# bitsandbytes' 8-bit map as a module constant: a compiled step reads it as one (tracing formats.dynamic_map(), which
# builds it with tolist(), breaks the graph)
DYNAMIC_MAP = formats.dynamic_map()


def _scale_args(w: formats.FourBitWeight) -> tuple:
    nested = w.nested_absmax is not None
    return (
        w.absmax,
        None,
        w.nested_absmax if nested else None,
        DYNAMIC_MAP if nested else None,
        w.nested_offset if nested else None,  # a tensor: float() of it would break a compiled graph
    )


def linear_4bit(x: torch.Tensor, w: formats.FourBitWeight, dtype: torch.dtype) -> torch.Tensor:
    """`x @ W.T` for an NF4/FP4 weight (no bias); `x` is already in `dtype`."""
    if x.device.type == "cuda" and bnb_functional() is not None:
        return linear_4bit_bnb_ops(x, w, formats.code_4bit(w.fmt).to(x.device), formats.dynamic_map().to(x.device), dtype)
    out_features, in_features = w.shape
    if _nf4_q8_usable(x, w):
        absmax, _, nested_absmax, nested_map, nested_offset = _scale_args(w)
        flat = x.reshape(-1, in_features)
        out = torch.ops.llmslim.mm_4bit_q8(
            flat, w.codes, NF4_INT8_LEVELS, absmax, nested_absmax, nested_map, nested_offset, out_features, w.block_size
        )
        return out.view(*x.shape[:-1], out_features)
    if _i16_usable(x, w):
        absmax, _, nested_absmax, nested_map, nested_offset = _scale_args(w)
        flat = x.reshape(-1, in_features)
        out = torch.ops.llmslim.mm_4bit_i16(
            flat, w.codes, formats.code_4bit(w.fmt), absmax, nested_absmax, nested_map, nested_offset, out_features, w.block_size
        )
        return out.view(*x.shape[:-1], out_features)
    if _ops_usable(x, in_features):
        flat = x.reshape(-1, in_features)
        out = torch.ops.llmslim.mm_4bit(flat, w.codes, formats.code_4bit(w.fmt), *_scale_args(w), out_features, w.block_size, in_features)
        return out.view(*x.shape[:-1], out_features)
    return torch.nn.functional.linear(x, dequantize_4bit(w, dtype))


def quantize_int4(weight: torch.Tensor, group_size: int, refine: bool) -> formats.Int4Weight:
    """llmslim int4 (`formats.quantize_int4`; its torch code is the implementation on every device)."""
    return formats.quantize_int4(weight.detach(), group_size, refine)


def dequantize_int4(w: formats.Int4Weight, dtype: torch.dtype) -> torch.Tensor:
    """Dequantize an int4 weight to `dtype` (llmslim's CPU operator, else the reference)."""
    out_features, in_features = w.shape
    if w.codes.device.type == "cpu" and _ops_loaded():
        return torch.ops.llmslim.dequantize_4bit(
            w.codes,
            formats.int4_lut(),
            w.scale,
            w.zero,
            None,
            None,
            0.0,
            out_features,
            in_features,
            w.group_size,
            w.groups * w.group_size,
            dtype,
        )
    return formats.dequantize_int4(w, dtype)


def linear_int4(x: torch.Tensor, w: formats.Int4Weight, dtype: torch.dtype) -> torch.Tensor:
    """`x @ W.T` for an int4 weight (no bias); `x` is already in `dtype`.

    One 16-bit token (decode) on a CPU with AVX-512 VNNI or AVX2: activations quantized to int8 per 32
    (as llama.cpp does) times the unpacked codes in integer dot products, exact otherwise; a few
    tokens: the bf16 table kernel (exact products); more: dequantize once, dense GEMM.
    """
    out_features, in_features = w.shape
    tokens = x.numel() // in_features
    q8 = tokens <= INT4_Q8_MAX_TOKENS and x.dtype in (torch.bfloat16, torch.float16) and x.device.type == "cpu"
    if q8 and in_features % 64 == 0 and _ops_loaded() and _has_int4_q8_kernel():
        out = torch.ops.llmslim.mm_int4_q8(x.reshape(-1, in_features), w.codes, w.scale, w.zero, out_features, w.group_size)
        return out.view(*x.shape[:-1], out_features)
    if _ops_usable(x, in_features):
        flat = x.reshape(-1, in_features)
        out = torch.ops.llmslim.mm_4bit(
            flat, w.codes, formats.int4_lut(), w.scale, w.zero, None, None, None, out_features, w.group_size, w.groups * w.group_size
        )
        return out.view(*x.shape[:-1], out_features)
    return torch.nn.functional.linear(x, dequantize_int4(w, dtype))


INT8PACK_ALIGNMENT = 64  # bytes; the kernel's AVX-512 loads fault on a weight mapped at another offset


def aligned(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`, or an aligned copy of it when it is a CPU tensor not on a 64-byte boundary.

    transformers leaves pre-quantized tensors mapped from the safetensors file at arbitrary offsets
    and safetensors' pread buffers are 32-byte aligned; the int8pack kernel needs 64 bytes, and
    every load path must pick the same kernel for bit-identical logits.
    """
    if tensor.device.type == "cpu" and tensor.data_ptr() % INT8PACK_ALIGNMENT:
        return tensor.clone()  # torch's CPU allocator aligns to 64 bytes
    return tensor


def int8pack_usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether PyTorch's CPU weight-only int8 kernel can take these operands.

    It reads rows in chunks of 16 (other lengths crash or return inf), needs an aligned weight
    (a tensor memory-mapped from a safetensors file may not be), and in float32 it is a GEMV:
    for more than a few float32 rows the dense GEMM is much faster.
    """
    tokens = x.numel() // x.shape[-1]
    return (
        hasattr(torch, "_weight_int8pack_mm")
        and x.shape[-1] % 16 == 0
        and weight.data_ptr() % INT8PACK_ALIGNMENT == 0
        and not (x.dtype == torch.float32 and tokens > 4)
    )


INT8_PROMPT_CHUNK_ELEMENTS = 1 << 22  # output elements per chunk of weight rows in the LLM.int8 prompt path
INT8_ALL_OUTLIERS_FRACTION = 0.5  # above this share of outlier columns, every column takes the 16-bit product


def int8_decomposed_matmul(x: torch.Tensor, weight: torch.Tensor, row_absmax: torch.Tensor, threshold: float) -> torch.Tensor:
    """LLM.int8 (Dettmers et al., 2022) on `torch._int_mm`: `x @ W.T` for a 2-D `x`, float32 result.

    Activation columns holding any |x| > `threshold` (outlier features) are multiplied in x's
    16-bit dtype with the matching weight columns dequantized; the rest is quantized vector-wise (one absmax per
    token row, int8) and multiplied with the int8 weight in an int32 GEMM, then rescaled by both
    absmaxes. `threshold` 0 quantizes every column. When more than `INT8_ALL_OUTLIERS_FRACTION` of
    the columns are outliers, every column is treated as one: the int8 GEMM would then cost more
    than it saves, and the 16-bit product of all columns is the more precise result (a trained
    model rarely gets there: SmolLM2 has 17% at threshold 1.5; a random one with unit-variance
    activations does). The weight's rows go in chunks of about
    `INT8_PROMPT_CHUNK_ELEMENTS` outputs, so that the int32, float and dequantized-column
    temporaries stay small next to the output even for a vocabulary-sized head.
    """
    xf = x.float()
    outliers = (xf.abs() > threshold).any(dim=0).nonzero().squeeze(1) if threshold > 0 else None  # (n_outliers,)
    # the outlier product runs in x's 16-bit dtype (float32 for float32 x), as in the paper
    dtype = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.float32
    tokens, rows = x.shape[0], weight.shape[0]
    out = torch.empty(tokens, rows, dtype=torch.float32, device=x.device)
    step = max(8, INT8_PROMPT_CHUNK_ELEMENTS // max(tokens, 1) // 8 * 8)  # _int_mm wants multiples of 8
    if outliers is not None and outliers.numel() > INT8_ALL_OUTLIERS_FRACTION * x.shape[1]:
        x16 = x.to(dtype)  # every column an outlier: no int8 part
        for r0 in range(0, rows, step):
            w, scale = weight[r0 : r0 + step], row_absmax[r0 : r0 + step] / 127.0
            out[:, r0 : r0 + step] = x16 @ (w.float() * scale.unsqueeze(1)).to(dtype).T
        return out
    has_outliers = outliers is not None and outliers.numel() > 0
    regular = xf.index_fill(1, outliers, 0.0) if has_outliers else xf
    x_absmax = regular.abs().amax(dim=1, keepdim=True).clamp(min=1e-30)  # (tokens, 1)
    xq = torch.round(regular * (127.0 / x_absmax)).to(torch.int8)
    x_outliers = x.index_select(1, outliers).to(dtype) if has_outliers else None  # (tokens, n_outliers)
    for r0 in range(0, rows, step):
        w, scale = weight[r0 : r0 + step], row_absmax[r0 : r0 + step] / 127.0
        chunk = out[:, r0 : r0 + step]
        torch.mul(torch._int_mm(xq, w.t()).float(), x_absmax / 127.0, out=chunk)
        chunk.mul_(scale)
        if has_outliers:
            w_cols = (w.index_select(1, outliers).float() * scale.unsqueeze(1)).to(dtype)  # (chunk rows, n_outliers)
            chunk += (x_outliers @ w_cols.T).float()
    return out


def linear_int8(x: torch.Tensor, weight: torch.Tensor, row_absmax: torch.Tensor, threshold: float) -> torch.Tensor:
    """`x @ W.T` for a row-wise int8 weight (no bias).

    CUDA: `linear_int8_bnb_ops`. CPU, up to `INT8_DECODE_MAX_TOKENS` tokens (any number on the AVX2 build,
    `_int8_prompts_on_rows`): llmslim's `gemv_int8_rows` for bfloat16 `x`
    (exact int8 products with 16-bit activations), else PyTorch's weight-only int8 kernel; neither
    materialises a float weight. CPU, more tokens (prompts): bf16 rows on a CPU with hardware bf16 GEMMs take the
    weight dequantized to bf16 (`int8_prompt_matmul_bf16`: every column in 16 bits), on the AVX2 build `gemv_int8_rows`;
    else the LLM.int8 decomposition on `torch._int_mm`.
    """
    if x.device.type == "cuda" and (torch.compiler.is_compiling() or bnb_functional() is not None):
        return linear_int8_bnb_ops(x, weight, row_absmax, threshold)
    tokens = x.numel() // x.shape[-1]
    if x.device.type == "cpu" and tokens > INT8_DECODE_MAX_TOKENS and x.dtype == torch.bfloat16 and CPU_HALF_MATMUL_IS_NATIVE:
        return int8_prompt_matmul_bf16(x.reshape(-1, x.shape[-1]), weight, row_absmax).view(*x.shape[:-1], weight.shape[0])
    if x.device.type == "cpu" and tokens > INT8_DECODE_MAX_TOKENS and _int8_prompts_on_rows(x, weight, row_absmax):
        out = torch.ops.llmslim.gemv_int8_rows(x.reshape(-1, x.shape[-1]), weight, row_absmax)
        return out.view(*x.shape[:-1], weight.shape[0])
    if x.device.type == "cpu" and tokens > INT8_DECODE_MAX_TOKENS and int_mm_usable(x, weight):
        out = int8_decomposed_matmul(x.reshape(-1, x.shape[-1]), weight, row_absmax, threshold)
        return out.to(x.dtype).view(*x.shape[:-1], weight.shape[0])
    if int8_decode_usable(x, weight, row_absmax):
        out = torch.ops.llmslim.gemv_int8_rows(x.reshape(-1, x.shape[-1]), weight, row_absmax)
        return out.view(*x.shape[:-1], weight.shape[0])
    if not int8pack_usable(x, weight):
        return torch.nn.functional.linear(x, formats.dequantize_int8_rows(weight, row_absmax, x.dtype))
    scales = row_absmax / 127.0  # (out,) float32
    rounded = scales.to(x.dtype)
    flat = x.reshape(-1, x.shape[-1]).contiguous()  # (tokens, in)
    out = torch._weight_int8pack_mm(flat, weight, rounded)  # (tokens, out)
    if x.dtype != torch.float32:
        # the kernel takes scales in x's dtype; a bf16 scale alone is off by up to 0.4% per row,
        # so undo that rounding with a float32 per-column correction
        out = (out.float() * (scales / rounded.float())).to(x.dtype)
    return out.view(*x.shape[:-1], weight.shape[0])


INT8_BF16_CHUNK_ELEMENTS = 1 << 24  # weight elements turned into bf16 at a time in `int8_prompt_matmul_bf16` (32 MiB)


def int8_prompt_matmul_bf16(x: torch.Tensor, weight: torch.Tensor, row_absmax: torch.Tensor) -> torch.Tensor:
    """`x @ W.T` for a bf16 prompt (2-D `x`) on a CPU with hardware bf16 GEMMs (AMX, AVX-512 BF16), bf16 result.

    The weight is dequantized to bf16 as `formats.dequantize_int8_rows` does (each element q x absmax / 127, rounded
    once; `_int8_rows_bf16`) and one bf16 GEMM multiplies it with `x`: the product of `x` with the dequantized weight,
    every activation column in 16 bits, so `int8_threshold` has nothing to choose (LLM.int8 rounds the other columns
    to int8: less precise, and slower here: its int8 GEMM ran at 0.31x the bf16 prompt speed on the 1.1B shape on an
    AMX Xeon; on a Zen 5 EPYC, 128 tokens x a 2048 x 2048 weight, 2 threads, 11.1 ms with most columns outliers
    against bf16 `F.linear`'s 1.25). Until 2026-12-06 the codes went into the GEMM unscaled and each output column was
    scaled after it: a pass over the output, through dtype conversions, that cost SmolLM2's 512-token int8 prompt
    ~120 ms of ~510 on that EPYC. Rows go in chunks of about `INT8_BF16_CHUNK_ELEMENTS` weights, which bounds the bf16
    copy for a vocabulary-sized head.
    """
    tokens, rows = x.shape[0], weight.shape[0]
    step = max(1, INT8_BF16_CHUNK_ELEMENTS // max(weight.shape[1], 1))
    if rows <= step:
        return torch.nn.functional.linear(x, _int8_rows_bf16(weight, row_absmax))
    out = torch.empty(tokens, rows, dtype=x.dtype)
    for r0 in range(0, rows, step):
        out[:, r0 : r0 + step] = torch.nn.functional.linear(x, _int8_rows_bf16(weight[r0 : r0 + step], row_absmax[r0 : r0 + step]))
    return out


def _int8_rows_bf16(weight: torch.Tensor, row_absmax: torch.Tensor) -> torch.Tensor:
    """`formats.dequantize_int8_rows(weight, row_absmax, torch.bfloat16)`, the same bits: in one vectorized pass where
    llmslim's AVX-512 operators are built (the torch expression makes a float32 copy of the weight first)."""
    if weight.is_cpu and weight.is_contiguous() and row_absmax.dtype == torch.float32 and row_absmax.is_contiguous() and decode_kernels():
        return torch.ops.llmslim.dequantize_int8_rows_bf16(weight, row_absmax)
    return formats.dequantize_int8_rows(weight, row_absmax, torch.bfloat16)


def _int8_prompts_on_rows(x: torch.Tensor, weight: torch.Tensor, row_absmax: torch.Tensor) -> bool:
    """Whether a bf16 prompt takes `gemv_int8_rows` instead of LLM.int8: on the AVX2 build (no AVX-512 VNNI, where
    `torch._int_mm` has no fast int8 GEMM). EPYC, 2 threads, 32 tokens x a 2048 x 2048 weight: LLM.int8 49.3 ms,
    bf16 `F.linear` 13.4, `gemv_int8_rows` 1.9 (576 x 576: 4.10 / 1.12 / 0.18; 128 tokens x 5632 x 2048: 636 / 145 /
    32). Its products are exact on int16 activations (per 128 columns), so the prompt is no less precise than LLM.int8
    and `int8_threshold` has nothing to choose, as on AMX."""
    return int8_decode_usable(x, weight, row_absmax) and _ops_loaded() and _has_i16_kernel()


def int8_decode_usable(x: torch.Tensor, weight: torch.Tensor, row_absmax: torch.Tensor) -> bool:
    """Whether llmslim's `gemv_int8_rows` takes these operands (bfloat16 CPU input, K % 32 == 0; `row_absmax` one per
    row, or per row and block of `formats.INT8_BLOCK` columns)."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.bfloat16
        and x.shape[-1] % 32 == 0
        and weight.is_contiguous()
        and row_absmax.dtype == torch.float32
        and int8_rows_kernel()
    )


def int8_blocks_usable(weight: torch.Tensor) -> bool:
    """Whether `gemv_int8_rows` can decode with a block-wise int8 copy of this 16-bit weight (`quantize_int8_blocks`):
    its kernel is built here and takes the bfloat16 activations such a weight is multiplied with."""
    return weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and weight.shape[-1] % 32 == 0 and int8_rows_kernel()


def linear_int8_blocks(x: torch.Tensor, weight: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """`x @ W.T` (bfloat16 `x`) for a block-wise int8 weight (`quantize_int8_blocks`) on `gemv_int8_rows`."""
    out = torch.ops.llmslim.gemv_int8_rows(x.reshape(-1, x.shape[-1]), weight, absmax)
    return out.view(*x.shape[:-1], weight.shape[0])


def int_mm_usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `torch._int_mm` takes these shapes on CPU (it wants K and N multiples of 8)."""
    return hasattr(torch, "_int_mm") and x.shape[-1] % 8 == 0 and weight.shape[0] % 8 == 0 and x.dtype != torch.float32


# ---- CUDA: bitsandbytes' operators called directly, and PyTorch's int4 kernel -------------------
#
# bitsandbytes' Python entry points (`matmul_4bit`, `matmul` with a `MatmulLtState`) build their state
# objects and run autograd Functions on every call: tens of microseconds per layer, which at batch 1
# is most of a token's time on a GPU, and Python that a compiled decode step would have to trace.
# Its operators (`torch.ops.bitsandbytes.*`, registered with shape functions) do the same math
# with nothing around them, trace without graph breaks, and replay inside CUDA graphs. The tables
# they read (the 4-bit code, the 8-bit map of double quantization) are passed in by the layer,
# which keeps device copies (`SlimLinear4bit.cuda_tables`), so no call builds or copies one.


def linear_4bit_bnb_ops(x: torch.Tensor, w: formats.FourBitWeight, code: torch.Tensor, nested_map: torch.Tensor, dtype: torch.dtype):
    """`x @ W.T` for an NF4/FP4 weight on bitsandbytes' operators (its CUDA kernels on a GPU).

    One token: its GEMV kernel (`gemv_4bit`, the fast path of `bitsandbytes.matmul_4bit`); more:
    the weight dequantized by its kernel, then the dense GEMM. `code` is the format's 16 values and
    `nested_map` the 8-bit dynamic map, both float32 on x's device. Any device with the operators
    (bitsandbytes' default implementations run them on CPU, which the tests use).
    """
    out_features, in_features = w.shape
    if x.numel() == in_features and in_features % w.block_size == 0:
        # compiled steps too: writing this product as plain tensor operations for inductor to fuse into one reduction
        # kernel decoded the 1.1B shape at 204 tok/s on an H200, against 250 for these three launches
        absmax = _float_absmax_bnb_ops(w, nested_map)
        return torch.ops.bitsandbytes.gemv_4bit(x, w.codes, [out_features, in_features], absmax, code, w.block_size)
    return torch.nn.functional.linear(x, dequantize_4bit_bnb_ops(w, nested_map, dtype))


def dequantize_4bit_bnb_ops(w: formats.FourBitWeight, nested_map: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An NF4/FP4 weight dequantized by bitsandbytes' operator, `(out, in)` in `dtype`."""
    return torch.ops.bitsandbytes.dequantize_4bit(w.codes, _float_absmax_bnb_ops(w, nested_map), w.block_size, w.fmt, list(w.shape), dtype)


def _float_absmax_bnb_ops(w: formats.FourBitWeight, nested_map: torch.Tensor) -> torch.Tensor:
    """The per-block float32 absmax, undoing double quantization with bitsandbytes' operator."""
    if w.nested_absmax is None:
        return w.absmax
    absmax = torch.ops.bitsandbytes.dequantize_blockwise(w.absmax, w.nested_absmax, nested_map, formats.NESTED_BLOCK_SIZE, torch.float32)
    return absmax + w.nested_offset


def linear_int8_bnb_ops(x: torch.Tensor, weight: torch.Tensor, row_absmax: torch.Tensor, threshold: float) -> torch.Tensor:
    """`x @ W.T` for a row-wise int8 weight on bitsandbytes' operators (its CUDA kernels on a GPU).

    Up to `INT8_DECODE_MAX_TOKENS` tokens (decode), every column takes the 16-bit product: the
    weight in x's dtype (int8 values are exact in bf16 / fp16) times x, rescaled per row in float32.
    That is LLM.int8's decomposition with every column an outlier column, its most precise case, as
    the CPU decode kernels do; at this size reading the weight, not the arithmetic, costs the time.
    More tokens: LLM.int8 as bitsandbytes computes it, on its operators: the activations quantized
    per row in float16 with the columns holding any |x| >= `threshold` set aside, the int8 GEMM
    rescaled by both absmaxes, plus the outlier columns' 16-bit product with the matching weight
    columns dequantized.
    """
    flat = x.reshape(-1, x.shape[-1])
    if flat.shape[0] == 1 and torch.compiler.is_compiling():
        # a compiled step: multiply and sum as plain operations, which inductor fuses into one reduction kernel reading
        # the int8 weight once (a bf16 copy of it, as F.linear needs, moves five bytes per weight instead of one): the
        # 1.1B shape decoded at 279 tok/s on an H200 this way, 245 through F.linear
        out = ((weight.float() * flat.float()).sum(dim=-1, keepdim=True).t() * (row_absmax / 127.0)).to(x.dtype)
    elif flat.shape[0] <= INT8_DECODE_MAX_TOKENS:
        out = (torch.nn.functional.linear(flat, weight.to(x.dtype)).float() * (row_absmax / 127.0)).to(x.dtype)
    else:
        quantized, row_stats, outlier_cols = torch.ops.bitsandbytes.int8_vectorwise_quant(flat.to(torch.float16), threshold)
        out, _ = torch.ops.bitsandbytes.int8_mixed_scaled_mm(flat, quantized, weight, row_stats, row_absmax, outlier_cols, None)
    return out.view(*x.shape[:-1], weight.shape[0])


INT4PACK_INNER_K_TILES = 8  # PyTorch's tinygemm layout: K in tiles of 8 x 16
INT4PACK_GROUP_SIZES = (32, 64, 128, 256)


def int4pack_usable(shape: tuple[int, int], group_size: int, device: torch.device) -> bool:
    """Whether PyTorch's CUDA int4 kernel (`_weight_int4pack_mm`, gpt-fast's and torchao's tinygemm) takes this weight."""
    out_features, in_features = shape
    return (
        device.type == "cuda"
        and hasattr(torch.ops.aten, "_weight_int4pack_mm")
        and group_size in INT4PACK_GROUP_SIZES
        and in_features % (INT4PACK_INNER_K_TILES * 16) == 0
        and in_features % group_size == 0
        and out_features % 8 == 0
    )


def pack_int4_for_cuda(w: formats.Int4Weight) -> torch.Tensor:
    """The codes of an int4 weight in PyTorch's CUDA int4 layout.

    That kernel computes `(q - 8) * scale + zero` per group, llmslim int4's own formula, and takes its
    input as (out, in / 2) bytes with the even column in the high nibble: exactly the stored codes
    (`formats.pack_nibbles`, row-major) viewed as rows, so only its tiling changes.
    """
    out_features, in_features = w.shape
    rows = w.codes.view(out_features, in_features // 2)
    return torch.ops.aten._convert_weight_to_int4pack(rows.contiguous(), INT4PACK_INNER_K_TILES)


def int4pack_scales_and_zeros(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """The kernel's (groups, out, 2) bfloat16 scale-and-zero tensor from the stored float16 (out, groups) ones."""
    return torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16)


def linear_int4_cuda(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int, out_features: int):
    """`x @ W.T` for an int4 weight whose codes are in PyTorch's CUDA int4 layout (`pack_int4_for_cuda`); bf16 `x`.

    The kernel reads scale and zero in bfloat16: the stored float16 values rounded to 8 significant
    bits (a relative change of at most 2^-9 per group, far below the 4-bit rounding of the weight).
    """
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    out = torch.ops.aten._weight_int4pack_mm(flat, packed, group_size, int4pack_scales_and_zeros(scale, zero))
    return out.view(*x.shape[:-1], out_features)


def unpack_int4_from_cuda(packed: torch.Tensor, w: formats.Int4Weight) -> torch.Tensor:
    """The stored (row-major, `formats.pack_nibbles`) codes of a weight in the CUDA int4 layout.

    PyTorch has no inverse of its packing, so the kernel itself reads the codes out: with scale 1 and
    zero 8 every group's formula gives back `q`, a small integer that bfloat16 holds exactly, and an
    identity input returns them column by column.
    """
    out_features, in_features = w.shape
    groups = in_features // w.group_size
    unit = torch.stack(
        [torch.ones(groups, out_features, device=packed.device), torch.full((groups, out_features), 8.0, device=packed.device)], dim=-1
    ).to(torch.bfloat16)
    eye = torch.eye(in_features, dtype=torch.bfloat16, device=packed.device)
    codes = []
    for start in range(0, in_features, _INT4_UNPACK_ROWS):
        rows = eye[start : start + _INT4_UNPACK_ROWS]
        codes.append(torch.ops.aten._weight_int4pack_mm(rows, packed, w.group_size, unit).round().to(torch.uint8))  # (rows, out)
    q = torch.cat(codes).t()  # (out, in)
    return formats.pack_codes(q)


_INT4_UNPACK_ROWS = 1024  # input columns read out per kernel call when unpacking
