"""The fast paths of `llmslim.quant.kernels`, each checked against the reference math in `formats.py`."""

from __future__ import annotations

import os
import shutil

import bitsandbytes.functional as bnb_f
import pytest
import torch

from llmslim.quant import formats, kernels, native

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCK_SIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
SHAPES = ((3, 7), (37, 129), (1, 63), (64, 64), (9, 1000))  # odd sizes, partial last blocks, n above 4096


# tests of the C-kernel path itself (it is off with LLMSLIM_NO_NATIVE=1 or without a C compiler)
needs_native = pytest.mark.skipif(
    os.environ.get("LLMSLIM_NO_NATIVE") == "1" or not (os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")),
    reason="llmslim's C kernel is off (LLMSLIM_NO_NATIVE=1) or cannot be built (no C compiler)",
)


def _randn(shape: tuple[int, ...], dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _assert_same_4bit(a: formats.FourBitWeight, b: formats.FourBitWeight) -> None:
    assert torch.equal(a.codes, b.codes)
    assert a.absmax.dtype == b.absmax.dtype and torch.equal(a.absmax, b.absmax)
    assert (a.shape, a.fmt, a.block_size) == (b.shape, b.fmt, b.block_size)
    for x, y in ((a.nested_absmax, b.nested_absmax), (a.nested_offset, b.nested_offset)):
        assert (x is None and y is None) or torch.equal(x, y)


@pytest.fixture
def no_native(monkeypatch):
    """kernels without the C library, as with LLMSLIM_NO_NATIVE=1 (`native.load` is cached, so patch it)."""
    monkeypatch.setattr(native, "load", lambda: None)


# --- 4-bit quantization -----------------------------------------------------------------------------------------------


@needs_native
def test_native_library_builds_and_is_used(monkeypatch):
    lib = native.load()
    assert lib is not None
    assert native.load() is lib  # built once, then cached
    calls = []
    real = formats.quantize_4bit
    monkeypatch.setattr(formats, "quantize_4bit", lambda *a, **k: calls.append(a) or real(*a, **k))
    kernels.quantize_4bit(_randn((4, 64)), "nf4", 64, double_quant=False)
    assert calls == []  # the C kernel did the work, not the reference


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", formats.FOUR_BIT_FORMATS)
def test_quantize_4bit_equals_reference(fmt, dtype, block_size):
    for i, shape in enumerate(SHAPES):
        x = _randn(shape, dtype, seed=block_size + i)
        _assert_same_4bit(kernels.quantize_4bit(x, fmt, block_size, double_quant=False), formats.quantize_4bit(x, fmt, block_size, False))


@pytest.mark.parametrize("fmt", formats.FOUR_BIT_FORMATS)
def test_quantize_4bit_equals_reference_on_edge_values(fmt):
    code = formats.code_4bit(fmt)
    bounds, _ = formats.rounding_bounds_4bit(fmt)
    x = torch.cat([code, bounds, torch.nextafter(bounds, torch.tensor(2.0)), torch.zeros(70), -code]) * 0.37
    for block_size in (32, 64, 128):
        _assert_same_4bit(kernels.quantize_4bit(x, fmt, block_size, False), formats.quantize_4bit(x, fmt, block_size, False))


def test_quantize_4bit_of_a_non_contiguous_weight():
    x = _randn((48, 20)).t()  # (20, 48), a transposed view
    _assert_same_4bit(kernels.quantize_4bit(x, "nf4", 64, False), formats.quantize_4bit(x.contiguous(), "nf4", 64, False))


@needs_native
@pytest.mark.parametrize("block_size", (32, 64, 256, 4096))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", formats.FOUR_BIT_FORMATS)
def test_double_quant_equals_bitsandbytes(fmt, dtype, block_size):
    for i, shape in enumerate(((37, 129), (1, 63), (300, 64))):  # 300 * 64 / 32 = 600 absmax: three nested blocks
        x = _randn(shape, dtype, seed=i)
        w = kernels.quantize_4bit(x, fmt, block_size, double_quant=True)
        codes, state = bnb_f.quantize_4bit(x, blocksize=block_size, quant_type=fmt, compress_statistics=True)
        assert torch.equal(w.codes, codes)
        assert w.absmax.dtype == torch.uint8 and torch.equal(w.absmax, state.absmax)
        assert torch.equal(w.nested_absmax, state.state2.absmax)
        assert w.nested_offset.shape == () and torch.equal(w.nested_offset, state.offset)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", formats.FOUR_BIT_FORMATS)
def test_quantize_4bit_without_native_library_equals_reference(no_native, fmt, dtype):
    assert native.load() is None
    for i, shape in enumerate(SHAPES):
        x = _randn(shape, dtype, seed=i)
        _assert_same_4bit(kernels.quantize_4bit(x, fmt, 64, False), formats.quantize_4bit(x, fmt, 64, False))
        # double quantization goes through bitsandbytes' 8-bit kernel on every path
        w = kernels.quantize_4bit(x, fmt, 64, True)
        codes, state = bnb_f.quantize_4bit(x, blocksize=64, quant_type=fmt, compress_statistics=True)
        assert torch.equal(w.codes, codes) and torch.equal(w.absmax, state.absmax)
        assert torch.equal(w.nested_absmax, state.state2.absmax) and torch.equal(w.nested_offset, state.offset)


@needs_native
@pytest.mark.parametrize("shape, block_size", [((1, 63), 64), ((300, 64), 32)], ids=str)
def test_double_quant_bytes_do_not_depend_on_the_native_library(monkeypatch, shape, block_size):
    x = _randn(shape, seed=3)
    with_native = kernels.quantize_4bit(x, "nf4", block_size, double_quant=True)
    monkeypatch.setattr(native, "load", lambda: None)
    _assert_same_4bit(with_native, kernels.quantize_4bit(x, "nf4", block_size, double_quant=True))


def test_quantize_4bit_without_bitsandbytes_uses_the_reference(no_native, monkeypatch):
    monkeypatch.setattr(kernels, "bnb_functional", lambda: None)
    x = _randn((37, 129), torch.bfloat16)
    w = kernels.quantize_4bit(x, "nf4", 64, double_quant=True)
    _assert_same_4bit(w, formats.quantize_4bit(x, "nf4", 64, True))
    assert torch.equal(kernels.dequantize_4bit(w, torch.bfloat16), formats.dequantize_4bit(w, torch.bfloat16))


# --- 4-bit dequantization ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("double_quant", (False, True), ids=("plain", "double_quant"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", formats.FOUR_BIT_FORMATS)
@pytest.mark.parametrize("shape, block_size", [((8, 128), 64), ((3, 256), 256), ((5, 64), 32), ((2, 1024), 1024)], ids=str)
def test_dequantize_4bit_equals_reference_for_even_rows(shape, block_size, fmt, dtype, double_quant):
    w = kernels.quantize_4bit(_randn(shape, dtype), fmt, block_size, double_quant)
    out = kernels.dequantize_4bit(w, dtype)
    assert out.dtype == dtype and out.shape == shape
    assert torch.equal(out, formats.dequantize_4bit(w, dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", formats.FOUR_BIT_FORMATS)
def test_dequantize_4bit_equals_reference_for_odd_rows(fmt, dtype):
    for shape in ((3, 7), (37, 129), (1, 63)):
        w = kernels.quantize_4bit(_randn(shape, dtype), fmt, 64, double_quant=True)
        assert torch.equal(kernels.dequantize_4bit(w, dtype), formats.dequantize_4bit(w, dtype))


@pytest.mark.parametrize("shape, block_size", [((48, 96), 64), ((3, 64), 128), ((4, 576), 256)], ids=str)
def test_dequantize_4bit_equals_reference_when_blocks_straddle_rows(shape, block_size):
    w = kernels.quantize_4bit(_randn(shape), "nf4", block_size, double_quant=False)
    assert torch.equal(kernels.dequantize_4bit(w, torch.float32), formats.dequantize_4bit(w, torch.float32))


@pytest.mark.parametrize("shape, group_size", [((8, 256), 64), ((5, 384), 128), ((3, 200), 32), ((64, 2048), 64)], ids=str)
def test_dequantize_int4_to_bf16_equals_reference(shape, group_size):
    # bf16 output takes the AVX-512 path where built (32 values per step), the scalar loop for the rest
    w = kernels.quantize_int4(_randn(shape, seed=11), group_size, refine=False)
    assert torch.equal(kernels.dequantize_int4(w, torch.bfloat16), formats.dequantize_int4(w, torch.bfloat16))


@pytest.mark.parametrize("double_quant", (False, True), ids=("float32_absmax", "double_quant"))
@pytest.mark.parametrize("shape, block_size", [((6, 128), 64), ((3, 512), 256), ((32, 2048), 32)], ids=str)
def test_dequantize_op_to_bf16_equals_reference_for_nf4_blocks_inside_rows(shape, block_size, double_quant):
    # blocks inside rows (K % block == 0) take the AVX-512 path where built, with float32 or double-quantized absmax
    w = kernels.quantize_4bit(_randn(shape, seed=12), "nf4", block_size, double_quant=double_quant)
    absmax, _, nested_absmax, nested_map, nested_offset = kernels._scale_args(w)
    offset = float(nested_offset) if nested_offset is not None else 0.0
    n, k = shape
    code = formats.code_4bit("nf4")
    scales = (absmax, None, nested_absmax, nested_map, offset)
    got = torch.ops.llmslim.dequantize_4bit(w.codes, code, *scales, n, k, block_size, k, torch.bfloat16)
    assert torch.equal(got, formats.dequantize_4bit(w, torch.bfloat16))


# --- matmuls ----------------------------------------------------------------------------------------------------------


def _assert_matmul_close(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rel: float) -> None:
    """`out` equals `x @ weight.T` (computed in float32) within `rel` of the largest output."""
    expected = x.float() @ weight.float().T
    assert out.dtype == x.dtype and out.shape == expected.shape
    torch.testing.assert_close(out.float(), expected, rtol=0, atol=rel * expected.abs().max().item())


# float32 inputs: the kernels keep ~16 more bits than bf16 (split into high and low bf16 parts);
# bf16 inputs: a bf16 result (8 significant bits), and NF4 table values rounded to bf16.
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("batch", ((1,), (7,), (64,), (2, 3)), ids=str)
@pytest.mark.parametrize("in_features", (128, 65, 576))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_linear_4bit_close_to_matmul_with_dequantized_weight(dtype, in_features, batch):
    w = kernels.quantize_4bit(_randn((37, in_features)), "nf4", 64, double_quant=True)
    x = _randn((*batch, in_features), dtype, seed=1)
    out = kernels.linear_4bit(x, w, dtype)
    _assert_matmul_close(out, x, formats.dequantize_4bit(w), TOLERANCE[dtype])


@pytest.mark.parametrize("fmt", ("nf4", "fp4"))
@pytest.mark.parametrize("block_size, double_quant", ((32, False), (64, True), (128, True), (256, False)), ids=str)
@pytest.mark.parametrize("tokens", (1, 3, 8))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_mm_4bit_operator_matches_reference(fmt, block_size, double_quant, tokens, dtype):
    """The packed-code operator (decode path) for NF4/FP4, blocks that straddle rows included (576 % 256)."""
    if not native.load_ops():
        pytest.skip("llmslim's CPU operators could not be built here")
    w = kernels.quantize_4bit(_randn((29, 576), seed=3), fmt, block_size, double_quant)
    x = _randn((tokens, 576), dtype, seed=4)
    out = torch.ops.llmslim.mm_4bit(x, w.codes, formats.code_4bit(fmt), *kernels._scale_args(w), 29, block_size, 576)
    _assert_matmul_close(out, x, formats.dequantize_4bit(w), TOLERANCE[dtype])


def test_linear_4bit_without_operators_uses_dequantize(monkeypatch):
    monkeypatch.setattr(native, "load_ops", lambda: False)
    w = kernels.quantize_4bit(_randn((24, 128)), "nf4", 64, double_quant=True)
    x = _randn((1, 128), seed=1)
    weight = formats.dequantize_4bit(w)
    assert torch.equal(kernels.linear_4bit(x, w, torch.float32), torch.nn.functional.linear(x, weight))


# --- int4 -------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("group_size", (32, 64, 128))
@pytest.mark.parametrize("shape", ((7, 64), (37, 576), (5, 100), (3, 33)), ids=str)
def test_int4_minmax_error_is_at_most_half_a_step(shape, group_size):
    weight = _randn(shape, seed=5)
    w = formats.quantize_int4(weight, group_size)
    assert w.codes.dtype == torch.uint8 and w.codes.shape == ((shape[0] * shape[1] + 1) // 2, 1)
    assert w.scale.dtype == w.zero.dtype == torch.float16 and w.scale.shape == (shape[0], -(-shape[1] // group_size))
    step = w.scale.float().repeat_interleave(group_size, dim=1)[:, : shape[1]]
    err = (formats.dequantize_int4(w) - weight).abs()
    assert torch.all(err <= step * 0.5 + 2e-3 * weight.abs().max())  # half a step, plus float16 rounding of scale and zero


@pytest.mark.parametrize("group_size", (32, 64, 128))
def test_int4_refine_lowers_reconstruction_error(group_size):
    weight = torch.distributions.StudentT(3.0).sample((64, 512)) * 0.02  # heavy-tailed, like LLM weights
    plain = (formats.dequantize_int4(formats.quantize_int4(weight, group_size)) - weight).pow(2).sum()
    refined = (formats.dequantize_int4(formats.quantize_int4(weight, group_size, refine=True)) - weight).pow(2).sum()
    assert refined < 0.97 * plain


def test_int4_constant_group_is_exact():
    weight = torch.full((2, 64), 0.25)
    assert torch.equal(formats.dequantize_int4(formats.quantize_int4(weight, 32)), weight)


@pytest.mark.parametrize("shape", ((37, 576), (8, 64), (5, 100), (3, 33)), ids=str)
@pytest.mark.parametrize("group_size", (32, 64, 128))
@pytest.mark.parametrize("batch", ((1,), (7,), (64,), (2, 3)), ids=str)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_linear_int4_close_to_matmul_with_dequantized_weight(shape, group_size, batch, dtype):
    w = kernels.quantize_int4(_randn(shape, seed=6), group_size, refine=False)
    assert torch.equal(kernels.dequantize_int4(w, torch.float32), formats.dequantize_int4(w))
    x = _randn((*batch, shape[1]), dtype, seed=7)
    out = kernels.linear_int4(x, w, dtype)
    # one token goes through int8 activations (per 32, absmax): about 1e-3 relative
    rel = 1e-2 if batch == (1,) and shape[1] % 64 == 0 and dtype == torch.float32 else TOLERANCE[dtype]
    _assert_matmul_close(out, x, formats.dequantize_int4(w), rel)


def test_linear_4bit_equals_matmul_when_blocks_straddle_rows():
    w = kernels.quantize_4bit(_randn((16, 96)), "nf4", 64, double_quant=False)
    x = _randn((3, 96), seed=1)
    torch.testing.assert_close(kernels.linear_4bit(x, w, torch.float32), x @ formats.dequantize_4bit(w).T)


@pytest.mark.parametrize("batch", ((1,), (7,), (64,), (2, 3)), ids=str)
@pytest.mark.parametrize("shape", ((24, 128), (7, 48), (13, 37)), ids=str)
def test_linear_int8_equals_matmul_with_dequantized_weight_fp32(shape, batch):
    q, absmax = kernels.quantize_int8_rows(_randn(shape))
    x = _randn((*batch, shape[1]), seed=2)
    out = kernels.linear_int8(x, q, absmax, threshold=6.0)
    assert out.dtype == torch.float32 and out.shape == (*batch, shape[0])
    torch.testing.assert_close(out, x @ formats.dequantize_int8_rows(q, absmax).T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch", ((1,), (7,), (64,), (2, 3)), ids=str)
@pytest.mark.parametrize("shape", ((24, 128), (7, 48), (13, 37)), ids=str)
def test_linear_int8_close_to_matmul_with_dequantized_weight_bf16(shape, batch):
    q, absmax = kernels.quantize_int8_rows(_randn(shape, torch.bfloat16))
    x = _randn((*batch, shape[1]), torch.bfloat16, seed=2)
    out = kernels.linear_int8(x, q, absmax, threshold=6.0)
    assert out.dtype == torch.bfloat16 and out.shape == (*batch, shape[0])
    expected = x.float() @ formats.dequantize_int8_rows(q, absmax).T  # (*batch, out) float32
    # bf16 outputs (8 significant bits) and bf16 accumulation: within 1% of the largest output
    torch.testing.assert_close(out.float(), expected, rtol=0, atol=1e-2 * expected.abs().max().item())


def test_linear_int8_fallback_without_int8pack_mm(monkeypatch):
    q, absmax = kernels.quantize_int8_rows(_randn((13, 37)))
    x = _randn((7, 37), seed=2)
    expected = kernels.linear_int8(x, q, absmax, threshold=6.0)
    monkeypatch.delattr(torch, "_weight_int8pack_mm")
    torch.testing.assert_close(kernels.linear_int8(x, q, absmax, threshold=6.0), expected, rtol=1e-5, atol=1e-5)


def test_quantize_int8_rows_is_the_reference():
    w = _randn((13, 37), torch.bfloat16)
    for got, expected in zip(kernels.quantize_int8_rows(w), formats.quantize_int8_rows(w), strict=True):
        assert torch.equal(got, expected)


def test_linear_int8_with_a_misaligned_weight_does_not_use_the_aligned_kernel():
    # transformers maps pre-quantized tensors from the safetensors file at arbitrary offsets; the
    # int8pack kernel's aligned loads crashed on such a weight
    q, absmax = formats.quantize_int8_rows(torch.randn(64, 32))
    storage = torch.empty(q.numel() + 1, dtype=torch.int8)
    misaligned = storage[1:].view(64, 32)
    misaligned.copy_(q)
    x = torch.randn(5, 32, dtype=torch.bfloat16)
    assert not kernels.int8pack_usable(x, misaligned)
    expected = x.float() @ formats.dequantize_int8_rows(q, absmax).T
    got = kernels.linear_int8(x, misaligned, absmax, 6.0).float()
    assert (got - expected).abs().max() < 0.01 * expected.abs().max()


@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 5), (37, 129), (64, 256)], ids=str)
def test_int8_rows_c_kernel_equals_reference(dtype, shape):
    w = _randn(shape, dtype, seed=7)
    w[0, :3] = 0
    q, absmax = kernels.quantize_int8_rows(w)
    ref_q, ref_absmax = formats.quantize_int8_rows(w)
    assert torch.equal(q, ref_q) and torch.equal(absmax, ref_absmax)


@needs_native
def test_int8_rows_all_zero_row():
    q, absmax = kernels.quantize_int8_rows(torch.zeros(3, 16))
    assert torch.equal(q, torch.zeros(3, 16, dtype=torch.int8)) and torch.equal(absmax, torch.zeros(3))


# --- LLM.int8 on CPU ----------------------------------------------------------------------------------------------------


def _with_outlier_features(tokens: int, features: int, columns: tuple[int, ...], magnitude: float) -> torch.Tensor:
    x = _randn((tokens, features), seed=8)
    x[:, list(columns)] *= magnitude  # a few feature dimensions much larger, as in LLM activations
    return x


def test_llm_int8_decomposition_keeps_outliers_exact_enough():
    q, absmax = kernels.quantize_int8_rows(_randn((96, 256), seed=9))
    x = _with_outlier_features(64, 256, (3, 100, 201), magnitude=60.0)
    exact = x @ formats.dequantize_int8_rows(q, absmax).T
    decomposed = kernels.int8_decomposed_matmul(x, q, absmax, threshold=6.0)
    all_int8 = kernels.int8_decomposed_matmul(x, q, absmax, threshold=0.0)  # outliers quantized too
    err_decomposed = (decomposed - exact).norm() / exact.norm()
    err_all_int8 = (all_int8 - exact).norm() / exact.norm()
    assert err_decomposed < 0.01
    assert err_all_int8 > 10 * err_decomposed


def test_llm_int8_without_outliers_matches_vector_wise_quantization():
    q, absmax = kernels.quantize_int8_rows(_randn((40, 64), seed=10))
    x = _randn((20, 64), seed=11)
    xq, x_absmax = formats.quantize_int8_rows(x)  # vector-wise: one absmax per token row
    expected = (xq.float() @ q.float().T) * x_absmax.unsqueeze(1) * absmax / 127.0**2
    torch.testing.assert_close(kernels.int8_decomposed_matmul(x, q, absmax, threshold=100.0), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_llm_int8_with_mostly_outlier_columns_computes_every_column_in_16_bits(dtype):
    # past INT8_ALL_OUTLIERS_FRACTION outlier columns the int8 part is dropped: the 16-bit product of all columns
    q, absmax = kernels.quantize_int8_rows(_randn((48, 64), seed=14))
    x = _with_outlier_features(16, 64, tuple(range(0, 64, 3)) + tuple(range(1, 64, 3)), magnitude=30.0).to(dtype)  # 2/3 of columns
    w = (q.float() * (absmax / 127.0).unsqueeze(1)).to(dtype)
    assert torch.equal(kernels.int8_decomposed_matmul(x, q, absmax, 6.0), (x @ w.T).float())
    few = _with_outlier_features(16, 64, (3,), magnitude=30.0).to(dtype)  # one outlier column: the decomposition
    assert not torch.equal(kernels.int8_decomposed_matmul(few, q, absmax, 6.0), (few @ w.T).float())


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_llm_int8_in_row_chunks_equals_one_pass(monkeypatch, dtype):
    # a vocabulary-sized head goes in chunks of weight rows (bounded temporaries), bit for bit the same
    q, absmax = kernels.quantize_int8_rows(_randn((200, 64), seed=13))
    x = _with_outlier_features(24, 64, (7,), magnitude=30.0).to(dtype)
    whole = kernels.int8_decomposed_matmul(x, q, absmax, 6.0)
    monkeypatch.setattr(kernels, "INT8_PROMPT_CHUNK_ELEMENTS", 24 * 16)  # 16 rows per chunk
    assert torch.equal(kernels.int8_decomposed_matmul(x, q, absmax, 6.0), whole)


@pytest.mark.parametrize("tokens", (9, 64))
def test_linear_int8_prompt_path_is_the_decomposition(tokens, monkeypatch):
    monkeypatch.setattr(kernels, "CPU_HALF_MATMUL_IS_NATIVE", False)
    monkeypatch.setattr(kernels, "_int8_prompts_on_rows", lambda *args: False)  # a CPU with VNNI but no bf16 GEMMs
    q, absmax = kernels.quantize_int8_rows(_randn((48, 128), seed=12))
    x = _with_outlier_features(tokens, 128, (5,), magnitude=30.0).to(torch.bfloat16)
    out = kernels.linear_int8(x, q, absmax, threshold=6.0)
    expected = kernels.int8_decomposed_matmul(x, q, absmax, 6.0).to(torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected)
    _assert_matmul_close(out, x, formats.dequantize_int8_rows(q, absmax), 2e-2)


@pytest.mark.skipif(not (kernels._ops_loaded() and kernels._i16_kernel()), reason="the AVX2 build's prompt route")
@pytest.mark.parametrize("tokens", (9, 64, 200))
def test_int8_prompts_on_avx2_take_the_exact_int8_row_kernel(tokens, monkeypatch):
    # without AVX-512 VNNI `torch._int_mm` is ~25x slower than gemv_int8_rows: prompts take it too, every column
    # multiplied exactly against int16 activations, so closer to the dequantized weight's product than LLM.int8
    monkeypatch.setattr(kernels, "CPU_HALF_MATMUL_IS_NATIVE", False)
    q, absmax = kernels.quantize_int8_rows(_randn((48, 128), seed=12))
    x = _with_outlier_features(tokens, 128, (5,), magnitude=30.0).to(torch.bfloat16)
    out = kernels.linear_int8(x, q, absmax, threshold=6.0)
    assert out.dtype == torch.bfloat16 and torch.equal(out, torch.ops.llmslim.gemv_int8_rows(x, q, absmax))
    exact = x.float() @ formats.dequantize_int8_rows(q, absmax).T
    decomposed = kernels.int8_decomposed_matmul(x, q, absmax, 6.0)
    assert (out.float() - exact).norm() < (decomposed - exact).norm()
    assert torch.equal(kernels.linear_int8(x, q, absmax, threshold=1.5), out)  # the threshold has nothing to choose


@pytest.mark.parametrize("k", (128, 200))  # 200: a row's last 8 columns past the 16-wide steps
def test_dequantize_int8_rows_bf16_is_the_reference(k):
    q, absmax = kernels.quantize_int8_rows(_randn((37, k), seed=16))
    assert torch.equal(kernels._int8_rows_bf16(q, absmax), formats.dequantize_int8_rows(q, absmax, torch.bfloat16))
    assert torch.equal(kernels._int8_rows_bf16(q[5:20], absmax[5:20]), formats.dequantize_int8_rows(q[5:20], absmax[5:20], torch.bfloat16))


def test_int8_prompts_with_bf16_gemms_multiply_the_dequantized_weight_in_bf16(monkeypatch):
    # with hardware bf16 GEMMs (AMX, AVX-512 BF16) every column is multiplied in bf16 against the dequantized weight:
    # closer to the float32 product than LLM.int8, and chunks of rows give the same bits as one pass
    monkeypatch.setattr(kernels, "CPU_HALF_MATMUL_IS_NATIVE", True)
    q, absmax = kernels.quantize_int8_rows(_randn((200, 128), seed=15))
    x = _with_outlier_features(40, 128, (5,), magnitude=30.0).to(torch.bfloat16)
    out = kernels.linear_int8(x, q, absmax, threshold=6.0)
    dequantized = formats.dequantize_int8_rows(q, absmax, torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.equal(out, torch.nn.functional.linear(x, dequantized))  # that product's bits
    exact = x.float() @ formats.dequantize_int8_rows(q, absmax).T
    decomposed = kernels.int8_decomposed_matmul(x, q, absmax, 6.0)
    assert (out.float() - exact).norm() < (decomposed - exact).norm()
    from llmslim.plan import memory

    assert memory.INT8_BF16_CHUNK_ELEMENTS == kernels.INT8_BF16_CHUNK_ELEMENTS  # the planner's copy of the bound
    monkeypatch.setattr(kernels, "INT8_BF16_CHUNK_ELEMENTS", 16 * 128)  # 16 rows per chunk
    assert torch.equal(kernels.linear_int8(x, q, absmax, threshold=6.0), out)
    monkeypatch.setattr(kernels, "int8_prompt_matmul_bf16", None)  # decode rows never take it
    kernels.linear_int8(x[: kernels.INT8_DECODE_MAX_TOKENS], q, absmax, threshold=6.0)


# --- bitsandbytes' CPU layout for NF4/FP4 (kernels.pack_4bit_for_cpu) --------------------------

needs_bnb_cpu_kernel = pytest.mark.skipif(not kernels.bnb_cpu_4bit_kernel(), reason="bitsandbytes' CPU 4-bit kernel needs AVX-512 BF16")


@pytest.mark.parametrize("double_quant", (False, True), ids=("plain", "double_quant"))
@pytest.mark.parametrize("fmt", formats.FOUR_BIT_FORMATS)
@pytest.mark.parametrize("shape, block_size", [((32, 64), 64), ((96, 320), 64), ((64, 256), 128), ((160, 96), 32)], ids=str)
def test_cpu_layout_equals_bitsandbytes_conversion_and_inverts(shape, block_size, fmt, double_quant):

    w = formats.quantize_4bit(torch.randn(shape, generator=torch.Generator().manual_seed(3)), fmt, block_size, double_quant)
    packed, absmax = kernels.pack_4bit_for_cpu(w)
    ref_codes, ref_state = bnb_f._convert_weight_packed_for_cpu(w.codes.clone(), kernels.quant_state(w, torch.bfloat16))
    assert torch.equal(packed.reshape(-1), ref_codes.reshape(-1))
    assert torch.equal(kernels.bnb_cpu_absmax(absmax), ref_state.absmax)
    assert absmax.shape == (shape[0] // 32, shape[1] // block_size, 32)  # tile by tile
    assert torch.equal(kernels.unpack_4bit_from_cpu(packed, shape), w.codes)


@needs_bnb_cpu_kernel
@pytest.mark.parametrize("batch", ((1,), (7,), (64,), (2, 3)), ids=str)
@pytest.mark.parametrize("fmt", formats.FOUR_BIT_FORMATS)
@pytest.mark.parametrize("shape", [(32, 64), (96, 320), (224, 1088)], ids=str)
def test_packed_linear_equals_reference_with_bf16_absmax(shape, fmt, batch):
    # the kernel's only difference from the reference math: the absmax it reads is bfloat16
    g = torch.Generator().manual_seed(5)
    w = formats.quantize_4bit(torch.randn(shape, generator=g), fmt, 64, double_quant=True)
    x = torch.randn(*batch, shape[1], generator=g).to(torch.bfloat16)
    packed, absmax = kernels.pack_4bit_for_cpu(w)
    got = kernels.linear_4bit_packed(x, packed, absmax, shape, fmt, 64)
    codes = formats.unpack_nibbles(w.codes, shape[0] * shape[1]).view(shape[0], -1, 64)
    dense = formats.code_4bit(fmt)[codes] * kernels.bnb_cpu_absmax(absmax).float().t().unsqueeze(-1)  # (N, K / 64, 64)
    expected = x.float() @ dense.reshape(shape).t()
    assert got.shape == (*batch, shape[0]) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, rtol=0.02, atol=0.02 * expected.abs().max().item())


@needs_bnb_cpu_kernel
@pytest.mark.parametrize("fmt", formats.FOUR_BIT_FORMATS)
@pytest.mark.parametrize(
    "shape, block_size",
    [((32, 64), 64), ((96, 320), 64), ((64, 256), 128), ((160, 96), 32), ((64, 2048), 64), ((32, 96), 96), ((32, 120), 40)],
    ids=str,
)
def test_dequantize_from_the_cpu_layout_equals_reference_with_bf16_absmax(shape, block_size, fmt):
    if not native.load_ops():
        pytest.skip("llmslim's CPU operators could not be built")
    w = formats.quantize_4bit(torch.randn(shape, generator=torch.Generator().manual_seed(7)), fmt, block_size, double_quant=True)
    packed, absmax = kernels.pack_4bit_for_cpu(w)
    got = torch.ops.llmslim.dequantize_4bit_cpu_layout(packed, absmax, formats.code_4bit(fmt), shape[0], shape[1], block_size)
    codes = formats.unpack_nibbles(w.codes, shape[0] * shape[1]).view(shape[0], -1, block_size)
    expected = (formats.code_4bit(fmt)[codes] * kernels.bnb_cpu_absmax(absmax).float().t().unsqueeze(-1)).reshape(shape).to(torch.bfloat16)
    assert torch.equal(got, expected)


@needs_bnb_cpu_kernel
def test_packed_linear_of_a_prompt_equals_the_kernel_on_few_tokens():
    # above PACKED_GEMV_MAX_TOKENS rows the layer dequantizes (llmslim's operator) and runs a GEMM
    g = torch.Generator().manual_seed(9)
    w = formats.quantize_4bit(torch.randn(96, 320, generator=g), "nf4", 64, double_quant=True)
    packed, absmax = kernels.pack_4bit_for_cpu(w)
    x = torch.randn(kernels.PACKED_GEMV_MAX_TOKENS + 7, 320, generator=g).to(torch.bfloat16)
    prompt = kernels.linear_4bit_packed(x, packed, absmax, (96, 320), "nf4", 64)
    rows = torch.cat([kernels.linear_4bit_packed(chunk, packed, absmax, (96, 320), "nf4", 64) for chunk in x.split(8)])
    torch.testing.assert_close(prompt.float(), rows.float(), rtol=0.02, atol=0.02 * rows.abs().max().item())


# ---- llmslim's decode operators (AVX-512 BF16/VNNI) --------------------------------------------

needs_decode_kernels = pytest.mark.skipif(
    not kernels.decode_kernels(), reason="llmslim's decode operators need AVX-512 BF16/VNNI and a C++ compiler"
)
needs_int8_rows_kernel = pytest.mark.skipif(
    not kernels.int8_rows_kernel(), reason="llmslim's gemv_int8_rows needs AVX-512 VNNI or AVX2 and a C++ compiler"
)


@needs_int8_rows_kernel
@pytest.mark.parametrize("batch", ((1,), (2,), (3,), (7,), (2, 4)), ids=str)  # decode sizes (<= INT8_DECODE_MAX_TOKENS)
@pytest.mark.parametrize("shape", ((5, 32), (37, 96), (64, 320), (130, 1024)), ids=str)
def test_gemv_int8_rows_equals_matmul_with_dequantized_weight(shape, batch):
    # exact int8 products with the bf16 inputs held in 16 bits (absolute error <= 2^-16 of each
    # 128-column block's largest |x| per element); then the bf16 output is rounded
    q, absmax = kernels.quantize_int8_rows(_randn(shape))
    x = _randn((*batch, shape[1]), torch.bfloat16, seed=2)
    assert kernels.int8_decode_usable(x, q, absmax)
    got = kernels.linear_int8(x, q, absmax, threshold=6.0)
    assert got.dtype == torch.bfloat16 and got.shape == (*batch, shape[0])
    w = formats.dequantize_int8_rows(q, absmax).double()
    expected = x.double() @ w.T
    bound = 2**-16 * x.double().abs().amax(dim=-1, keepdim=True) @ w.abs().sum(dim=1, keepdim=True).T  # activation rounding
    error = (got.double() - expected).abs()
    assert (error <= 2**-8 * expected.abs() + bound + 1e-12).all()  # one bf16 rounding step, plus that


@needs_int8_rows_kernel
@pytest.mark.parametrize("batch", ((1,), (2,), (5,)), ids=str)
@pytest.mark.parametrize("shape", ((5, 32), (37, 96), (64, 320), (130, 576), (8, 1024)), ids=str)
@pytest.mark.parametrize("threads", (1, 2))
def test_gemv_int8_rows_with_block_absmax_equals_matmul_with_dequantized_weight(shape, batch, threads):
    # one absmax per row and block of 128 columns (the int8 head's copy; K % 128 != 0 leaves a short last block)
    w = _randn(shape, torch.bfloat16)
    w[:, 3] *= 50.0  # a large column, in the first block only
    q, absmax = kernels.quantize_int8_blocks(w)
    assert kernels.int8_blocks_usable(w) and torch.equal(q, formats.quantize_int8_blocks(w)[0])
    x = _randn((*batch, shape[1]), torch.bfloat16, seed=2)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = kernels.linear_int8_blocks(x, q, absmax)
    finally:
        torch.set_num_threads(previous)
    assert got.dtype == torch.bfloat16 and got.shape == (*batch, shape[0])
    deq = formats.dequantize_int8_blocks(q, absmax).double()
    expected = x.double() @ deq.T
    bound = 2**-16 * x.double().abs().amax(dim=-1, keepdim=True) @ deq.abs().sum(dim=1, keepdim=True).T  # activation rounding
    assert ((got.double() - expected).abs() <= 2**-8 * expected.abs() + bound + 1e-12).all()


@needs_int8_rows_kernel
def test_gemv_int8_rows_quantizes_activations_to_nearest_even_int16():
    # weight 127 x identity, absmax 127: row r's output is bf16(float32(127 q_r) * s), q_r = x_r's int16 value and s its
    # 128-column block's scale, so an activation rounded the wrong way is visible where q is small
    k = 256
    x = (torch.rand(1, k, generator=torch.Generator().manual_seed(0)) * 40 - 20) / 32767
    x[0, 0], x[0, 200] = 1.0, -0.5  # each block's largest magnitude
    x = x.to(torch.bfloat16)
    q, absmax = torch.eye(k, dtype=torch.int8) * 127, torch.full((k,), 127.0)
    got = torch.ops.llmslim.gemv_int8_rows(x, q, absmax)
    blocks = x.float().view(2, 128)
    amax = blocks.abs().amax(dim=1, keepdim=True)
    levels = torch.round(blocks * (torch.tensor(32767.0) / amax))  # float32 product, then half to even
    expected = ((127 * levels) * (amax / 32767)).view(1, k).to(torch.bfloat16)
    assert levels.abs().min() < 20 and torch.equal(got, expected)


@needs_int8_rows_kernel
def test_gemv_int8_rows_rejects_a_block_absmax_of_the_wrong_shape():
    q, absmax = kernels.quantize_int8_blocks(_randn((8, 320), torch.bfloat16))  # 3 blocks per row
    x = _randn((1, 320), torch.bfloat16)
    with pytest.raises(RuntimeError, match=r"absmax of shape \(8,\) or \(8, 3\)"):
        torch.ops.llmslim.gemv_int8_rows(x, q, absmax[:, :2].contiguous())


def test_quantize_int8_blocks_in_row_chunks_is_the_reference(monkeypatch):
    monkeypatch.setattr(kernels, "_INT8_BLOCK_ROWS", 7)
    w = _randn((30, 200), torch.bfloat16, seed=4)
    for got, expected in zip(kernels.quantize_int8_blocks(w), formats.quantize_int8_blocks(w), strict=True):
        assert torch.equal(got, expected)


@needs_int8_rows_kernel
def test_gemv_int8_rows_keeps_small_activations_next_to_an_outlier():
    # activations are held in 16 bits per block of 128 columns: a 1000x outlier feature costs the
    # other columns of its block precision, not the output its accuracy
    q, absmax = kernels.quantize_int8_rows(_randn((64, 512)))
    x = _randn((1, 512), seed=3)
    x[0, 5] = 1000.0
    x = x.to(torch.bfloat16)
    got = torch.ops.llmslim.gemv_int8_rows(x, q, absmax).float()
    w = formats.dequantize_int8_rows(q, absmax).double()
    expected = x.double() @ w.T
    without_outlier = x.double().clone()
    without_outlier[0, 5] = 0.0
    # the error is far below the size of the non-outlier part of each output
    assert (got.double() - expected).abs().max() < 0.01 * (without_outlier @ w.T).abs().max() + 2**-8 * expected.abs().max()


@needs_int8_rows_kernel
def test_gemv_int8_rows_rejects_bad_operands():
    q, absmax = kernels.quantize_int8_rows(_randn((8, 64)))
    with pytest.raises(RuntimeError, match="bfloat16"):
        torch.ops.llmslim.gemv_int8_rows(_randn((1, 64)), q, absmax)
    with pytest.raises(RuntimeError, match="K % 32"):
        torch.ops.llmslim.gemv_int8_rows(_randn((1, 48), torch.bfloat16), kernels.quantize_int8_rows(_randn((8, 48)))[0], absmax)


@needs_decode_kernels
@needs_bnb_cpu_kernel
@pytest.mark.parametrize("tokens", (1, 2, 3, 4, 5, 9))
@pytest.mark.parametrize("fmt", formats.FOUR_BIT_FORMATS)
@pytest.mark.parametrize(
    "shape, block_size", [((32, 64), 64), ((96, 320), 64), ((64, 256), 128), ((160, 96), 32), ((64, 1024), 1024)], ids=str
)
def test_gemv_4bit_cpu_layout_equals_bitsandbytes_kernel(shape, block_size, fmt, tokens):
    # the same layout, the same bf16 table values and float32 sums: both round to the same bf16
    # outputs but for ties of the summation order
    w = formats.quantize_4bit(_randn(shape, seed=4), fmt, block_size, double_quant=False)
    packed, absmax = kernels.pack_4bit_for_cpu(w)
    x = _randn((tokens, shape[1]), torch.bfloat16, seed=5)
    code = formats.code_4bit(fmt)
    got = torch.ops.llmslim.gemv_4bit_cpu_layout(x, packed, absmax, code, shape[0], shape[1], block_size)
    theirs = torch.ops.bitsandbytes.gemv_4bit(x, packed, list(shape), kernels.bnb_cpu_absmax(absmax), code, block_size)
    assert got.dtype == torch.bfloat16 and got.shape == (tokens, shape[0])
    torch.testing.assert_close(got.float(), theirs.float(), rtol=2**-7, atol=1e-6)


@needs_decode_kernels
def test_gemv_4bit_cpu_layout_rejects_bad_operands():
    w = formats.quantize_4bit(_randn((32, 64)), "nf4", 64, double_quant=False)
    packed, absmax = kernels.pack_4bit_for_cpu(w)
    code = formats.code_4bit("nf4")
    with pytest.raises(RuntimeError, match="bfloat16"):
        torch.ops.llmslim.gemv_4bit_cpu_layout(_randn((1, 64)), packed, absmax, code, 32, 64, 64)
    with pytest.raises(RuntimeError, match="N % 32"):
        torch.ops.llmslim.gemv_4bit_cpu_layout(_randn((1, 128), torch.bfloat16), packed, absmax, code, 16, 128, 64)


# ---- bitsandbytes' operators called directly (the CUDA path; their CPU implementations here) ----


@pytest.mark.parametrize("fmt", formats.FOUR_BIT_FORMATS)
@pytest.mark.parametrize("double_quant", (False, True))
@pytest.mark.parametrize("tokens", (1, 5))
def test_linear_4bit_on_bitsandbytes_operators_equals_reference(fmt, double_quant, tokens):
    if tokens == 1 and kernels.bnb_cpu_4bit_kernel():
        pytest.skip("on an AVX-512 BF16 CPU bitsandbytes' gemv_4bit takes its packed CPU layout, not the CUDA layout this path passes")
    torch.manual_seed(0)
    w = kernels.quantize_4bit(torch.randn(96, 256), fmt, 64, double_quant)
    x = torch.randn(1, tokens, 256, dtype=torch.bfloat16)
    out = kernels.linear_4bit_bnb_ops(x, w, formats.code_4bit(fmt), formats.dynamic_map(), torch.bfloat16)
    expected = x.float() @ formats.dequantize_4bit(w, torch.float32).t()
    assert out.shape == (1, tokens, 96) and out.dtype == torch.bfloat16
    assert (out.float() - expected).abs().max() <= 0.01 * expected.abs().max()
    dequantized = kernels.dequantize_4bit_bnb_ops(w, formats.dynamic_map(), torch.float32)
    assert torch.equal(dequantized, formats.dequantize_4bit(w, torch.float32))


@pytest.mark.parametrize("tokens", (1, kernels.INT8_DECODE_MAX_TOKENS, 16))
def test_linear_int8_on_bitsandbytes_operators_keeps_outliers(tokens):
    # decode sizes: every column in 16 bits; prompts: LLM.int8 with the outlier column in 16 bits
    torch.manual_seed(0)
    weight, absmax = kernels.quantize_int8_rows(torch.randn(64, 128))
    x = torch.randn(tokens, 128, dtype=torch.bfloat16)
    x[:, 3] = 40.0
    out = kernels.linear_int8_bnb_ops(x, weight, absmax, 6.0)
    expected = x.float() @ formats.dequantize_int8_rows(weight, absmax, torch.float32).t()
    assert out.dtype == torch.bfloat16
    assert (out.float() - expected).abs().max() <= 0.01 * expected.abs().max()
    if tokens <= kernels.INT8_DECODE_MAX_TOKENS:  # no activation quantization: bf16 rounding of the output only
        assert (out.float() - expected).abs().max() <= 0.004 * expected.abs().max()


def test_one_token_int8_in_a_compiled_step_equals_reference():
    torch.manual_seed(0)
    weight, absmax = kernels.quantize_int8_rows(torch.randn(64, 128))
    x = torch.randn(1, 1, 128, dtype=torch.bfloat16)
    compiled = torch.compile(kernels.linear_int8_bnb_ops, fullgraph=True)
    out = compiled(x, weight, absmax, 6.0)
    expected = x.float() @ formats.dequantize_int8_rows(weight, absmax, torch.float32).t()
    assert out.shape == (1, 1, 64)
    assert (out.float() - expected).abs().max() <= 0.004 * expected.abs().max()


# ---- int4 x int8 activations (AVX-512 VNNI or AVX2) --------------------------------------------


needs_int4_q8 = pytest.mark.skipif(
    not (native.load_ops() and kernels._int4_q8_kernel()), reason="mm_int4_q8 is not built here (needs AVX2 or AVX-512 VNNI)"
)


@needs_int4_q8
@pytest.mark.parametrize(("n", "k", "group"), [(96, 256, 64), (40, 192, 32), (33, 320, 64), (8, 512, 128), (16, 2048, 256), (7, 64, 32)])
@pytest.mark.parametrize("threads", (1, 2))
def test_int4_q8_equals_reference_with_quantized_activations(n, k, group, threads):
    # the kernel's math exactly: formats' int4 weight times the activations rounded to int8 per 32 elements
    torch.manual_seed(n + k)
    w = formats.quantize_int4(torch.randn(n, k), group)
    x = torch.randn(3, k, dtype=torch.bfloat16)
    x[1, 5] = 30.0  # an outlier inside one block
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = torch.ops.llmslim.mm_int4_q8(x, w.codes, w.scale, w.zero, n, group).float()
    finally:
        torch.set_num_threads(previous)
    expected = formats.quantize_activations_q8(x) @ formats.dequantize_int4(w, torch.float32).t()
    assert (out - expected).abs().max() <= 2**-7 * expected.abs().max()  # the bf16 output's rounding
    exact = x.float() @ formats.dequantize_int4(w, torch.float32).t()
    assert (out - exact).abs().max() <= 2**-7 * exact.abs().max()  # the activations' remainder makes them ~exact
    single = formats._round_blocks_q8(x.float(), 32) @ formats.dequantize_int4(w, torch.float32).t()  # llama.cpp's one row
    assert (out - exact).abs().pow(2).mean() < (single - exact).abs().pow(2).mean() / 4


@needs_int4_q8
def test_int4_decode_rows_take_the_integer_dot_kernel(monkeypatch):
    assert kernels.INT4_Q8_MAX_TOKENS == 1  # on by default for one-token decode
    monkeypatch.setattr(kernels, "INT4_Q8_MAX_TOKENS", kernels.DECODE_MAX_TOKENS)
    calls = []
    fake = lambda x, *args: calls.append(x.shape[0]) or torch.zeros(x.shape[0], 64, dtype=torch.bfloat16)  # noqa: E731
    monkeypatch.setattr(torch.ops.llmslim, "mm_int4_q8", fake)
    w = formats.quantize_int4(torch.randn(64, 128), 64)
    for tokens in (1, 5, kernels.DECODE_MAX_TOKENS + 1):
        kernels.linear_int4(torch.randn(1, tokens, 128, dtype=torch.bfloat16), w, torch.bfloat16)
    assert calls == [1, 5]


needs_nf4_q8 = pytest.mark.skipif(not (native.load_ops() and kernels._nf4_q8_kernel()), reason="mm_4bit_q8 is built for AVX2 only")


@needs_nf4_q8
@pytest.mark.parametrize(("n", "k", "block"), [(96, 256, 64), (40, 192, 64), (33, 512, 128), (8, 256, 32), (7, 64, 64)])
@pytest.mark.parametrize("double_quant", (False, True))
@pytest.mark.parametrize("threads", (1, 2))
def test_nf4_q8_equals_reference_with_int8_levels_and_quantized_activations(n, k, block, double_quant, threads):
    # the kernel's math exactly: NF4's values rounded to int8 steps of 1/127, times the activations rounded per 32
    torch.manual_seed(n + k)
    w = kernels.quantize_4bit(torch.randn(n, k), "nf4", block, double_quant)
    x = torch.randn(3, k, dtype=torch.bfloat16)
    x[2, 7] = -25.0
    absmax, _, nested_absmax, nested_map, nested_offset = kernels._scale_args(w)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = torch.ops.llmslim.mm_4bit_q8(x, w.codes, kernels.NF4_INT8_LEVELS, absmax, nested_absmax, nested_map, nested_offset, n, block)
    finally:
        torch.set_num_threads(previous)
    codes = formats.unpack_nibbles(w.codes, n * k).long()
    levels = kernels.NF4_INT8_LEVELS.float()[codes] / 127.0
    weight = (levels * w.float_absmax().repeat_interleave(block)[: n * k]).view(n, k)
    expected = formats.quantize_activations_q8(x) @ weight.t()
    assert (out.float() - expected).abs().max() <= 2**-7 * expected.abs().max()
    exact = x.float() @ formats.dequantize_4bit(w, torch.float32).t()
    assert (out.float() - exact).abs().max() <= 0.03 * exact.abs().max()


@needs_nf4_q8
def test_nf4_decode_rows_take_the_integer_dot_kernel_and_fp4_and_prompts_do_not(monkeypatch):
    monkeypatch.setattr(kernels, "NF4_Q8_MAX_TOKENS", kernels.DECODE_MAX_TOKENS)  # off by default (its perplexity cost)
    calls = []
    fake = lambda x, *args: calls.append(x.shape[0]) or torch.zeros(x.shape[0], 64, dtype=torch.bfloat16)  # noqa: E731
    monkeypatch.setattr(torch.ops.llmslim, "mm_4bit_q8", fake)
    nf4 = kernels.quantize_4bit(torch.randn(64, 128), "nf4", 64, True)
    for tokens in (1, 3, kernels.DECODE_MAX_TOKENS, kernels.DECODE_MAX_TOKENS + 1):
        kernels.linear_4bit(torch.randn(1, tokens, 128, dtype=torch.bfloat16), nf4, torch.bfloat16)
    kernels.linear_4bit(torch.randn(1, 1, 128), nf4, torch.float32)  # float32 input: exact
    fp4 = kernels.quantize_4bit(torch.randn(64, 128), "fp4", 64, True)  # its levels are not near int8 steps
    kernels.linear_4bit(torch.randn(1, 1, 128, dtype=torch.bfloat16), fp4, torch.bfloat16)
    assert calls == [1, 3, kernels.DECODE_MAX_TOKENS]


needs_i16 = pytest.mark.skipif(not (native.load_ops() and kernels._i16_kernel()), reason="mm_4bit_i16 is built for AVX2 only")


def _i16_reference(x: torch.Tensor, w: formats.FourBitWeight) -> torch.Tensor:
    """mm_4bit_i16's math in float64: the table's values x 8191 rounded, times the rows rounded to int16 per 64 columns."""
    n, k = w.shape
    codes = formats.unpack_nibbles(w.codes, n * k).long()
    levels = torch.round(formats.code_4bit(w.fmt).double() * 8191)[codes] / 8191
    weight = (levels * w.float_absmax().double().repeat_interleave(w.block_size)[: n * k]).view(n, k)
    steps = x.double().reshape(x.shape[0], -1, 64)
    scale = steps.abs().amax(dim=-1, keepdim=True) / 32767
    rows = (torch.round(steps / torch.where(scale > 0, scale, 1.0)) * scale).reshape(x.shape[0], k)
    return rows @ weight.t()


@needs_i16
@pytest.mark.parametrize(("n", "k", "block"), [(96, 256, 64), (40, 192, 64), (33, 512, 128), (7, 64, 64), (17, 1024, 256)])
@pytest.mark.parametrize("fmt", ("nf4", "fp4"))
@pytest.mark.parametrize("double_quant", (False, True))
@pytest.mark.parametrize("threads", (1, 2))
def test_4bit_i16_equals_reference_with_16_bit_levels_and_activations(n, k, block, fmt, double_quant, threads):
    torch.manual_seed(n + k)
    w = kernels.quantize_4bit(torch.randn(n, k), fmt, block, double_quant)
    x = torch.randn(5, k).to(torch.bfloat16)  # 5 rows: a tile of 4 and one more
    x[2, 7] = -25.0
    x[4] = 0.0  # a zero row (scale 0)
    absmax, _, nested_absmax, nested_map, nested_offset = kernels._scale_args(w)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = torch.ops.llmslim.mm_4bit_i16(
            x.float(), w.codes, formats.code_4bit(fmt), absmax, nested_absmax, nested_map, nested_offset, n, block
        )
    finally:
        torch.set_num_threads(previous)
    expected = _i16_reference(x, w)
    assert (out.double() - expected).abs().max() <= 1e-5 * expected.abs().max()  # float32 sums only
    exact = x.double() @ formats.dequantize_4bit(w, torch.float32).double().t()
    # at most 6.1e-5 of each block's absmax per level and 2^-16 of each 64 columns' largest |x| per activation off
    assert (out.double() - exact).abs().max() <= 3e-4 * exact.abs().max()
    assert torch.equal(out[4], torch.zeros(n))


@needs_i16
@pytest.mark.parametrize("k", (64, 576, 4096))
def test_4bit_i16_quantizes_bf16_rows_as_it_does_their_float32_values(k):
    # bf16 rows take a vectorized quantizer, float32 rows the scalar one: the same int16 values and scales
    torch.manual_seed(k)
    w = kernels.quantize_4bit(torch.randn(48, k), "nf4", 64, False)
    x = (torch.randn(3, k) * torch.logspace(-3, 3, k)).to(torch.bfloat16)
    x[1, :64] = 0.0  # a zero step
    x[2, 5] = -x[2].float().abs().max() * 2  # the largest magnitude negative
    lut = formats.code_4bit("nf4")
    from_bf16 = torch.ops.llmslim.mm_4bit_i16(x, w.codes, lut, w.absmax, None, None, None, 48, 64)
    from_float = torch.ops.llmslim.mm_4bit_i16(x.float(), w.codes, lut, w.absmax, None, None, None, 48, 64)
    assert torch.equal(from_bf16, from_float.to(torch.bfloat16))


@needs_i16
def test_4bit_i16_is_more_precise_than_the_bf16_table_kernel():
    # the default decode kernel on AVX2 must not cost what the table kernel (bf16 levels) does not
    torch.manual_seed(0)
    w = kernels.quantize_4bit(torch.randn(256, 2048), "nf4", 64, True)
    x = torch.randn(1, 2048).to(torch.bfloat16)
    exact = x.double() @ formats.dequantize_4bit(w, torch.float32).double().t()
    absmax, _, nested_absmax, nested_map, nested_offset = kernels._scale_args(w)
    lut = formats.code_4bit("nf4")
    i16 = torch.ops.llmslim.mm_4bit_i16(x.float(), w.codes, lut, absmax, nested_absmax, nested_map, nested_offset, 256, 64)
    table = torch.ops.llmslim.mm_4bit(x, w.codes, lut, *kernels._scale_args(w), 256, 64, 2048)  # bf16 in: bf16 levels
    assert (i16.double() - exact).norm() < 0.5 * (table.double() - exact).norm()


@needs_i16
def test_4bit_i16_rejects_bad_operands():
    w = kernels.quantize_4bit(torch.randn(8, 128), "nf4", 64, False)
    x = torch.randn(1, 128, dtype=torch.bfloat16)
    lut = formats.code_4bit("nf4")
    with pytest.raises(RuntimeError, match="block >= 64"):
        torch.ops.llmslim.mm_4bit_i16(x, w.codes, lut, w.absmax, None, None, None, 8, 32)
    with pytest.raises(RuntimeError, match="within"):
        torch.ops.llmslim.mm_4bit_i16(x, w.codes, lut * 2, w.absmax, None, None, None, 8, 64)


@needs_i16
def test_4bit_decode_rows_take_the_i16_kernel_and_prompts_and_float32_do_not(monkeypatch):
    calls = []
    fake = lambda x, *args: calls.append(x.shape[0]) or torch.zeros(x.shape[0], 64, dtype=x.dtype)  # noqa: E731
    monkeypatch.setattr(torch.ops.llmslim, "mm_4bit_i16", fake)
    for fmt in ("nf4", "fp4"):
        w = kernels.quantize_4bit(torch.randn(64, 128), fmt, 64, True)
        for tokens in (1, 3, kernels.DECODE_MAX_TOKENS, kernels.DECODE_MAX_TOKENS + 1):
            kernels.linear_4bit(torch.randn(1, tokens, 128, dtype=torch.bfloat16), w, torch.bfloat16)
        kernels.linear_4bit(torch.randn(1, 1, 128), w, torch.float32)  # float32 input: the exact table kernel
    kernels.linear_4bit(
        torch.randn(1, 1, 128, dtype=torch.bfloat16), kernels.quantize_4bit(torch.randn(64, 128), "nf4", 32, True), torch.bfloat16
    )
    assert calls == [1, 3, kernels.DECODE_MAX_TOKENS] * 2  # blocks of 32 and prompts take the other kernels


@needs_i16
@pytest.mark.parametrize("double_quant", (False, True))
@pytest.mark.parametrize("rows", (1, 5))
@pytest.mark.parametrize("threads", (1, 2))
def test_4bit_i16_multi_equals_one_call_per_weight(double_quant, rows, threads):
    torch.manual_seed(rows)
    ns, k = (96, 32, 1040), 256  # 1040 rows: more than one thread's share
    weights = [kernels.quantize_4bit(torch.randn(n, k), "nf4", 64, double_quant) for n in ns]
    x = torch.randn(rows, k).to(torch.bfloat16)
    lut = formats.code_4bit("nf4")
    args = [kernels._scale_args(w) for w in weights]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        outs = torch.ops.llmslim.mm_4bit_i16_multi(
            x,
            [w.codes for w in weights],
            lut,
            [a[0] for a in args],
            [a[2] for a in args] if double_quant else [],
            args[0][3],
            [a[4] for a in args] if double_quant else [],
            list(ns),
            64,
        )
        singles = [
            torch.ops.llmslim.mm_4bit_i16(x, w.codes, lut, a[0], a[2], a[3], a[4], n, 64) for w, a, n in zip(weights, args, ns, strict=True)
        ]
    finally:
        torch.set_num_threads(previous)
    assert [o.shape for o in outs] == [(rows, n) for n in ns]
    for out, single in zip(outs, singles, strict=True):
        assert torch.equal(out, single)


@needs_i16
def test_4bit_i16_multi_rejects_mismatched_operands():
    w = kernels.quantize_4bit(torch.randn(32, 64), "nf4", 64, True)
    absmax, _, nested_absmax, nested_map, offset = kernels._scale_args(w)
    x, lut = torch.randn(1, 64, dtype=torch.bfloat16), formats.code_4bit("nf4")
    with pytest.raises(RuntimeError, match="as many codes"):
        torch.ops.llmslim.mm_4bit_i16_multi(x, [w.codes, w.codes], lut, [absmax], [nested_absmax], nested_map, [offset], [32, 32], 64)
    with pytest.raises(RuntimeError, match="one nested absmax and offset per weight"):
        torch.ops.llmslim.mm_4bit_i16_multi(x, [w.codes], lut, [absmax], [nested_absmax], nested_map, [], [32], 64)


@needs_i16
@pytest.mark.parametrize(
    ("n", "k"), [(40, 256), (37, 576), (257, 1024), (101, 4096)]
)  # one row: rows in pairs (K <= 1024), an odd one last
@pytest.mark.parametrize("threads", (1, 2))  # (257, 1024) on 2 threads: the second thread's rows start at row 129
def test_4bit_i16_gives_each_row_what_it_gets_alone(n, k, threads):
    torch.manual_seed(0)
    x = torch.randn(6, k, dtype=torch.bfloat16)
    w = kernels.quantize_4bit(torch.randn(n, k), "nf4", 64, True)
    absmax, _, nested_absmax, nested_map, offset = kernels._scale_args(w)
    lut = formats.code_4bit("nf4")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        together = torch.ops.llmslim.mm_4bit_i16(x, w.codes, lut, absmax, nested_absmax, nested_map, offset, n, 64)
        for i in range(6):
            alone = torch.ops.llmslim.mm_4bit_i16(x[i : i + 1], w.codes, lut, absmax, nested_absmax, nested_map, offset, n, 64)
            assert torch.equal(together[i : i + 1], alone)
    finally:
        torch.set_num_threads(previous)


@needs_nf4_q8
@needs_int4_q8
@pytest.mark.parametrize("fmt", ("nf4", "int4"))
def test_integer_dot_kernels_give_each_row_what_it_gets_alone(fmt):
    # a server batches decode rows: a row's result must not depend on which rows share its step
    torch.manual_seed(0)
    x = torch.randn(6, 256, dtype=torch.bfloat16)
    if fmt == "nf4":
        w = kernels.quantize_4bit(torch.randn(40, 256), "nf4", 64, True)
        absmax, _, nested_absmax, nested_map, offset = kernels._scale_args(w)
        levels = kernels.NF4_INT8_LEVELS
        run = lambda rows: torch.ops.llmslim.mm_4bit_q8(rows, w.codes, levels, absmax, nested_absmax, nested_map, offset, 40, 64)  # noqa: E731
    else:
        w = formats.quantize_int4(torch.randn(40, 256), 64)
        run = lambda rows: torch.ops.llmslim.mm_int4_q8(rows, w.codes, w.scale, w.zero, 40, 64)  # noqa: E731
    together = run(x)
    for i in range(6):
        assert torch.equal(together[i : i + 1], run(x[i : i + 1]))
