"""A prompt's causal attention on CPU through llmslim's kernel, under transformers' attention interface.

torch's CPU flash-attention kernel, which SDPA takes for a bf16 prompt, streams key blocks through a GEMM call each:
for 512 tokens of TinyLlama's shape (32 heads, 4 key/value heads, d 64) it takes 13 ms a layer on a 2-core Zen 5,
~19% of the whole prompt, where `attend_prompt_rows` (`csrc/ops_cpu.cpp`, AVX-512 BF16) takes 2.1 ms with the
same arithmetic (float32 scores and softmax, bf16 probabilities; one bf16 step off SDPA's output on a few elements).

`use_prompt_attention` switches a model whose attention is transformers' "sdpa" to `PROMPT_ATTENTION`, registered with
SDPA's mask function, so masks are built exactly as for "sdpa". `prompt_attention` takes the kernel for what it does
(bf16 CPU tensors, a prompt of more than one token, no mask, causal, no dropout, no gradient, not traced) and hands
every other call to transformers' `sdpa_attention_forward` unchanged. `model.set_attn_implementation("sdpa")` is
the opt-out. Where the kernel is not built (a CPU without AVX-512 BF16) models keep "sdpa".
"""

from __future__ import annotations

import torch
from torch import nn

from llmslim.hf import compat
from llmslim.quant import kernels

PROMPT_ATTENTION = "llmslim_sdpa"
SDPA_NAMES = frozenset({"sdpa", PROMPT_ATTENTION})  # the attention implementations that compute SDPA's function


def causal_prompt(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float | None) -> torch.Tensor | None:
    """The causal attention of `query` (batch, heads, q_len, d) over `key` / `value` (batch, kv_heads, kv_len, d),
    query i at position kv_len - q_len + i (aligned to the end), as (batch, q_len, heads, d); None where the kernel does
    not take the call (then the caller's SDPA path runs)."""
    if not _kernel_takes(query, key, value):
        return None
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    rows = [torch.ops.llmslim.attend_prompt_rows(query[b : b + 1], key[b : b + 1], value[b : b + 1], scale) for b in range(query.shape[0])]
    out = rows[0] if len(rows) == 1 else torch.cat(rows)
    return out.view(query.shape[0], query.shape[2], query.shape[1], query.shape[3])


def _kernel_takes(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    if torch.compiler.is_compiling() or not kernels.prompt_attention_kernel():
        return False
    if query.device.type != "cpu" or not (query.dtype == key.dtype == value.dtype == torch.bfloat16):
        return False
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad):
        return False
    d = query.shape[-1]
    return (
        query.shape[2] > 1
        and key.shape[2] >= query.shape[2]
        and key.shape == value.shape
        and key.shape[-1] == d
        and d % 16 == 0
        and d <= 256
        and query.shape[1] % key.shape[1] == 0
    )


def prompt_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention function, with a causal prompt without a mask on `attend_prompt_rows`."""
    if query.shape[2] > 1 and attention_mask is None and plain_causal(module, dropout, is_causal, kwargs):  # a decoded token: SDPA
        # SDPA's is_causal is aligned top-left: with more keys than queries (a prompt into an empty static cache)
        # the queries see the first q_len keys, as sdpa_attention_forward crops them
        q_len = query.shape[2]
        out = causal_prompt(query, key[:, :, :q_len], value[:, :, :q_len], scaling)
        if out is not None:
            return out, None
    return compat.sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
    )


def plain_causal(module: nn.Module, dropout: float, is_causal: bool | None, kwargs: dict) -> bool:
    """Whether an attention call asks for causal attention and nothing else the kernel lacks (dropout, a position
    bias, a soft cap, attention sinks)."""
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    return bool(causal) and not dropout and all(kwargs.get(name) is None for name in ("position_bias", "softcap", "s_aux", "sinks"))


def use_prompt_attention(model: nn.Module) -> bool:
    """Switch `model` from "sdpa" to `PROMPT_ATTENTION` where the kernel is built here; whether it did."""
    config = getattr(model, "config", None)
    if config is None or compat.attn_implementation(config) != "sdpa" or not kernels.prompt_attention_kernel():
        return False
    compat.register_attention(PROMPT_ATTENTION, prompt_attention)
    model.set_attn_implementation(PROMPT_ATTENTION)
    return compat.attn_implementation(model.config) == PROMPT_ATTENTION
