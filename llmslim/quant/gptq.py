"""GPTQ (Frantar et al., 2022) into the formats llmslim already stores.

A layer's scales are fixed first, exactly as round-to-nearest chooses them (NF4/FP4 absmax, with
double quantization where the layer has it; int4 scale and zero per group; int8 row absmax): the
stored format does not change and nothing about loading it does. GPTQ then chooses the codes, one
input column at a time, each rounded to its nearest grid value and its rounding error spread over
the columns not yet quantized through the inverse Hessian of the layer's inputs, `H = 2 X^T X`
(optimal brain surgeon updates, in blocks of columns with lazy updates of the rest). With
`act_order` the columns go in order of decreasing `diag(H)`; the scales stay per stored group, so
the order changes nothing in the format.

Before that, `balance_scales` may rescale a layer group's input channels (AWQ, Lin et al. 2023), the inverse
scales going to what produces the input (the caller folds them, `llmslim.calibrate`): float outputs stay the
same, and the channels that carry large activations get finer steps.

A layer keeps its round-to-nearest codes if GPTQ's are not better on the calibration inputs
(`tr((W - Q) H (W - Q)^T)`, the layer's output error): calibration never makes a layer worse there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from llmslim.quant.formats import Grid

logger = logging.getLogger(__name__)

DAMP_RETRIES = 4  # dampening x10 each time the Cholesky factorization fails
BALANCE_ALPHAS = tuple(0.1 * i for i in range(1, 11))  # exponents of rms(x) searched by `balance_scales`


@dataclass(frozen=True)
class GptqSettings:
    """damp: share of the mean of diag(H) added to its diagonal; block: columns per lazy update; act_order: see above;
    clip: the shrink factors of a 4-bit block's absmax to search (`clipped_absmax`), () for absmax as RTN has it;
    balance: rescale input channels first (`balance_scales`). With balance the clip search is not made: on SmolLM2 the
    two together lost to balance alone (WikiText-2 perplexity 42.31 vs 41.21, GPTQ-NF4, 16k calibration tokens)."""

    damp: float = 0.01
    block: int = 128
    act_order: bool = False
    clip: tuple[float, ...] = tuple(1.0 - 0.025 * i for i in range(13))  # 1.0 down to 0.7
    balance: bool = False


def clipped_absmax(
    weight: torch.Tensor, hessian_diag: torch.Tensor, levels: torch.Tensor, block: int, shrink: tuple[float, ...]
) -> torch.Tensor:
    """Per-block absmax `(out, in // block)` for a blockwise 4-bit format: each block's max |w| times the factor of
    `shrink` that minimises the block's round-to-nearest output error, sum_j H_jj (w_j - Q(w_j))^2 (diagonal of the
    input Hessian). A smaller absmax clips the block's largest weights and rounds all the others more finely.

    Args:
        weight: `(out, in)` float, `in` a multiple of `block`; hessian_diag: `(in,)`; levels: the format's code values
            (sorted, in [-1, 1]).
    """
    out_features, in_features = weight.shape
    w = weight.float().view(out_features, in_features // block, block)
    d = hessian_diag.float().view(1, in_features // block, block)
    top = w.abs().amax(dim=2, keepdim=True)  # (out, groups, 1)
    bounds = (levels[1:] + levels[:-1]) / 2
    best_error = torch.full(top.shape[:2], float("inf"))
    best = top.squeeze(2).clone()
    for factor in shrink:
        absmax = top * factor
        scaled = torch.where(absmax > 0, w / absmax, torch.zeros_like(w))
        rounded = levels[torch.bucketize(scaled.clamp(-1, 1), bounds)] * absmax
        error = (d * (w - rounded) ** 2).sum(dim=2)  # (out, groups)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best = torch.where(better, absmax.squeeze(2), best)
    return best


class HessianAccumulator:
    """`H = 2 / n * sum x x^T` over the `n` input rows a layer saw (float32, `(in, in)`), added to batch by batch."""

    def __init__(self, in_features: int, device=None):
        self.hessian = torch.zeros((in_features, in_features), dtype=torch.float32, device=device)
        self.rows = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # (rows, in)
        total = self.rows + x.shape[0]
        self.hessian.mul_(self.rows / total).addmm_(x.t(), x, alpha=2.0 / total)
        self.rows = total


def output_error(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """tr((W - Q) H (W - Q)^T): the squared error of the layer's outputs on its calibration inputs (up to a factor)."""
    return output_error_of_delta(weight.float() - quantized.float(), hessian)


def output_error_of_delta(delta: torch.Tensor, hessian: torch.Tensor, rows: int = 512) -> float:
    """tr(D H D^T) for `delta` D `(out, in)`, a few rows at a time: no second matrix the size of D."""
    return sum(float(((d @ hessian) * d).sum()) for d in delta.split(rows))


