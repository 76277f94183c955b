"""`attend_prompt_rows` (csrc/ops_cpu.cpp): a prompt's causal attention against SDPA and the exact math."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llmslim.quant import kernels

needs_kernel = pytest.mark.skipif(not kernels.prompt_attention_kernel(), reason="attend_prompt_rows is built for AVX-512 BF16")


def _bf16(shape: tuple[int, ...], seed: int, scale: float = 1.0) -> torch.Tensor:
    return (scale * torch.randn(shape, generator=torch.Generator().manual_seed(seed))).to(torch.bfloat16)


def _operands(heads: int, kv_heads: int, rows: int, seen: int, d: int, seed: int):
    q = _bf16((1, heads, rows, d), seed=seed, scale=2.0)
    k, v = _bf16((1, kv_heads, seen, d), seed=seed + 1, scale=2.0), _bf16((1, kv_heads, seen, d), seed=seed + 2)
    return q, k, v


def _end_aligned_mask(rows: int, seen: int) -> torch.Tensor:
    """Query i (position seen - rows + i) sees keys 0 .. seen - rows + i."""
    return torch.arange(seen)[None, :] <= (seen - rows + torch.arange(rows))[:, None]


def _within_a_step(got: torch.Tensor, want: torch.Tensor) -> bool:
    return bool(((got.float() - want.float()).abs() <= 2**-7 * want.float().abs().clamp(min=1)).all())


def _flat(out: torch.Tensor) -> torch.Tensor:  # SDPA's (1, H, T, d) as the operator's (1, T, H * d)
    return out.transpose(1, 2).reshape(1, out.shape[2], -1)


# (heads, kv_heads, rows, d): SmolLM2's and the 1.1B's head shapes, rows that end a 4-row group or a 32-row block
# early, one row, d not a multiple of 64 (the value product's column chunks) and the largest d
SHAPES = [(9, 3, 70, 64), (32, 4, 129, 64), (6, 2, 7, 128), (4, 4, 1, 64), (2, 1, 33, 80), (3, 1, 5, 16), (2, 2, 40, 256)]


@needs_kernel
@pytest.mark.parametrize(("heads", "kv_heads", "rows", "d"), SHAPES)
def test_a_prompt_attends_as_causal_sdpa_to_rounding(heads, kv_heads, rows, d):
    q, k, v = _operands(heads, kv_heads, rows, rows, d, seed=heads + rows)
    scale = d**-0.5
    got = torch.ops.llmslim.attend_prompt_rows(q, k, v, scale)
    sdpa = _flat(F.scaled_dot_product_attention(q, k, v, scale=scale, is_causal=True, enable_gqa=True))
    exact = _flat(F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=scale, is_causal=True, enable_gqa=True))
    assert got.shape == (1, rows, heads * d) and got.dtype == torch.bfloat16
    # sums in another order than SDPA's GEMMs, the whole row's max instead of a running one: at most a bf16 step apart
    # (of the output's own size, or of 1 where cancellation made it smaller), and no further from the exact result
    assert _within_a_step(got, sdpa)
    assert float((got != sdpa).float().mean()) < 0.15
    assert float((got.double() - exact).abs().max()) <= 1.25 * float((sdpa.double() - exact).abs().max())
    # the first query sees the first key only: its output is that key's value, as is
    first = got[0, 0].view(heads, d)
    assert torch.equal(first, v[0, :, 0].repeat_interleave(heads // kv_heads, 0))


@needs_kernel
@pytest.mark.parametrize(("rows", "seen"), [(5, 40), (37, 100), (1, 9)])
def test_a_prompt_after_cached_positions_sees_them_all(rows, seen):
    q, k, v = _operands(8, 2, rows, seen, 64, seed=rows)
    got = torch.ops.llmslim.attend_prompt_rows(q, k, v, 0.125)
    mask = _end_aligned_mask(rows, seen)
    exact = _flat(F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask, scale=0.125, enable_gqa=True))
    sdpa = _flat(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.125, enable_gqa=True))
    assert _within_a_step(got, sdpa)
    assert float((got.double() - exact).abs().max()) <= 1.25 * float((sdpa.double() - exact).abs().max())


@needs_kernel
def test_a_prompt_reads_any_layout_and_thread_count_alike():
    q, k, v = _operands(12, 3, 75, 75, 64, seed=5)
    want = torch.ops.llmslim.attend_prompt_rows(q, k, v, 0.125)
    # transformers' layout: (1, T, H, d) projections transposed to (1, H, T, d) views
    q_t, k_t, v_t = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert torch.equal(torch.ops.llmslim.attend_prompt_rows(q_t, k_t, v_t, 0.125), want)
    room = torch.zeros(1, 3, 128, 64, dtype=torch.bfloat16)  # a static cache's buffer, the positions a slice of it
    k_room, v_room = room.clone(), room.clone()
    k_room[:, :, :75], v_room[:, :, :75] = k, v
    assert torch.equal(torch.ops.llmslim.attend_prompt_rows(q, k_room[:, :, :75], v_room[:, :, :75], 0.125), want)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            assert torch.equal(torch.ops.llmslim.attend_prompt_rows(q, k, v, 0.125), want)
    finally:
        torch.set_num_threads(before)


@needs_kernel
def test_scores_far_apart_stay_finite():
    q, k, v = _operands(4, 2, 20, 20, 64, seed=3)
    got = torch.ops.llmslim.attend_prompt_rows(q * 30, k, v, 0.125)  # scores in the hundreds: exp underflows to 0
    exact = _flat(F.scaled_dot_product_attention((q * 30).double(), k.double(), v.double(), scale=0.125, is_causal=True, enable_gqa=True))
    assert bool(torch.isfinite(got).all())
    assert float((got.double() - exact).abs().max()) <= 2**-6


@needs_kernel
def test_a_bad_operand_is_named():
    q, k, v = _operands(6, 4, 10, 10, 64, seed=0)
    with pytest.raises(RuntimeError, match=r"query heads \(6\) a multiple of key/value heads \(4\)"):
        torch.ops.llmslim.attend_prompt_rows(q, k, v, 0.125)
    q, k, v = _operands(8, 4, 10, 10, 64, seed=0)
    with pytest.raises(RuntimeError, match="q, k and v as bfloat16 CPU tensors"):
        torch.ops.llmslim.attend_prompt_rows(q, k.float(), v, 0.125)
    with pytest.raises(RuntimeError, match="a multiple of 16, at most 256"):
        torch.ops.llmslim.attend_prompt_rows(q[..., :24], k[..., :24], v[..., :24], 0.125)
    with pytest.raises(RuntimeError, match="at least its positions"):
        torch.ops.llmslim.attend_prompt_rows(q, k[:, :, :9], v[:, :, :9], 0.125)
    with pytest.raises(RuntimeError, match="must be alike"):
        torch.ops.llmslim.attend_prompt_rows(q, k, v[:, :, :9], 0.125)
