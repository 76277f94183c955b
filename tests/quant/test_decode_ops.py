"""The fused operators of the lean decode step (csrc/ops_cpu.cpp): each against the torch expression it replaces."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmslim.hf import decode
from llmslim.quant import formats, kernels, native

needs_ops = pytest.mark.skipif(not native.load_ops(), reason="llmslim's CPU operators cannot be built here (no C++ compiler)")
needs_decode_kernels = pytest.mark.skipif(
    not kernels.decode_kernels(), reason="llmslim's decode operators need AVX-512 BF16/VNNI and a C++ compiler"
)


def _bf16(shape: tuple[int, ...], seed: int, scale: float = 1.0) -> torch.Tensor:
    return (scale * torch.randn(shape, generator=torch.Generator().manual_seed(seed))).to(torch.bfloat16)


def _ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many bf16 steps apart two bf16 tensors of one sign pattern are (0 where equal)."""
    return (a.view(torch.int16).int() - b.view(torch.int16).int()).abs()


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:  # LlamaRMSNorm.forward
    xf = x.to(torch.float32)
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


@needs_decode_kernels
@pytest.mark.parametrize("rows", (1, 2, 5))
@pytest.mark.parametrize("threads", (1, 2))
@pytest.mark.parametrize("block", (32, 64, 128))
def test_gemv_4bit_multi_equals_one_call_per_weight(rows, threads, block):
    k, ns = 256, (96, 32, 160)
    weights = [formats.quantize_4bit(_bf16((n, k), seed=n).float(), "nf4", block, double_quant=False) for n in ns]
    packed, absmax = zip(*(kernels.pack_4bit_for_cpu(w) for w in weights), strict=True)
    code = formats.code_4bit("nf4")
    x = _bf16((rows, k), seed=1)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        outs = torch.ops.llmslim.gemv_4bit_multi(x, list(packed), list(absmax), code, list(ns), block)
        singles = [torch.ops.llmslim.gemv_4bit_cpu_layout(x, p, a, code, n, k, block) for p, a, n in zip(packed, absmax, ns, strict=True)]
    finally:
        torch.set_num_threads(before)
    assert [o.shape for o in outs] == [(rows, n) for n in ns]
    for out, single in zip(outs, singles, strict=True):
        assert torch.equal(out, single)


@needs_decode_kernels
def test_gemv_4bit_multi_rejects_mismatched_operands():
    w = formats.quantize_4bit(_bf16((32, 64), seed=0).float(), "nf4", 64, double_quant=False)
    packed, absmax = kernels.pack_4bit_for_cpu(w)
    code = formats.code_4bit("nf4")
    with pytest.raises(RuntimeError, match="as many packed weights"):
        torch.ops.llmslim.gemv_4bit_multi(_bf16((1, 64), 0), [packed, packed], [absmax], code, [32, 32], 64)
    with pytest.raises(RuntimeError, match="bfloat16"):
        torch.ops.llmslim.gemv_4bit_multi(_bf16((1, 64), 0).float(), [packed], [absmax], code, [32], 64)
    with pytest.raises(RuntimeError, match="N % 32"):
        torch.ops.llmslim.gemv_4bit_multi(_bf16((1, 64), 0), [packed], [absmax], code, [16], 64)


@needs_ops
@pytest.mark.parametrize("d", (64, 128, 6))
def test_rotary_rows_equals_the_torch_expression_bit_for_bit(d):
    q = _bf16((1, 9, 1, d), seed=2, scale=3.0)
    cos, sin = _bf16((1, 1, d), seed=3).clamp(-1, 1), _bf16((1, 1, d), seed=4).clamp(-1, 1)
    half = d // 2
    want = q * cos.unsqueeze(1) + torch.cat((-q[..., half:], q[..., :half]), dim=-1) * sin.unsqueeze(1)
    assert torch.equal(torch.ops.llmslim.rotary_rows(q, cos, sin), want)


@needs_ops
def test_silu_mul_rows_equals_the_torch_expression_to_rounding():
    g, u = _bf16((3, 4096), seed=5, scale=4.0), _bf16((3, 4096), seed=6, scale=2.0)
    got, want = torch.ops.llmslim.silu_mul_rows(g, u), F.silu(g) * u
    apart = _ulps_apart(got, want)
    assert int(apart.max()) <= 1  # exp from the C library, not torch's vectorized one: at most one bf16 step
    assert float((apart > 0).float().mean()) < 0.01


@needs_ops
@pytest.mark.parametrize("hidden", (576, 2048, 64))
def test_add_rms_norm_rows_equals_the_torch_expressions_to_rounding(hidden):
    x, y = _bf16((4, hidden), seed=7), _bf16((4, hidden), seed=8, scale=0.5)
    weight, eps = _bf16((hidden,), seed=9, scale=0.2) + 1, 1e-5
    total, normed = torch.ops.llmslim.add_rms_norm_rows(x, y, weight, eps)
    assert torch.equal(total, x + y)
    want = _rms_norm(x + y, weight, eps)
    apart = _ulps_apart(normed, want)
    assert int(apart.max()) <= 1  # the sum of squares, added in another order
    assert float((apart > 0).float().mean()) < 0.01
    assert torch.equal(torch.ops.llmslim.rms_norm_rows(total, weight, eps), normed)