def gptq_codes(
    weight: torch.Tensor, hessian: torch.Tensor, grid: Grid, settings: GptqSettings = GptqSettings(), name: str = ""
) -> torch.Tensor:
    """Codes `(out, in)` for `weight` `(out, in)` on `grid`, chosen by GPTQ with the input Hessian `hessian` `(in, in)`.

    Raises:
        ValueError: the dampened Hessian is not positive definite even after `DAMP_RETRIES` increases of the
            dampening (the layer named by `name`).
    """
    columns = weight.shape[1]
    diag = torch.diag(hessian).float()  # (in,) a copy
    dead = diag == 0  # inputs that were always zero: their columns cannot matter
    diag[dead] = 1.0
    order = torch.argsort(diag, descending=True, stable=True) if settings.act_order else torch.arange(columns)
    w = weight.detach().float().index_select(1, order)  # (out, in): a copy, its columns in `order`
    w[:, dead[order]] = 0.0
    upper = _inverse_cholesky(hessian, order, dead, settings.damp, name)  # (in, in): the upper Cholesky factor of H^-1
    codes = torch.empty(w.shape, dtype=torch.uint8)  # every format's codes fit a byte (int8's are 0..254)
    for start in range(0, columns, settings.block):
        end = min(start + settings.block, columns)
        block_w = w[:, start:end].clone()
        errors = torch.empty_like(block_w)
        block_inv = upper[start:end, start:end]
        for i in range(end - start):
            values, codes[:, start + i] = grid.column(block_w[:, i], int(order[start + i]))
            error = (block_w[:, i] - values) / block_inv[i, i]
            block_w[:, i:] -= error.unsqueeze(1) * block_inv[i, i:].unsqueeze(0)
            errors[:, i] = error
        w[:, end:] -= errors @ upper[start:end, end:]
    return codes[:, torch.argsort(order)]


def _inverse_cholesky(hessian: torch.Tensor, order: torch.Tensor, dead: torch.Tensor, damp: float, name: str) -> torch.Tensor:
    """The upper Cholesky factor of the inverse of the dampened Hessian, its inputs in `order` (`dead` ones given a unit
    diagonal). One (in, in) float32 matrix beside `hessian`: the dampened permuted copy, factorized, inverted and
    factorized again in place (the largest layers' are hundreds of MiB each)."""
    diag = torch.diag(hessian).float()[order]
    diag[dead[order]] = 1.0
    mean_diag = float(diag.mean())
    info = torch.empty((), dtype=torch.int32)
    for attempt in range(DAMP_RETRIES + 1):
        factor = damp * 10**attempt
        h = _permuted(hessian, order)
        h.diagonal().copy_(diag + factor * mean_diag)
        torch.linalg.cholesky_ex(h, out=(h, info))  # h: the lower factor L
        if info != 0:
            continue
        torch.cholesky_inverse(h, out=h)  # h: H^-1
        torch.linalg.cholesky_ex(h, upper=True, out=(h, info))  # h: the upper factor of H^-1
        if info == 0:
            if attempt:
                logger.warning("GPTQ: %s needed dampening %.3g of the mean diagonal (asked for %.3g)", name or "a layer", factor, damp)
            return h
    raise ValueError(
        f"GPTQ: the input Hessian of {name or 'a layer'} is not positive definite even with dampening "
        f"{damp * 10**DAMP_RETRIES:g} of its mean diagonal: calibrate with more (and more varied) text, or use method='rtn'"
    )


def _permuted(hessian: torch.Tensor, order: torch.Tensor, rows: int = 256) -> torch.Tensor:
    """`hessian[order][:, order]` as float32, one (in, in) matrix: the columns are permuted a few rows at a time."""
    h = hessian.float().index_select(0, order)
    for start in range(0, h.shape[0], rows):
        h[start : start + rows] = h[start : start + rows].index_select(1, order)
    return h


def balance_scales(
    weights: list[torch.Tensor],
    hessian: torch.Tensor,
    round_trip: Callable[[int, torch.Tensor], torch.Tensor],
    alphas: tuple[float, ...] = BALANCE_ALPHAS,
) -> torch.Tensor | None:
    """Per-input-channel scales `s` `(in,)` for layers that read one input (AWQ's idea, Lin et al. 2023): the layers
    store `W diag(s)` and their input is divided by `s` upstream, so the outputs stay the same in float while the
    channels that carry large activations get finer steps. `s = rms(x)^alpha` (from `diag(H)`), normalised to a
    geometric mean of one; alpha is searched over `alphas` to minimise the summed output error of round-to-nearest,
    `tr(E H E^T)` with `E = round_trip(i, W_i diag(s)) diag(1/s) - W_i`, computed from the Hessian without running
    the model. Returns None when no alpha beats the layers as they are (alpha 0).

    Args:
        weights: each layer's float `(out, in)` weight; hessian: their shared input Hessian `(in, in)`;
            round_trip: `(i, w) -> w` quantized and dequantized in layer i's format.
    """
    h = hessian.float()
    rms = torch.diag(h).clamp(min=0).sqrt()
    live = rms > 0
    if not bool(live.any()):
        return None
    rms = torch.where(live, rms, rms[live].min())
    best_error, best = None, None
    for alpha in (0.0, *alphas):
        s = rms.pow(alpha)
        s = s / s.log().mean().exp()
        error = 0.0
        for i, w in enumerate(weights):
            e = round_trip(i, w.float() * s).div_(s).sub_(w)
            error += output_error_of_delta(e, h)
        if best_error is None or error < best_error:
            best_error, best = error, (None if alpha == 0.0 else s)
    return best
