"""The fused operators of the lean decode step (csrc/ops_cpu.cpp): each against the torch expression it replaces."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

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
