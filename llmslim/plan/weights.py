"""Exact bytes of a model's weights in each format, scales, absmax and double-quant state included.

A quantized layer's tensors are taken from llmslim's own module built on the meta device
(`quant.registry` module class of the format, on `device="meta"`), so the planner counts exactly what the loader
allocates: NF4/FP4 packed codes plus float32 absmax per block (or uint8 absmax, float32 nested
absmax per 256 blocks and a float32 offset with double quantization), int8 rows plus a float32
absmax per row, int4 codes plus float16 scale and zero per group.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from llmslim.config import SlimConfig
from llmslim.plan.shapes import LinearSpec, ModelShape

# The formats a plan compares: name -> SlimConfig fields (None: no quantization, bf16 weights).
PLAN_FORMATS: dict[str, dict | None] = {
    "bf16": None,
    "int8": {"weights": "int8"},
    "nf4": {"weights": "nf4", "double_quant": False},
    "nf4+dq": {"weights": "nf4", "double_quant": True},
    "int4": {"weights": "int4"},
    # nf4+dq with ALBERT's factorized input embedding at rank hidden/4 (a tied head through the factors)
    "nf4+dq+emb/4": {"weights": "nf4", "double_quant": True, "embedding_divisor": 4},
}
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int8": 1, "uint8": 1}


def dtype_bytes(dtype: str) -> int:
    """Bytes per element of a float dtype name such as `"bfloat16"`."""
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {list(DTYPE_BYTES)}, got {dtype!r}")
    return DTYPE_BYTES[name]


def format_config(name: str, shape: ModelShape | None = None) -> SlimConfig | None:
    """The `SlimConfig` of a plan format name (None for bf16); a factorized format needs the model's `shape`."""
    if name not in PLAN_FORMATS:
        raise ValueError(f"format must be one of {list(PLAN_FORMATS)}, got {name!r}")
    if PLAN_FORMATS[name] is None:
        return None
    fields = dict(PLAN_FORMATS[name])
    divisor = fields.pop("embedding_divisor", None)
    if divisor is not None:
        if shape is None:
            raise ValueError(f"format {name!r} sets the embedding rank from the model's width: pass its shape")
        fields["embedding_rank"] = max(1, shape.hidden // divisor)
    return SlimConfig(**fields)


def factorizes(shape: ModelShape, config: SlimConfig | None) -> bool:
    """Whether `config` factorizes `shape`'s input embedding (a plain V x H table)."""
    return config is not None and config.embedding_rank is not None and _word_embedding(shape) is not None


@dataclass
class WeightBytes:
    """Bytes of a model's tensors in one format.

    Args:
        codes: quantized weight values (packed 4-bit codes or int8 rows).
        scales: absmax / SCB / scale and zero, double-quant state included.
        kept: tensors kept in the float dtype (embeddings, norms, biases, layers not quantized).
        buffers: non-parameter buffers (rotary tables).
        per_block: bytes of each decoder block; `outer` is everything outside the blocks.
        largest_linear: elements of the largest quantized weight (its float copy is the
            workspace of a prompt's dequantize + GEMM); max_in / max_out: the widest input and
            output of a quantized layer (per-token temporaries of LLM.int8).
        input_embedding: bytes of the input embedding (read one row per token, not whole).
    """

    codes: int = 0
    scales: int = 0
    kept: int = 0
    buffers: int = 0
    per_block: list[int] = field(default_factory=list)
    outer: int = 0
    largest_linear: int = 0
    max_in: int = 0
    max_out: int = 0
    input_embedding: int = 0

    @property
    def total(self) -> int:
        return self.codes + self.scales + self.kept + self.buffers


@lru_cache(maxsize=4096)
def _linear_tensors(config_json: str, in_features: int, out_features: int, bias: bool, dtype: str) -> tuple[tuple[str, int], ...]:
    config = SlimConfig.from_dict(json.loads(config_json))
    spec = config.layer_spec(weights=config.weights)
    module = spec.module_class()(in_features, out_features, bias, spec, getattr(torch, dtype), device="meta")
    return tuple((name, t.numel() * t.element_size()) for name, t in module.state_dict().items())


def linear_tensors(
    lin: LinearSpec, config: SlimConfig | None, dtype: str, selected: bool | None = None, key: str | None = None
) -> tuple[tuple[str, int], ...]:
    """(tensor name, bytes) of one linear layer as llmslim stores it under `config` (float if not selected).

    `selected` (whether `config` selects the layer) and `key` (`config` as JSON) save recomputing them per layer.
    """
    if selected is None:
        selected = config is not None and config.weights is not None and config.selects(lin.name)
    if not selected:
        size = dtype_bytes(dtype)
        float_tensors = (("weight", lin.in_features * lin.out_features * size),)
        return float_tensors + ((("bias", lin.out_features * size),) if lin.bias else ())
    key = key or json.dumps(config.to_dict(), sort_keys=True)
    return _linear_tensors(key, lin.in_features, lin.out_features, lin.bias, dtype)


def iter_tensor_bytes(shape: ModelShape, config: SlimConfig | None, dtype: str) -> Iterator[tuple[str, str, int]]:
    """(full tensor name, role, bytes) of every tensor; role is codes, scales, kept or buffers."""
    quantized = config is not None and config.weights is not None
    key = json.dumps(config.to_dict(), sort_keys=True) if quantized else None
    for lin in shape.linears:
        selected = quantized and config.selects(lin.name)
        for name, nbytes in linear_tensors(lin, config, dtype, selected, key):
            role = "kept" if name == "bias" or not selected else ("codes" if name == "weight" else "scales")
            yield f"{lin.name}.{name}", role, nbytes
    embedding = _word_embedding(shape) if config is not None and config.embedding_rank is not None else None
    for t in shape.tensors:
        if t is embedding:  # FactorizedEmbedding: table (V x E) and projection (E x H), in the float dtype
            prefix, rank = t.name.removesuffix(".weight"), config.embedding_rank
            yield f"{prefix}.table.weight", "kept", shape.vocab * rank * dtype_bytes(dtype)
            yield f"{prefix}.proj", "kept", rank * shape.hidden * dtype_bytes(dtype)
            continue
        yield (
            t.name,
            "kept" if t.dtype is None else "buffers",
            t.numel * (dtype_bytes(dtype) if t.dtype is None else _buffer_bytes(t.dtype)),
        )


def _buffer_bytes(dtype: str) -> int:
    """Bytes per element of a buffer's dtype (integer buffers such as BERT's `position_ids` included)."""
    if dtype in DTYPE_BYTES:
        return DTYPE_BYTES[dtype]
    return getattr(torch, dtype).itemsize


def _word_embedding(shape: ModelShape):
    """The input word embedding's `TensorSpec` (a float V x H table outside the blocks), or None."""
    tables = [t for t in shape.outer_tensors if t.dtype is None and t.numel == shape.vocab * shape.hidden > 0]
    return tables[0] if tables else None


def weight_bytes(shape: ModelShape, config: SlimConfig | None, dtype: str) -> WeightBytes:
    """Bytes of every tensor of `shape` loaded with `config` (None: unquantized), float parts in `dtype`."""
    out = WeightBytes(per_block=[0] * shape.n_layers)
    block_of = _block_index(shape)
    for name, role, nbytes in iter_tensor_bytes(shape, config, dtype):
        setattr(out, role, getattr(out, role) + nbytes)
        block = block_of.get(name.rpartition(".")[0], block_of.get(name))
        if block is None:
            out.outer += nbytes
        else:
            out.per_block[block] += nbytes
    selected = [lin for lin in shape.linears if config is not None and config.weights is not None and config.selects(lin.name)]
    out.largest_linear = max((lin.in_features * lin.out_features for lin in selected), default=0)
    out.max_in = max((lin.in_features for lin in selected), default=0)
    out.max_out = max((lin.out_features for lin in selected), default=0)
    out.input_embedding = 0 if factorizes(shape, config) else _input_embedding_bytes(shape, dtype)  # factors: read whole
    return out


def _block_index(shape: ModelShape) -> dict[str, int]:
    index = {}
    for i, (linears, tensors) in enumerate(zip(shape.block_linears, shape.block_tensors, strict=True)):
        index.update({lin.name: i for lin in linears})
        index.update({t.name: i for t in tensors})
    return index


def _input_embedding_bytes(shape: ModelShape, dtype: str) -> int:
    """The word embedding; when tied to the output layer it is read whole every step, so it counts as 0 here."""
    if shape.tied_embeddings:
        return 0
    embeddings = [t for t in shape.outer_tensors if t.dtype is None and t.numel >= shape.vocab * shape.hidden > 0]
    return embeddings[0].numel * dtype_bytes(dtype) if embeddings else 0
