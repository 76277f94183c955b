"""The numerical contract of llmslim's weight formats, in plain PyTorch.

Everything here is the reference: readable, slow, and bit-for-bit equal to bitsandbytes where the
format is the same (NF4/FP4 codes and absmax, the 8-bit dynamic map used for double quantization).
Fast kernels live in `kernels.py` and are tested against these functions.

Layouts (all bitsandbytes-compatible):

- 4-bit (NF4/FP4): the weight is flattened, cut into blocks of `block_size` elements, each block
  scaled by its absmax into [-1, 1] and rounded to the nearest of 16 code values. Two codes are
  packed per byte, the first element in the high nibble: `codes` has shape `(ceil(n / 2), 1)`.
- Double quantization (QLoRA): the float32 absmax vector minus its mean (`offset`) is itself
  quantized blockwise (blocks of 256) to 8 bits with the signed dynamic map.
- LLM.int8 weights: row-wise (vector-wise) absmax, `int8 = round(w * 127 / absmax_row)`.

And llmslim's own:

- int4 (groupwise asymmetric uniform): each row of the `(out, in)` weight is cut into groups of
  `group_size` (the last one may be shorter); `w = (q - 8) * scale + zero` with `q` in 0..15 and
  float16 `scale`, `zero` per group (`(out, ceil(in / group_size))` each). Codes are packed like
  the 4-bit formats above (row-major, first element in the high nibble). `scale` and `zero` come
  from the group's min and max, optionally refined by half-quadratic optimisation (HQQ).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch

FOUR_BIT_FORMATS = ("nf4", "fp4")
NESTED_BLOCK_SIZE = 256

# QLoRA's NormalFloat4: quantiles of N(0, 1) with an exact zero, normalised to [-1, 1].
_NF4_VALUES = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
# FP4 e2m1 with bitsandbytes' exponent bias, listed in bit-pattern order (bit 3 is the sign).
_FP4_VALUES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)


@cache
def code_4bit(fmt: str) -> torch.Tensor:
    """The 16 values a 4-bit code stands for, indexed by the code (float32, CPU)."""
    if fmt == "nf4":
        return torch.tensor(_NF4_VALUES, dtype=torch.float32)
    if fmt == "fp4":
        values = torch.tensor(_FP4_VALUES, dtype=torch.float32)
        return values / values.abs().max()
    raise ValueError(f"4-bit format must be one of {FOUR_BIT_FORMATS}, got {fmt!r}")


@cache
def rounding_bounds_4bit(fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Midpoints between sorted code values, and the map from sorted position to code."""
    code = code_4bit(fmt)
    order = torch.argsort(code)  # (16,)
    bounds = (code[order[:-1]] + code[order[1:]]) / 2  # (15,)
    return bounds, order.to(torch.uint8)


@cache
def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (Dettmers 2016), sorted, 256 float32 values."""
    max_exponent_bits, total_bits = 7, 8
    data: list[float] = []
    non_sign_bits = total_bits - 1
    additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
    for i in range(max_exponent_bits):
        fraction_items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1)
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    if additional_items > 0:
        boundaries = torch.linspace(0.1, 1, additional_items + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))
    return torch.tensor(sorted(data), dtype=torch.float32)


def _scale_blocks(flat: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax scaling of a flat float32 tensor into [-1, 1].

    The last, partial block is divided by its absmax while full blocks are multiplied by the
    reciprocal: that is what bitsandbytes does, and it decides the rounding of boundary values.
    """
    n = flat.numel()
    full = n - n % block_size
    blocks = flat[:full].view(-1, block_size)  # (n_blocks, block)
    absmax = blocks.abs().max(dim=-1).values  # (n_blocks,)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if full < n:
        tail_absmax = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_absmax.view(1)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail_absmax, -1, 1)])
    return scaled, absmax


