"""The reference math of `llmslim.quant.formats`: hand-computed codes, and bit-exactness with bitsandbytes."""

from __future__ import annotations

import bitsandbytes.functional as bnb_f
import pytest
import torch

from llmslim.quant import formats, kernels

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ODD_SHAPES = ((3, 7), (37, 129), (1, 63), (64, 64))
BLOCK_SIZES = (32, 64, 128, 256)

# NF4 codes by index (QLoRA's table), for reading the hand-computed cases below
#   0: -1.0    1: -0.696  2: -0.525  3: -0.395  4: -0.284  5: -0.185  6: -0.091  7: 0.0
#   8: 0.0796  9: 0.161  10: 0.246  11: 0.338  12: 0.441  13: 0.563  14: 0.723  15: 1.0


def _randn(shape: tuple[int, ...], dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _block(values: list[float], block_size: int = 32) -> torch.Tensor:
    """One full block: `values` followed by zeros."""
    return torch.tensor(values + [0.0] * (block_size - len(values)))


# --- code tables -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", formats.FOUR_BIT_FORMATS)
def test_code_table_equals_bitsandbytes(fmt):
    assert torch.equal(formats.code_4bit(fmt), bnb_f.get_4bit_type(fmt, device="cpu"))


def test_code_table_rejects_unknown_format():
    with pytest.raises(ValueError, match=r"4-bit format must be one of \('nf4', 'fp4'\), got 'int4'"):
        formats.code_4bit("int4")


def test_dynamic_map_equals_bitsandbytes():
    code = formats.dynamic_map()
    assert code.dtype == torch.float32 and code.shape == (256,)
    assert torch.equal(code, bnb_f.create_dynamic_map(signed=True))
    assert torch.all(code[1:] >= code[:-1])


@pytest.mark.parametrize("fmt", formats.FOUR_BIT_FORMATS)
def test_rounding_bounds_are_midpoints_of_sorted_codes(fmt):
    bounds, order = formats.rounding_bounds_4bit(fmt)
    sorted_code = formats.code_4bit(fmt)[order.long()]
    assert bounds.shape == (15,) and order.dtype == torch.uint8
    assert torch.all(sorted_code[1:] >= sorted_code[:-1])
    assert torch.equal(bounds, (sorted_code[:-1] + sorted_code[1:]) / 2)


# --- hand-computed 4-bit values ------------------------------------------------------------------------------------


def test_nf4_hand_computed_codes_and_pack_order():
    # absmax 2.0, so the scaled block is [0, 1, -0.5, 0.25, -1, 0.04, 0.6, -0.2, 0, ...]
    x = _block([0.0, 2.0, -1.0, 0.5, -2.0, 0.08, 1.2, -0.4])
    w = formats.quantize_4bit(x, "nf4", block_size=32, double_quant=False)
    # 0 -> 7; 1 -> 15; -0.5 -> 2 (below the -0.460 midpoint); 0.25 -> 10; -1 -> 0;
    # 0.04 -> 8 (just above the 0.0398 midpoint); 0.6 -> 13 (below 0.643); -0.2 -> 5 (above -0.235); 0 -> 7
    expected = [0x7F, 0x2A, 0x08, 0xD5] + [0x77] * 12
    assert w.codes.dtype == torch.uint8 and w.codes.shape == (16, 1)
    assert w.codes.flatten().tolist() == expected
    assert w.absmax.tolist() == [2.0]
    assert w.nested_absmax is None and w.nested_offset is None
    assert (w.shape, w.fmt, w.block_size) == ((32,), "nf4", 32)


def test_value_exactly_on_a_midpoint_takes_the_lower_code():
    bounds, _ = formats.rounding_bounds_4bit("nf4")
    # absmax 1.0 (scale exactly 1); bounds[i] is the midpoint between codes i and i + 1 (NF4 is sorted)
    above = torch.nextafter(bounds, torch.tensor(1.0))
    x = _block([1.0, bounds[7].item(), above[7].item(), bounds[6].item(), above[6].item(), -1.0, bounds[0].item()])
    w = formats.quantize_4bit(x, "nf4", block_size=32, double_quant=False)
    assert formats.unpack_nibbles(w.codes, 8).tolist() == [15, 7, 8, 6, 7, 0, 0, 7]
    codes, state = bnb_f.quantize_4bit(x, blocksize=32, quant_type="nf4", compress_statistics=False)
    assert torch.equal(w.codes, codes)


def test_fp4_hand_computed_codes():
    # FP4 codes by index: 3 -> 1.0, 4 -> 1/3, 6 -> 1/6, 7 -> 0.25, 10 -> -2/3, 13 -> -0.5
    x = _block([1.0, 0.3, -0.6, 0.2])
    w = formats.quantize_4bit(x, "fp4", block_size=32, double_quant=False)
    # 0.3 -> 4 (above the 0.2917 midpoint of 0.25 and 1/3); -0.6 -> 10 (below -0.5833); 0.2 -> 6 (below 0.2083)
    assert w.codes.flatten()[:2].tolist() == [0x34, 0xA6]
    assert torch.equal(formats.dequantize_4bit(w)[:4], torch.tensor([1.0, 1 / 3, -2 / 3, 1 / 6]))


def test_partial_last_block_has_its_own_absmax():
    x = torch.cat([_block([4.0, -1.0]), torch.tensor([0.5, -0.25, 0.1])])  # 32 + 3 elements
    w = formats.quantize_4bit(x, "nf4", block_size=32, double_quant=False)
    assert w.absmax.tolist() == [4.0, 0.5]
    assert w.codes.shape == (18, 1)
    # tail scaled by 0.5: [1, -0.5, 0.2] -> [15, 2, 9], then the pad nibble (0.0 -> 7)
    assert formats.unpack_nibbles(w.codes, 36)[32:].tolist() == [15, 2, 9, 7]


def test_all_zero_blocks_dequantize_to_zero():
    x = torch.zeros(70)  # two full blocks and a partial one
    w = formats.quantize_4bit(x, "nf4", block_size=32, double_quant=False)
    assert torch.all(w.codes == 0x77)
    assert torch.equal(formats.dequantize_4bit(w), x)


def test_pack_and_unpack_nibbles():
    q = torch.tensor([1, 2, 15, 0, 7, 9], dtype=torch.uint8)
    packed = formats.pack_nibbles(q)
    assert packed.shape == (3, 1) and packed.flatten().tolist() == [0x12, 0xF0, 0x79]
    assert formats.unpack_nibbles(packed, 5).tolist() == [1, 2, 15, 0, 7]
    with pytest.raises(ValueError, match="pack_nibbles needs an even count; pad first"):
        formats.pack_nibbles(q[:5])


# --- bit-exactness with bitsandbytes (no double quantization) ------------------------------------------------------------


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("shape", ODD_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", formats.FOUR_BIT_FORMATS)
def test_quantize_4bit_equals_bitsandbytes(fmt, dtype, shape, block_size):
    x = _randn(shape, dtype, seed=block_size + shape[0])
    w = formats.quantize_4bit(x, fmt, block_size, double_quant=False)
    codes, state = bnb_f.quantize_4bit(x, blocksize=block_size, quant_type=fmt, compress_statistics=False)
    assert torch.equal(w.codes, codes)
    assert w.absmax.dtype == torch.float32 and torch.equal(w.absmax, state.absmax)


@pytest.mark.parametrize("fmt", formats.FOUR_BIT_FORMATS)
def test_quantize_4bit_equals_bitsandbytes_on_values_at_the_edges(fmt):
    # exact code values times an absmax, their midpoints, zeros and a repeated absmax: every rounding edge case
    code = formats.code_4bit(fmt)
    bounds, _ = formats.rounding_bounds_4bit(fmt)
    x = torch.cat([code, bounds, torch.nextafter(bounds, torch.tensor(2.0)), torch.zeros(8), torch.full((5,), -1.0)]) * 3.7
    for block_size in (32, 64):
        w = formats.quantize_4bit(x, fmt, block_size, double_quant=False)
        codes, state = bnb_f.quantize_4bit(x, blocksize=block_size, quant_type=fmt, compress_statistics=False)
        assert torch.equal(w.codes, codes)
        assert torch.equal(w.absmax, state.absmax)


@pytest.mark.parametrize("block_size", (64, 256))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", formats.FOUR_BIT_FORMATS)
@pytest.mark.parametrize("double_quant", (False, True), ids=("plain", "double_quant"))
def test_dequantize_4bit_equals_bitsandbytes(fmt, dtype, block_size, double_quant):
    # rows of 256: bitsandbytes' CPU kernel is only right when no block straddles two rows (see test_kernels.py)
    x = _randn((12, 256), dtype, seed=3)
    codes, state = bnb_f.quantize_4bit(x, blocksize=block_size, quant_type=fmt, compress_statistics=double_quant)
    w = kernels.four_bit_from_state(codes, state, tuple(x.shape))
    expected = bnb_f.dequantize_4bit(codes, state)
    assert expected.dtype == dtype
    assert torch.equal(formats.dequantize_4bit(w, dtype), expected)


@pytest.mark.parametrize("fmt", formats.FOUR_BIT_FORMATS)
def test_dequantize_4bit_blocks_run_over_the_flattened_weight(fmt):
    # rows of 96 with blocks of 64: blocks straddle rows; each value is its code times the absmax of its flat block
    x = _randn((5, 96), seed=12)
    w = formats.quantize_4bit(x, fmt, block_size=64, double_quant=False)
    q = formats.unpack_nibbles(w.codes, 480)  # (480,)
    expected = formats.code_4bit(fmt)[q] * w.absmax[torch.arange(480) // 64]  # (480,)
    assert torch.equal(formats.dequantize_4bit(w), expected.view(5, 96))
    assert torch.equal(formats.dequantize_4bit(w, torch.bfloat16), expected.view(5, 96).bfloat16())


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_dequantize_4bit_equals_bitsandbytes_for_odd_rows(dtype):
    # bitsandbytes routes odd row lengths to its generic (torch.compile'd) path: one shape only, compiling is slow
    x = _randn((37, 129), dtype, seed=4)
    codes, state = bnb_f.quantize_4bit(x, blocksize=64, quant_type="nf4", compress_statistics=True)
    w = kernels.four_bit_from_state(codes, state, tuple(x.shape))
    assert torch.equal(formats.dequantize_4bit(w, dtype), bnb_f.dequantize_4bit(codes, state))


@pytest.mark.parametrize("fmt", formats.FOUR_BIT_FORMATS)
def test_round_trip_error_is_within_half_a_code_gap(fmt):
    x = _randn((16, 64))
    w = formats.quantize_4bit(x, fmt, block_size=64, double_quant=False)
    code = torch.sort(formats.code_4bit(fmt)).values
    max_gap = (code[1:] - code[:-1]).max()
    err = (formats.dequantize_4bit(w) - x).abs().view(-1, 64)  # (n_blocks, block)
    assert torch.all(err <= max_gap / 2 * w.absmax.view(-1, 1) * (1 + 1e-6))


# --- 8-bit blockwise (double quantization) ---------------------------------------------------------------------------


def _true_nearest(values: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """Index of the nearest dynamic-map value to each value / its block's absmax (ties: lower index)."""
    normed = values / absmax.repeat_interleave(formats.NESTED_BLOCK_SIZE)[: values.numel()]  # (n,)
    return (normed.unsqueeze(1) - formats.dynamic_map()).abs().argmin(dim=1)  # (n,)


def test_8bit_reference_rounds_to_the_nearest_code():
    # blocks led by 1.0 (absmax exactly 1) with values in [-0.98, 1]: away from the map's first entry, see the xfail below
    values = torch.rand(8, 256, generator=torch.Generator().manual_seed(0)) * 1.98 - 0.98
    values[:, 0] = 1.0
    values = values.reshape(-1)
    codes, absmax = formats.quantize_blockwise_8bit(values)
    assert codes.dtype == torch.uint8 and torch.equal(absmax, torch.ones(8))
    assert torch.equal(codes.long(), _true_nearest(values, absmax))


def test_8bit_reference_rounds_to_the_nearest_code_on_normal_data_with_partial_block():
    values = _randn((1000,), seed=5)
    values = values[(values / values.abs().max()) > -0.98]  # see the xfail below for values near -1
    codes, absmax = formats.quantize_blockwise_8bit(values)
    assert absmax.shape == (-(-values.numel() // 256),)
    assert torch.equal(codes.long(), _true_nearest(values, absmax))


def test_8bit_reference_rounds_to_the_nearest_code_next_to_minus_one():
    values = torch.cat([torch.tensor([1.0]), torch.linspace(-1.0, -0.97, 61)])
    codes, absmax = formats.quantize_blockwise_8bit(values)
    assert torch.equal(codes.long(), _true_nearest(values, absmax))


def test_8bit_all_zero_block_gets_the_code_of_zero():
    codes, absmax = formats.quantize_blockwise_8bit(torch.zeros(5))
    assert absmax.tolist() == [0.0]
    assert codes.tolist() == [int(torch.nonzero(formats.dynamic_map() == 0))] * 5


def test_8bit_reference_agrees_with_bitsandbytes_on_almost_every_value():
    values = _randn((20000,), seed=6)
    codes, absmax = formats.quantize_blockwise_8bit(values)
    bnb_codes, state = bnb_f.quantize_blockwise(values, blocksize=256)
    assert torch.equal(absmax, state.absmax)
    assert (codes != bnb_codes).float().mean() <= 0.01
    # bitsandbytes' approximate search is off by at most one code, except among the densely spaced codes next to zero
    steps = (codes.int() - bnb_codes.int()).abs()  # (n,)
    tiny = (values / absmax.repeat_interleave(256)[: values.numel()]).abs() < 1e-4  # (n,)
    assert steps[~tiny].max() <= 1
    code = formats.dynamic_map()
    assert (code[codes.long()] - code[bnb_codes.long()]).abs().max() <= 0.015  # the widest gap of the map is 0.0141


def test_8bit_dequantize_inverts_quantize_within_half_a_step():
    values = _randn((600,), seed=7)
    codes, absmax = formats.quantize_blockwise_8bit(values)
    back = formats.dequantize_blockwise_8bit(codes, absmax)
    assert back.shape == values.shape
    code = formats.dynamic_map()
    gap = torch.maximum(
        code[(codes.long() + 1).clamp(max=255)] - code[codes.long()], code[codes.long()] - code[(codes.long() - 1).clamp(min=0)]
    )
    scale = absmax.repeat_interleave(256)[:600]
    assert torch.all((back - values).abs() <= gap * scale / 2 * (1 + 1e-5))


def test_double_quantize_stores_offset_and_nested_absmax():
    absmax = torch.rand(300, generator=torch.Generator().manual_seed(8)) + 0.5
    codes, nested_absmax, offset = formats.double_quantize(absmax)
    assert codes.shape == (300,) and codes.dtype == torch.uint8
    assert nested_absmax.shape == (2,)
    assert torch.equal(offset, absmax.mean())
    back = formats.dequantize_blockwise_8bit(codes, nested_absmax) + offset
    assert torch.allclose(back, absmax, atol=0.02)


def test_four_bit_weight_with_double_quant_dequantizes_like_bitsandbytes():
    x = _randn((40, 96), seed=9)
    w = formats.quantize_4bit(x, "nf4", block_size=32)
    assert w.absmax.dtype == torch.uint8 and w.absmax.shape == (120,)
    assert w.nested_absmax.shape == (1,) and w.nested_offset.shape == ()
    codes, state = bnb_f.quantize_4bit(x, blocksize=32, quant_type="nf4", compress_statistics=True)
    assert torch.equal(w.codes, codes)
    assert torch.equal(w.nested_offset, state.offset)
    assert torch.equal(w.float_absmax(), bnb_f.dequantize_blockwise(state.absmax, state.state2) + state.offset)


# --- int8 rows ----------------------------------------------------------------------------------------------------------


def test_int8_rows_hand_computed():
    w = torch.tensor([[1.0, -0.5, 0.25, 0.0], [2.0, -4.0, 1.0, 3.0], [0.0, 0.0, 0.0, 0.0]])
    q, absmax = formats.quantize_int8_rows(w)
    assert q.dtype == torch.int8 and absmax.dtype == torch.float32
    # 127 * [1, -0.5, 0.25, 0] = [127, -63.5 (half to even: -64), 31.75, 0]; 127/4 * [2, -4, 1, 3] = [63.5, -127, 31.75, 95.25]
    assert q.tolist() == [[127, -64, 32, 0], [64, -127, 32, 95], [0, 0, 0, 0]]
    assert absmax.tolist() == [1.0, 4.0, 0.0]
    assert torch.equal(formats.dequantize_int8_rows(q, absmax)[2], torch.zeros(4))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_int8_rows_round_trip_error(dtype):
    w = _randn((13, 37), dtype, seed=10)
    q, absmax = formats.quantize_int8_rows(w)
    back = formats.dequantize_int8_rows(q, absmax)
    assert back.dtype == torch.float32
    assert torch.all((back - w.float()).abs() <= (absmax / 254).unsqueeze(1) * (1 + 1e-5))
    assert formats.dequantize_int8_rows(q, absmax, dtype).dtype == dtype


def test_int8_blocks_hand_computed():
    # blocks of 2 columns, the last one shorter: each block rounds against its own absmax
    w = torch.tensor([[1.0, -0.5, 0.25, 0.125, 8.0], [0.0, 0.0, 2.0, -4.0, 0.0]])
    q, absmax = formats.quantize_int8_blocks(w, block=2)
    assert absmax.tolist() == [[1.0, 0.25, 8.0], [0.0, 4.0, 0.0]]
    assert q.tolist() == [[127, -64, 127, 64, 127], [0, 0, 64, -127, 0]]  # 63.5 rounds half to even
    back = formats.dequantize_int8_blocks(q, absmax, block=2)[1]
    assert torch.equal(back, torch.tensor([0.0, 0.0, 64.0, -127.0, 0.0]) * torch.tensor(4.0 / 127))


@pytest.mark.parametrize("shape", ((13, 37), (4, 128), (3, 300)), ids=str)
def test_int8_blocks_round_trip_error_and_the_row_wise_case(shape):
    w = _randn(shape, torch.bfloat16, seed=11)
    q, absmax = formats.quantize_int8_blocks(w)
    assert q.shape == shape and q.dtype == torch.int8 and absmax.shape == (shape[0], -(-shape[1] // formats.INT8_BLOCK))
    back = formats.dequantize_int8_blocks(q, absmax)
    bound = (absmax / 254).repeat_interleave(formats.INT8_BLOCK, dim=1)[:, : shape[1]]
    assert torch.all((back - w.float()).abs() <= bound * (1 + 1e-5))
    # one block per row (block >= K) is the row-wise format, bit for bit
    q_rows, absmax_rows = formats.quantize_int8_rows(w)
    q_one, absmax_one = formats.quantize_int8_blocks(w, block=shape[1])
    assert torch.equal(q_one, q_rows) and torch.equal(absmax_one[:, 0], absmax_rows)
    if shape[1] > formats.INT8_BLOCK:  # a large weight coarsens its block's steps, not its row's
        w[:, 0] *= 50.0
        rows_error = (formats.dequantize_int8_rows(*formats.quantize_int8_rows(w)) - w.float()).norm()
        assert (formats.dequantize_int8_blocks(*formats.quantize_int8_blocks(w)) - w.float()).norm() < 0.8 * rows_error
    with pytest.raises(ValueError, match="does not fit"):
        formats.dequantize_int8_blocks(q, absmax, block=16)


def test_int8_rows_agree_with_bitsandbytes_within_one_step():
    w = _randn((31, 65), seed=11)
    q, absmax = formats.quantize_int8_rows(w)
    bnb_q, bnb_absmax, outliers = bnb_f.int8_vectorwise_quant(w)
    assert outliers is None
    assert torch.equal(absmax, bnb_absmax)
    assert (q.int() - bnb_q.int()).abs().max() <= 1


def test_quantized_nbytes_skips_none():
    assert formats.quantized_nbytes([torch.zeros(3, dtype=torch.uint8), None, torch.zeros(2)]) == 3 + 8