@needs_ops
def test_the_row_operators_name_a_bad_operand():
    x = _bf16((1, 64), seed=0)
    with pytest.raises(RuntimeError, match="rms_norm_rows' x must be a contiguous bfloat16"):
        torch.ops.llmslim.rms_norm_rows(x.float(), x[0], 1e-5)
    with pytest.raises(RuntimeError, match="weight has 32 values for rows of 64"):
        torch.ops.llmslim.rms_norm_rows(x, x[0, :32].contiguous(), 1e-5)
    with pytest.raises(RuntimeError, match="one position's cos and sin of 64"):
        torch.ops.llmslim.rotary_rows(x, x[0, :32].contiguous(), x[0, :32].contiguous())
    with pytest.raises(RuntimeError, match="silu_mul_rows multiplies"):
        torch.ops.llmslim.silu_mul_rows(x, x[:, :32].contiguous())


def _attention_operands(heads: int, kv_heads: int, seen: int, d: int, seed: int):
    q = _bf16((1, heads, 1, d), seed=seed)
    k, v = _bf16((1, kv_heads, seen, d), seed=seed + 1, scale=2.0), _bf16((1, kv_heads, seen, d), seed=seed + 2)
    return q, k, v


ATTENTION_SHAPES = [(9, 3, 200, 64), (32, 4, 301, 64), (8, 2, 37, 80), (2, 1, 600, 128), (6, 3, 5, 12)]  # SmolLM2's, the 1.1B's, odd


@needs_ops
@pytest.mark.parametrize(("heads", "kv_heads", "seen", "d"), ATTENTION_SHAPES)
def test_attend_one_rows_computes_sdpa_to_rounding(heads, kv_heads, seen, d):
    q, k, v = _attention_operands(heads, kv_heads, seen, d, seed=heads + seen)
    scale = d**-0.5
    got = torch.ops.llmslim.attend_one_rows(q, k, v, scale)
    sdpa = F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True).reshape(1, -1)
    exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=scale, enable_gqa=True).reshape(1, -1)
    assert got.shape == (1, heads * d) and got.dtype == torch.bfloat16
    # the dot products and the weighted sum of v add in another order than SDPA's GEMMs: at most a bf16 step of the
    # outputs' scale (|v| ~ 1, so 2^-7; an output near 0 after cancellation may be several of its own steps off)
    assert float((got.float() - sdpa.float()).abs().max()) <= 2**-7
    assert float((got != sdpa).float().mean()) < 0.15
    assert float((got.double() - exact).abs().max()) <= 1.25 * float((sdpa.double() - exact).abs().max())  # no less exact


@needs_ops
def test_attend_one_rows_reads_any_cache_layout_and_thread_count_alike():
    q, k, v = _attention_operands(8, 2, 70, 64, seed=11)
    want = torch.ops.llmslim.attend_one_rows(q, k, v, 0.125)
    room = torch.zeros(1, 2, 128, 64, dtype=torch.bfloat16)  # a static cache's buffer, the seen positions a slice of it
    k_room, v_room = room.clone(), room.clone()
    k_room[:, :, :70], v_room[:, :, :70] = k, v
    seq_major_k, seq_major_v = k.transpose(1, 2).contiguous().transpose(1, 2), v.transpose(1, 2).contiguous().transpose(1, 2)
    assert torch.equal(torch.ops.llmslim.attend_one_rows(q, k_room[:, :, :70], v_room[:, :, :70], 0.125), want)
    assert torch.equal(torch.ops.llmslim.attend_one_rows(q, seq_major_k, seq_major_v, 0.125), want)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert torch.equal(torch.ops.llmslim.attend_one_rows(q, k, v, 0.125), want)
    finally:
        torch.set_num_threads(before)
    # one position: every head's output is its key/value head's v, as is
    one = torch.ops.llmslim.attend_one_rows(q, k[:, :, :1], v[:, :, :1], 0.125).view(2, 4, 64)
    assert torch.equal(one, v[0, :, :1].expand(2, 4, 64))


@needs_ops
def test_attend_one_rows_names_a_bad_operand():
    q, k, v = _attention_operands(6, 4, 10, 64, seed=0)
    with pytest.raises(RuntimeError, match=r"query heads \(6\) a multiple of key/value heads \(4\)"):
        torch.ops.llmslim.attend_one_rows(q, k, v, 0.125)
    q, k, v = _attention_operands(8, 4, 10, 64, seed=0)
    with pytest.raises(RuntimeError, match="k and v as bfloat16"):
        torch.ops.llmslim.attend_one_rows(q, k.float(), v, 0.125)
    with pytest.raises(RuntimeError, match="with head size 64"):
        torch.ops.llmslim.attend_one_rows(q, k, v[..., :32], 0.125)
    with pytest.raises(RuntimeError, match="one query token"):
        torch.ops.llmslim.attend_one_rows(q.expand(1, 8, 2, 64).contiguous(), k, v, 0.125)