def quantize_blockwise_8bit(values: torch.Tensor, block_size: int = NESTED_BLOCK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise 8-bit quantization with the dynamic map: each value divided by its block's absmax
    and rounded to the nearest map entry (ties to the lower one; an all-zero block codes 0.0).

    bitsandbytes' CPU kernel finds the entry with an approximate binary search that picks the
    second-nearest one for ~0.3% of values; `kernels` calls that kernel so that saved bytes match
    bitsandbytes, and tests hold both to this definition.

    Returns:
        `(codes, absmax)`: uint8 codes shaped like `values`, float32 absmax per block.
    """
    code = dynamic_map()
    flat = values.reshape(-1).float()
    n = flat.numel()
    n_blocks = -(-n // block_size)
    padded = torch.nn.functional.pad(flat, (0, n_blocks * block_size - n))
    absmax = padded.view(n_blocks, block_size).abs().amax(dim=1)  # (n_blocks,)
    normed = flat / absmax.repeat_interleave(block_size)[:n]  # (n,)
    normed = torch.nan_to_num(normed, nan=0.0)  # 0 / 0 in an all-zero block
    left = (torch.searchsorted(code, normed, right=True) - 1).clamp(0, 255)  # (n,) entry at or below
    right = (left + 1).clamp(max=255)
    closer_right = (normed - code[right]).abs() < (normed - code[left]).abs()
    codes = torch.where(closer_right, right, left).to(torch.uint8)
    return codes.view(values.shape), absmax


def dequantize_blockwise_8bit(codes: torch.Tensor, absmax: torch.Tensor, block_size: int = NESTED_BLOCK_SIZE) -> torch.Tensor:
    """Inverse of `quantize_blockwise_8bit`, in float32."""
    values = dynamic_map()[codes.reshape(-1).long()]  # (n,)
    scale = absmax.repeat_interleave(block_size)[: values.numel()]  # (n,)
    return (values * scale).view(codes.shape)


@dataclass
class FourBitWeight:
    """A 4-bit weight as stored: packed codes plus the state needed to dequantize it.

    With double quantization `absmax` is uint8 and `nested_absmax` / `nested_offset` are set;
    without it `absmax` is float32 and the nested fields are None.
    """

    codes: torch.Tensor  # (ceil(n / 2), 1) uint8
    absmax: torch.Tensor  # (n_blocks,) uint8 or float32
    nested_absmax: torch.Tensor | None  # (ceil(n_blocks / 256),) float32
    nested_offset: torch.Tensor | None  # () float32
    shape: tuple[int, ...]
    fmt: str
    block_size: int

    def float_absmax(self) -> torch.Tensor:
        """The per-block absmax as float32, undoing double quantization if present."""
        if self.nested_absmax is None:
            return self.absmax.float()
        return dequantize_blockwise_8bit(self.absmax, self.nested_absmax) + self.nested_offset


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit values (uint8, flat) two per byte, first in the high nibble: (ceil(n/2), 1)."""
    if q.numel() % 2:
        raise ValueError("pack_nibbles needs an even count; pad first")
    return ((q[::2] << 4) | q[1::2]).unsqueeze(1)


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes of any shape (row-major), packed as the formats store them: `pack_nibbles`, padded to an even count."""
    q = codes.reshape(-1).to(torch.uint8)
    return pack_nibbles(torch.nn.functional.pad(q, (0, q.numel() % 2)))


@dataclass
class Grid:
    """The values a weight's elements may take once its scales are fixed: `levels[i] * scale + zero`, with float32
    `scale` and `zero` per group of `group` input columns (`(out, ceil(in / group))`; `(out, 1)` for one per row, any
    `group`); `codes[i]` is how the format stores level i. Per group, not per element: an element-wise copy of the
    scales (and of their inverse) would be two more float32 matrices the size of the weight while GPTQ runs."""

    levels: torch.Tensor  # (L,) float32, sorted
    codes: torch.Tensor  # (L,) int64: the stored code of each level
    scale: torch.Tensor  # (out, groups) float32
    zero: torch.Tensor | None  # like scale, or None
    group: int = 1  # input columns per scale

    def __post_init__(self) -> None:
        if not isinstance(self.group, int) or self.group < 1:
            raise ValueError(f"Grid.group must be a positive number of columns, got {self.group!r}")
        self._bounds = (self.levels[1:] + self.levels[:-1]) / 2  # rounding boundaries between neighbouring levels
        self._inverse = torch.where(self.scale != 0, 1.0 / self.scale, torch.zeros_like(self.scale))  # a zero scale: level 0

    @classmethod
    def of_values(cls, values: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None, group: int = 1) -> Grid:
        """The grid of a format whose code i stands for `values[i]`."""
        order = torch.argsort(values)  # as `rounding_bounds_4bit` sorts: FP4's +0 and -0 tie, and keep its choice
        return cls(values[order].float(), order, scale.float(), None if zero is None else zero.float(), group)

    def column(self, w: torch.Tensor, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Column `j` of the weight, `w` `(out,)`, rounded to its nearest grid values: (values, codes)."""
        g = j // self.group if self.scale.shape[1] > 1 else 0
        scale, zero = self.scale[:, g], 0.0 if self.zero is None else self.zero[:, g]
        index = torch.bucketize((w - zero) * self._inverse[:, g], self._bounds)
        return self.levels[index] * scale + zero, self.codes[index]


def unpack_nibbles(codes: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of `pack_nibbles`: the first `n` 4-bit values as int64."""
    flat = codes.reshape(-1)
    q = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)  # (2 * n_bytes,)
    return q[:n].long()


def double_quantize(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """QLoRA double quantization of float32 absmax: (uint8 codes, nested absmax, offset)."""
    offset = absmax.mean()
    codes, nested_absmax = quantize_blockwise_8bit(absmax - offset)
    return codes, nested_absmax, offset


def quantize_4bit(weight: torch.Tensor, fmt: str = "nf4", block_size: int = 64, double_quant: bool = True) -> FourBitWeight:
    """Blockwise NF4/FP4 quantization, equal to `bitsandbytes.functional.quantize_4bit`."""
    bounds, order = rounding_bounds_4bit(fmt)
    scaled, absmax = _scale_blocks(weight.reshape(-1).float(), block_size)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    q = order[torch.bucketize(scaled, bounds)]  # (n_even,) uint8 codes
    codes = pack_nibbles(q)
    nested_absmax = nested_offset = None
    if double_quant:
        absmax, nested_absmax, nested_offset = double_quantize(absmax)
    return FourBitWeight(codes, absmax, nested_absmax, nested_offset, tuple(weight.shape), fmt, block_size)


def dequantize_4bit(w: FourBitWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reconstruct the weight: code value times its block's absmax, in float32, then cast."""
    n = 1
    for d in w.shape:
        n *= d
    values = code_4bit(w.fmt)[unpack_nibbles(w.codes, n)]  # (n,)
    scale = w.float_absmax().repeat_interleave(w.block_size)[:n]  # (n,)
    return (values * scale).view(w.shape).to(dtype)


def quantize_int8_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LLM.int8 vector-wise weight quantization: one absmax per output row.

    Returns:
        `(int8 weight, row absmax as float32)` — bitsandbytes calls the latter `SCB`.
    """
    w = weight.float()
    absmax = w.abs().amax(dim=1)  # (out,)
    q = torch.round(w * (127.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).to(torch.int8)  # (out, in)
    return q, absmax


def dequantize_int8_rows(q: torch.Tensor, absmax: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of `quantize_int8_rows`."""
    return (q.float() * (absmax / 127.0).unsqueeze(1)).to(dtype)


INT8_BLOCK = 128  # columns per absmax of block-wise int8 (the int8 decode head's copy; ops_cpu.cpp's kInt8XBlock)


def quantize_int8_blocks(weight: torch.Tensor, block: int = INT8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise int8 weight quantization: one absmax per row and block of `block` columns (the last block of a row
    may be shorter), so that one large weight costs precision only to its own block, not its whole row.

    Returns:
        `(int8 weight (N, K), absmax as float32 (N, ceil(K / block)))`.
    """
    n, k = weight.shape
    blocks = -(-k // block)
    w = torch.nn.functional.pad(weight.float(), (0, blocks * block - k)).view(n, blocks, block)
    absmax = w.abs().amax(dim=2)  # (N, blocks)
    q = torch.round(w * (127.0 / absmax.clamp(min=1e-38)).unsqueeze(2)).to(torch.int8)
    return q.view(n, blocks * block)[:, :k].contiguous(), absmax


def dequantize_int8_blocks(
    q: torch.Tensor, absmax: torch.Tensor, dtype: torch.dtype = torch.float32, block: int = INT8_BLOCK
) -> torch.Tensor:
    """Inverse of `quantize_int8_blocks` with the same `block`."""
    k = q.shape[1]
    if absmax.shape != (q.shape[0], -(-k // block)):
        raise ValueError(f"an absmax of shape {tuple(absmax.shape)} does not fit a ({q.shape[0]}, {k}) weight in blocks of {block}")
    scale = (absmax / 127.0).repeat_interleave(block, dim=1)[:, :k]  # (N, K)
    return (q.float() * scale).to(dtype)


ACTIVATION_BLOCK = 32  # activations quantized to int8 per this many elements at decode (llama.cpp's Q8_0 block)


def quantize_activations_q8(x: torch.Tensor, block: int = ACTIVATION_BLOCK) -> torch.Tensor:
    """What the integer-dot decode kernels multiply instead of `x` (last dim a multiple of `block`), in float32: two
    int8 rows, each block of `block` elements rounded to int8 steps of its absmax / 127, then what that rounding left
    over rounded the same way (so the sum is within about 1/64,000 of each block's absmax)."""
    first = _round_blocks_q8(x.float(), block)
    return first + _round_blocks_q8(x.float() - first, block)


def _round_blocks_q8(x: torch.Tensor, block: int) -> torch.Tensor:
    blocks = x.reshape(*x.shape[:-1], -1, block)
    step = blocks.abs().amax(dim=-1, keepdim=True) / 127.0
    inverse = torch.where(step > 0, 1.0 / step, torch.zeros_like(step))
    return (torch.round(blocks * inverse) * step).reshape(x.shape)


def int8_levels(fmt: str) -> torch.Tensor:
    """A 4-bit format's 16 values times 127, rounded: the int8 table an integer-dot kernel multiplies (int8, CPU)."""
    return torch.round(code_4bit(fmt) * 127.0).to(torch.int8)


def quantized_nbytes(tensors: list[torch.Tensor | None]) -> int:
    """Bytes held by a list of tensors (None entries are skipped)."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


INT4_OFFSET = 8  # codes 0..15 stand for q - 8 = -8..7
_ROW_CHUNK = 1024  # rows per step when quantizing to int4 (bounds the float32 temporaries)


@dataclass
class Int4Weight:
    """An int4 weight: packed codes, float16 scale and zero per group of each row."""

    codes: torch.Tensor  # uint8 (ceil(out * in / 2), 1)
    scale: torch.Tensor  # float16 (out, groups)
    zero: torch.Tensor  # float16 (out, groups)
    shape: tuple[int, int]
    group_size: int

    @property
    def groups(self) -> int:
        return -(-self.shape[1] // self.group_size)


@cache
def int4_lut() -> torch.Tensor:
    """The value each int4 code stands for before scaling: q - 8 (float32)."""
    return torch.arange(16, dtype=torch.float32) - INT4_OFFSET


def _grouped(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """`(out, in)` -> float32 `(out, groups, group_size)`, a short last group padded by repeating its last value."""
    w = weight.float()
    pad = -w.shape[1] % group_size
    if pad:
        w = torch.cat([w, w[:, -1:].expand(-1, pad)], dim=1)
    return w.view(w.shape[0], -1, group_size)


def _codes_for(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Nearest codes for grouped `w` given float32 scale and zero `(out, groups, 1)`."""
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    return torch.clamp(torch.round((w - zero) * inv) + INT4_OFFSET, 0, 15)


def _to_fp16(t: torch.Tensor) -> torch.Tensor:
    return t.clamp(-65504.0, 65504.0).half()


def hqq_zero(w: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, iters: int = 20) -> torch.Tensor:
    """Refine the zero point of grouped `w` by half-quadratic optimisation (Badri & Shaji, HQQ, 2023).

    Minimises an l_p (p = 0.7) norm of the reconstruction error over the float zero point
    `zero_point` (in code units: `w ~ (q - zero_point) * scale`) by alternating a shrinkage step on
    the error and a closed-form zero-point update, with `beta` growing each step. The l_p norm
    lets a few outliers keep a large error so the bulk of the group is reconstructed better. Of the
    iterates (the starting point included) the one with the smallest squared error is returned,
    so the result is never worse than the start in that sense.
    """
    p, beta, kappa = 0.7, 10.0, 1.01
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))

    def reconstruct(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = torch.clamp(torch.round(w * inv + z), 0, 15)
        return q, (q - z) * scale

    best = zero_point
    q, wr = reconstruct(zero_point)
    best_err = (w - wr).pow(2).sum(dim=-1, keepdim=True)
    z = zero_point
    for _ in range(iters):
        d = w - wr
        e = torch.sign(d) * torch.relu(d.abs() - d.abs().clamp(min=1e-12).pow(p - 1) / beta)  # shrink_lp
        z = (q - (w - e) * inv).mean(dim=-1, keepdim=True)
        beta *= kappa
        q, wr = reconstruct(z)
        err = (w - wr).pow(2).sum(dim=-1, keepdim=True)
        better = err < best_err
        best = torch.where(better, z, best)
        best_err = torch.where(better, err, best_err)
    return best


def least_squares_refit(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, rounds: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Alternate between the nearest codes and the least-squares scale and zero for those codes.

    For fixed codes the best `(scale, zero)` in the squared-error sense is a per-group linear
    regression of `w` on `q - 8`; each round re-picks codes for it. A group keeps whichever of its
    candidates has the smallest squared error (the start included).
    """

    def sq_err(s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return (w - ((_codes_for(w, s, z) - INT4_OFFSET) * s + z)).pow(2).sum(dim=-1, keepdim=True)

    best_s, best_z, best_err = scale, zero, sq_err(scale, zero)
    s, z = scale, zero
    for _ in range(rounds):
        x = _codes_for(w, s, z) - INT4_OFFSET
        x_mean, w_mean = x.mean(dim=-1, keepdim=True), w.mean(dim=-1, keepdim=True)
        var = (x - x_mean).pow(2).mean(dim=-1, keepdim=True)
        cov = ((x - x_mean) * (w - w_mean)).mean(dim=-1, keepdim=True)
        fit = var > 0
        s = torch.where(fit, cov / torch.where(fit, var, torch.ones_like(var)), s)
        z = torch.where(fit, w_mean - s * x_mean, z)
        err = sq_err(s, z)
        better = err < best_err
        best_s, best_z, best_err = torch.where(better, s, best_s), torch.where(better, z, best_z), torch.where(better, err, best_err)
    return best_s, best_z


def quantize_int4(weight: torch.Tensor, group_size: int = 64, refine: bool = False) -> Int4Weight:
    """Groupwise asymmetric int4 from each group's min and max; `refine` adds `hqq_zero`, then `least_squares_refit`."""
    if weight.dim() != 2:
        raise ValueError(f"int4 quantizes 2-D (out, in) weights, got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    groups = -(-in_features // group_size)
    scales = torch.empty((out_features, groups), dtype=torch.float16, device=weight.device)
    zeros = torch.empty((out_features, groups), dtype=torch.float16, device=weight.device)
    q_rows = []
    for start in range(0, out_features, _ROW_CHUNK):
        w = _grouped(weight[start : start + _ROW_CHUNK], group_size)
        lo, hi = w.amin(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True)
        scale = (hi - lo) / 15.0
        zero = lo + INT4_OFFSET * scale
        if refine:
            inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
            zero = (INT4_OFFSET - hqq_zero(w, scale, -lo * inv)) * scale
            scale, zero = least_squares_refit(w, scale, zero)
        scale16, zero16 = _to_fp16(scale), _to_fp16(zero)
        q = _codes_for(w, scale16.float(), zero16.float())  # codes for the stored (float16) scale and zero
        q_rows.append(q.flatten(1)[:, :in_features].to(torch.uint8))
        scales[start : start + _ROW_CHUNK] = scale16.squeeze(-1)
        zeros[start : start + _ROW_CHUNK] = zero16.squeeze(-1)
    q = torch.cat(q_rows).reshape(-1)
    if q.numel() % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    return Int4Weight(pack_nibbles(q), scales, zeros, (out_features, in_features), group_size)


def dequantize_int4(w: Int4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reconstruct an int4 weight: `(q - 8) * scale + zero` in float32, then cast."""
    out_features, in_features = w.shape
    q = unpack_nibbles(w.codes, out_features * in_features).view(out_features, in_features).float()  # (out, in)
    scale = w.scale.float().repeat_interleave(w.group_size, dim=1)[:, :in_features]
    zero = w.zero.float().repeat_interleave(w.group_size, dim=1)[:, :in_features]
    return ((q - INT4_OFFSET) * scale + zero).to(dtype)
