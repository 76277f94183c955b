"""Mixed 4-bit/int8: keep the layers 4 bits hurt most in int8, within a bits-per-parameter budget.

The 4-bit format is the config's (int4, nf4 or fp4). No data is needed: a layer's sensitivity is
the relative reconstruction error of its own weight in that format, `||W - Q4(W)||_F / ||W||_F`.
Choosing which layers to upgrade is a knapsack: upgrading layer i removes (almost all of) its
squared relative error e_i^2 for `numel_i * (bits8 - bits4)` extra bits. Taking layers in order
of e_i^2 per extra bit, while they fit, is the greedy solution; it favours layers with outlying
weights (large e_i) and, among equals, small layers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, replace

import torch

from llmslim.config import SlimConfig
from llmslim.hf.compat import Conv1D
from llmslim.quant import formats, kernels
from llmslim.quant.modules import check_finite

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerCost:
    """What 4 bits and int8 cost one layer: its relative 4-bit error and its bytes in each format."""

    name: str
    numel: int
    four_bit_error: float
    four_bit_bytes: int
    int8_bytes: int


def int4_bytes(out_features: int, in_features: int, group_size: int) -> int:
    """Bytes of an int4 weight: packed codes, then a float16 scale and zero per group."""
    groups = -(-in_features // group_size)
    return (out_features * in_features + 1) // 2 + 2 * 2 * out_features * groups


def blockwise_4bit_bytes(numel: int, block_size: int, double_quant: bool) -> int:
    """Bytes of an NF4/FP4 weight: packed codes, then each block's absmax (uint8 plus the nested
    float32 absmax per 256 blocks and one offset when double-quantized, float32 otherwise)."""
    blocks = -(-numel // block_size)
    absmax = blocks + 4 * -(-blocks // formats.NESTED_BLOCK_SIZE) + 4 if double_quant else 4 * blocks
    return (numel + 1) // 2 + absmax


def int8_bytes(out_features: int, in_features: int) -> int:
    """Bytes of a row-wise int8 weight: one byte per value, a float32 absmax per row."""
    return out_features * in_features + 4 * out_features


@torch.no_grad()
def layer_cost(name: str, weight: torch.Tensor, config: SlimConfig) -> LayerCost:
    """Measure one (out, in) float weight's error in the config's 4-bit format (its block size,
    refinement, double quantization)."""
    check_finite(weight, f"layer {name!r}", config.allow_nonfinite)
    w = weight.float()
    out_features, in_features = w.shape
    if config.weights == "int4":
        restored = formats.dequantize_int4(kernels.quantize_int4(w, config.block_size, config.refine), torch.float32)
        nbytes = int4_bytes(out_features, in_features, config.block_size)
    else:
        q = formats.quantize_4bit(w, config.weights, config.block_size, config.double_quant)
        restored = formats.dequantize_4bit(q, torch.float32)
        nbytes = blockwise_4bit_bytes(w.numel(), config.block_size, config.double_quant)
    error = (restored - w).norm() / w.norm().clamp(min=1e-30)
    return LayerCost(name, w.numel(), float(error), nbytes, int8_bytes(out_features, in_features))


def choose(costs: list[LayerCost], bits_per_param: float) -> list[str]:
    """Names of the layers to store in int8 so that the average stays within `bits_per_param`.

    Raises:
        ValueError: when even all-4-bit exceeds the budget.
    """
    numel = sum(c.numel for c in costs)
    budget = bits_per_param * numel / 8  # bytes
    used = sum(c.four_bit_bytes for c in costs)
    if used > budget:
        raise ValueError(
            f"bits_per_param={bits_per_param} is below what 4 bits alone take here ({8 * used / numel:.3f} bits per parameter "
            "with their scales, zeros and absmax): raise it, or use a larger block_size"
        )
    chosen = []
    for c in sorted(costs, key=lambda c: c.four_bit_error**2 / (c.int8_bytes - c.four_bit_bytes), reverse=True):
        extra = c.int8_bytes - c.four_bit_bytes
        if used + extra <= budget:
            chosen.append(c.name)
            used += extra
    logger.info("mixed 4-bit/int8: %d of %d layers in int8, %.3f bits per parameter", len(chosen), len(costs), 8 * used / numel)
    return chosen


def choose_int8_layers(named_weights: Iterable[tuple[str, torch.Tensor]], config: SlimConfig) -> SlimConfig:
    """`config` with `int8_layers` chosen for its `bits_per_param` from the layers' (out, in) float weights."""
    costs = [layer_cost(name, weight, config) for name, weight in named_weights]
    return replace(config, int8_layers=choose(costs, config.bits_per_param))


def oriented(module: torch.nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """A float weight of `module`'s layout as (out, in) (Conv1D stores it transposed)."""
    return weight.t() if isinstance(module, Conv1D) else weight