needs_layer_ops = pytest.mark.skipif(not kernels.lean_layer_ops(), reason="the layer operators are built for AVX2 and AVX-512 BF16")


@needs_layer_ops
def test_the_layer_operators_name_a_bad_plan():
    k, d, ns, ops = 128, 32, [128, 64, 64], torch.ops.llmslim
    weights, scales = zip(*(kernels.quantize_int8_rows(_bf16((n, k), seed=n).float()) for n in ns), strict=True)
    weights, scales = list(weights), list(scales)
    x, norm = _bf16((1, k), seed=1), _bf16((k,), seed=2)
    cos, sin = _bf16((1, 1, d), seed=3), _bf16((1, 1, d), seed=4)
    int8 = decode.LEAN_INT8
    q, key, v = ops.lean_qkv(x, norm, 1e-5, int8, weights, scales, None, [None] * 3, ns, 0, cos, sin, d)
    assert q.shape == (1, 4, 1, d) and key.shape == v.shape == (1, 2, 1, d)
    with pytest.raises(RuntimeError, match="takes 3 weights .* got 2, 2, 3, 3"):
        ops.lean_qkv(x, norm, 1e-5, int8, weights[:2], scales[:2], None, [None] * 3, ns, 0, cos, sin, d)
    with pytest.raises(RuntimeError, match="has no weight kind 7 in this build"):
        ops.lean_qkv(x, norm, 1e-5, 7, weights, scales, None, [None] * 3, ns, 0, cos, sin, d)
    with pytest.raises(RuntimeError, match="int8 weight 0 has .* rows, not 96"):
        ops.lean_qkv(x, norm, 1e-5, int8, weights, scales, None, [None] * 3, [96, 64, 64], 0, cos, sin, d)
    with pytest.raises(RuntimeError, match="not whole heads of 48"):
        ops.lean_qkv(x, norm, 1e-5, int8, weights, scales, None, [None] * 3, ns, 0, cos, sin, 48)
    with pytest.raises(RuntimeError, match="a bias of 7 values for 128 outputs"):
        ops.lean_qkv(x, norm, 1e-5, int8, weights, scales, None, [_bf16((7,), 5), None, None], ns, 0, cos, sin, d)
    with pytest.raises(RuntimeError, match=r"one token's row \(1, hidden\)"):
        ops.lean_qkv(x.expand(2, k).contiguous(), norm, 1e-5, int8, weights, scales, None, [None] * 3, ns, 0, cos, sin, d)
    with pytest.raises(RuntimeError, match="takes 4 weights"):
        ops.lean_out(x, q, key, v, 0.125, int8, weights, scales, None, [None] * 3, ns, 0, norm, 1e-5)
    four_bit = decode.LEAN_4BIT_I16 if kernels._i16_kernel() else decode.LEAN_4BIT_TILES
    with pytest.raises(RuntimeError, match="4-bit weights need their table"):
        ops.lean_qkv(x, norm, 1e-5, four_bit, weights, scales, None, [None] * 3, ns, 64, cos, sin, d)
    if kernels._i16_kernel():
        nf4 = [formats.quantize_4bit(_bf16((n, k), seed=n).float(), "nf4", 64, double_quant=False) for n in ns]
        codes, uint8, table = [w.codes for w in nf4], [w.absmax.to(torch.uint8) for w in nf4], kernels._code_4bit("nf4")
        with pytest.raises(RuntimeError, match="takes float32 absmax .* got Byte"):
            ops.lean_qkv(x, norm, 1e-5, four_bit, codes, uint8, table, [None] * 3, ns, 64, cos, sin, d)


@needs_layer_ops
@pytest.mark.parametrize("rows", (1, 2, 3))
@pytest.mark.parametrize("threads", (1, 2))
@pytest.mark.parametrize("per_block", (False, True))
def test_gemv_int8_rows_multi_equals_one_call_per_weight(rows, threads, per_block):
    k, ns = 384, (96, 37, 161)  # N % 4 != 0: the last rows one by one
    x = _bf16((rows, k), seed=1)
    if per_block:
        pairs = [kernels.quantize_int8_blocks(_bf16((n, k), seed=n)) for n in ns]
    else:
        pairs = [kernels.quantize_int8_rows(_bf16((n, k), seed=n).float()) for n in ns]
    weights, absmax = [w for w, _ in pairs], [a for _, a in pairs]
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        outs = torch.ops.llmslim.gemv_int8_rows_multi(x, weights, absmax)
        singles = [torch.ops.llmslim.gemv_int8_rows(x, w, a) for w, a in zip(weights, absmax, strict=True)]
    finally:
        torch.set_num_threads(before)
    assert [o.shape for o in outs] == [(rows, n) for n in ns]
    assert all(torch.equal(o, one) for o, one in zip(outs, singles, strict=True))  # bit for bit
    with pytest.raises(RuntimeError, match="as many weights as absmax"):
        torch.ops.llmslim.gemv_int8_rows_multi(x, weights, absmax[:2])
