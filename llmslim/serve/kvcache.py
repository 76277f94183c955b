"""A KV cache per sequence, and the attention that lets sequences of different lengths share a forward pass.

Continuous batching runs one decode step for every active sequence together. The linear layers see
a `(batch, 1, hidden)` input and read their weights once for the whole batch, which is where the
throughput comes from. Attention cannot be batched that simply: each sequence has its own length.
Instead of left-padding into one rectangular cache (which shifts positions, needs a mask, and makes
a sequence's numbers depend on who it shares the batch with), every sequence keeps its own cache
and attention runs row by row over exactly that sequence's keys. A sequence therefore computes the
same floats whether it decodes alone or in a batch of sixteen, which is what makes concurrent greedy
output equal sequential greedy output token for token.

Only public transformers interfaces are used: a model calls `cache.update(key, value, layer_idx)`
and then the attention function registered under `config._attn_implementation` (the
`AttentionInterface` registry). `BatchKV.update` hands that function a list of per-sequence tensors.
"""

from __future__ import annotations

import inspect

import torch
from transformers import PreTrainedModel

from llmslim.hf import attention
from llmslim.hf.compat import AttentionInterface, sdpa_attention_forward

ROW_ATTENTION = "llmslim_rows"
_MIN_CAPACITY = 64


class SequenceKV:
    """Keys and values of one sequence for every layer, in buffers that grow by doubling.

    Args:
        num_layers: number of attention layers of the model.
    """

    def __init__(self, num_layers: int):
        self._keys: list[torch.Tensor | None] = [None] * num_layers
        self._values: list[torch.Tensor | None] = [None] * num_layers
        self._lengths = [0] * num_layers

    @property
    def length(self) -> int:
        """Tokens held (the position the next token will take)."""
        return self._lengths[-1]

    def append(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add `key`/`value` of shape (1, kv_heads, new, head_dim) to `layer`; return all keys and values so far."""
        start, new = self._lengths[layer], key.shape[2]
        self._reserve(layer, key, value, start + new)
        self._keys[layer][:, :, start : start + new] = key
        self._values[layer][:, :, start : start + new] = value
        self._lengths[layer] = start + new
        return self._keys[layer][:, :, : start + new], self._values[layer][:, :, : start + new]

    def copy(self) -> SequenceKV:
        """An independent copy (for the other choices of an n > 1 request: one prefill, then each its own cache)."""
        twin = SequenceKV(len(self._keys))
        twin._keys = [None if k is None else k.clone() for k in self._keys]
        twin._values = [None if v is None else v.clone() for v in self._values]
        twin._lengths = list(self._lengths)
        return twin

    def prefix(self, length: int) -> SequenceKV:
        """An independent copy of the first `length` tokens, in buffers of exactly that size (prefix caching)."""
        if not 0 < length <= self.length:
            raise ValueError(f"a prefix must hold 1 to {self.length} tokens, got {length}")
        twin = SequenceKV(len(self._keys))
        twin._keys = [k[:, :, :length].clone() for k in self._keys]  # (1, kv_heads, length, head_dim) per layer
        twin._values = [v[:, :, :length].clone() for v in self._values]
        twin._lengths = [length] * len(self._keys)
        return twin

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffers (capacity, not just the tokens held)."""
        return sum(t.numel() * t.element_size() for t in self._keys + self._values if t is not None)

    def _reserve(self, layer: int, key: torch.Tensor, value: torch.Tensor, needed: int) -> None:
        old_k, old_v, used = self._keys[layer], self._values[layer], self._lengths[layer]
        if old_k is not None and old_k.shape[2] >= needed:
            return
        capacity = max(_MIN_CAPACITY, 2 * needed)  # doubling keeps appends amortised O(1)
        new_k = key.new_empty(1, key.shape[1], capacity, key.shape[3])  # (1, kv_heads, capacity, head_dim)
        new_v = value.new_empty(1, value.shape[1], capacity, value.shape[3])
        if old_k is not None:
            new_k[:, :, :used] = old_k[:, :, :used]
            new_v[:, :, :used] = old_v[:, :, :used]
        self._keys[layer], self._values[layer] = new_k, new_v


class BatchKV:
    """The cache object handed to the model for one forward pass: row `b` of the batch is `sequences[b]`."""

    def __init__(self, sequences: list[SequenceKV]):
        self.sequences = sequences

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Store the new keys/values of each row; return per-row lists for `row_attention`."""
        keys, values = [], []
        for row, sequence in enumerate(self.sequences):
            key, value = sequence.append(layer_idx, key_states[row : row + 1], value_states[row : row + 1])
            keys.append(key)
            values.append(value)
        return keys, values


def row_attention(module, query: torch.Tensor, key, value, attention_mask, **kwargs) -> tuple[torch.Tensor, None]:
    """Scaled dot-product attention of each query row over its own sequence's keys (causal within a prompt). A prompt
    (with or without cached tokens before it) takes llmslim's CPU kernel where it is built (`llmslim.hf.attention`)."""
    if isinstance(key, torch.Tensor):
        raise TypeError(f"{ROW_ATTENTION} attention needs llmslim.serve.kvcache.BatchKV as the cache, got a plain tensor")
    kernel = query.shape[2] > 1 and attention.plain_causal(module, kwargs.get("dropout", 0.0), kwargs.get("is_causal"), kwargs)
    outputs = []
    for row, (k, v) in enumerate(zip(key, value, strict=True)):
        q = query[row : row + 1]
        out = attention.causal_prompt(q, k, v, kwargs.get("scaling")) if kernel else None  # causal aligned to the end, as _suffix_mask
        if out is None:
            out = sdpa_attention_forward(module, q, k, v, _suffix_mask(query.shape[2], k.shape[2], query.device), **kwargs)[0]
        outputs.append(out)  # (1, q_len, heads, head_dim)
    return torch.cat(outputs), None  # (batch, q_len, heads, head_dim)


def _suffix_mask(q_len: int, k_len: int, device) -> torch.Tensor | None:
    """None (plain causal attention) unless several new tokens follow cached ones (a prompt whose prefix was cached):
    then query i sees the cached keys and the new ones up to itself, (1, 1, q_len, k_len) bool. SDPA's own causal mask
    is aligned top-left, so it cannot say this."""
    if q_len == 1 or k_len == q_len:
        return None
    cached = k_len - q_len
    keys = torch.arange(k_len, device=device)  # (k_len,)
    return (keys[None, :] <= cached + torch.arange(q_len, device=device)[:, None])[None, None]  # (1, 1, q_len, k_len)


def use_row_attention(model: PreTrainedModel) -> str:
    """Switch `model` to per-sequence attention; return the keyword its forward takes the cache under."""
    AttentionInterface.register(ROW_ATTENTION, row_attention)
    model.set_attn_implementation(ROW_ATTENTION)
    if model.config._attn_implementation != ROW_ATTENTION:
        raise ValueError(
            f"{type(model).__name__} does not support pluggable attention (AttentionInterface), which serving needs; "
            "serve a model whose transformers implementation does (Llama, Mistral, Qwen2, ...)"
        )
    return cache_keyword(model)


def cache_keyword(model: PreTrainedModel) -> str:
    """The keyword `model.forward` takes the cache under."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"  # renamed in transformers 5.x
