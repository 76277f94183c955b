"""Exact bytes of a model's weights in each format, scales, absmax and double-quant state included.

A quantized layer's tensors are taken from llmslim's own module built on the meta device
(`quant.registry` module class of the format, on `device="meta"`), so the planner counts exactly what the loader
allocates: NF4/FP4 packed codes plus float32 absmax per block (or uint8 absmax, float32 nested
absmax per 256 blocks and a float32 offset with double quantization), int8 rows plus a float32
absmax per row, int4 codes plus float16 scale and zero per group. A mixture-of-experts layer's fused
expert weights are stored as that dense layer's tensors with a leading expert dimension (`quant.experts`),
so they are counted as one expert's layer times the number of experts.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache

import torch

from llmslim.config import SlimConfig
from llmslim.plan.shapes import ExpertSpec, LinearSpec, ModelShape

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
        experts / per_block_experts: bytes of the routed experts (all their tensors, biases included), in
            all and per block; a decode step reads only the routed ones. expert_codes: their codes alone.
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
    experts: int = 0
    per_block_experts: list[int] = field(default_factory=list)
    expert_codes: int = 0

    @property
    def total(self) -> int:
        return self.codes + self.scales + self.kept + self.buffers

    @property
    def resident(self) -> int:
        """Bytes besides the routed experts: attention, routers, shared experts, embeddings, norms, buffers."""
        return self.total - self.experts


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


def expert_tensors(
    spec: ExpertSpec, config: SlimConfig | None, dtype: str, selected: bool | None = None, key: str | None = None
) -> tuple[tuple[str, int], ...]:
    """(full tensor name, bytes) of one fused expert projection as llmslim stores it under `config`.

    Quantized: the format's dense layer for one expert (`linear_tensors`), each tensor times the experts, named
    as `quant.experts` names them (`gate_up_proj`, `gate_up_proj_absmax`, ...); else the float 3-D weight.
    The bias, when there is one, stays in the float dtype.
    """
    from llmslim.quant.experts import stored_name

    if selected is None:
        selected = spec.quantized and config is not None and config.weights is not None and config.selects(spec.name)
    size = dtype_bytes(dtype)
    bias = ((f"{spec.name}_bias", spec.experts * spec.out_features * size),) if spec.bias else ()
    if not selected:
        return ((spec.name, spec.experts * spec.in_features * spec.out_features * size),) + bias
    module, _, proj = spec.name.rpartition(".")
    one = linear_tensors(LinearSpec(spec.name, spec.in_features, spec.out_features, False), config, dtype, True, key)
    return tuple((f"{module}.{stored_name(proj, name)}", spec.experts * nbytes) for name, nbytes in one) + bias


def iter_tensor_bytes(shape: ModelShape, config: SlimConfig | None, dtype: str) -> Iterator[tuple[str, str, int]]:
    """(full tensor name, role, bytes) of every tensor; role is codes, scales, kept or buffers."""
    for name, role, nbytes, _ in _iter_tensor_bytes(shape, config, dtype):
        yield name, role, nbytes


def _iter_tensor_bytes(shape: ModelShape, config: SlimConfig | None, dtype: str) -> Iterator[tuple[str, str, int, bool]]:
    """`iter_tensor_bytes`, each with whether it belongs to the routed experts."""
    quantized = config is not None and config.weights is not None
    key = json.dumps(config.to_dict(), sort_keys=True) if quantized else None
    for lin in shape.linears:
        selected = quantized and config.selects(lin.name)
        for name, nbytes in linear_tensors(lin, config, dtype, selected, key):
            role = "kept" if name == "bias" or not selected else ("codes" if name == "weight" else "scales")
            yield f"{lin.name}.{name}", role, nbytes, False
    for spec in shape.expert_specs:
        selected = quantized and spec.quantized and config.selects(spec.name)
        for name, nbytes in expert_tensors(spec, config, dtype, selected, key):
            role = "kept" if name == f"{spec.name}_bias" or not selected else ("codes" if name == spec.name else "scales")
            yield name, role, nbytes, True
    embedding = _word_embedding(shape) if config is not None and config.embedding_rank is not None else None
    for t in shape.tensors:
        if t is embedding:  # FactorizedEmbedding: table (V x E) and projection (E x H), in the float dtype
            prefix, rank = t.name.removesuffix(".weight"), config.embedding_rank
            yield f"{prefix}.table.weight", "kept", shape.vocab * rank * dtype_bytes(dtype), False
            yield f"{prefix}.proj", "kept", rank * shape.hidden * dtype_bytes(dtype), False
            continue
        yield (
            t.name,
            "kept" if t.dtype is None else "buffers",
            t.numel * (dtype_bytes(dtype) if t.dtype is None else _buffer_bytes(t.dtype)),
            False,
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
    out = WeightBytes(per_block=[0] * shape.n_layers, per_block_experts=[0] * shape.n_layers)
    block_of = _block_index(shape)
    for name, role, nbytes, routed in _iter_tensor_bytes(shape, config, dtype):
        setattr(out, role, getattr(out, role) + nbytes)
        block = block_of.get(name.rpartition(".")[0], block_of.get(name))
        if block is None:
            out.outer += nbytes
        else:
            out.per_block[block] += nbytes
        if routed:
            out.experts += nbytes
            out.per_block_experts[block] += nbytes
            out.expert_codes += nbytes if role == "codes" else 0
    quantizes = config is not None and config.weights is not None
    selected = [(lin.in_features, lin.out_features) for lin in shape.linears if quantizes and config.selects(lin.name)]
    selected += [(e.in_features, e.out_features) for e in shape.expert_specs if quantizes and e.quantized and config.selects(e.name)]
    out.largest_linear = max((fan_in * fan_out for fan_in, fan_out in selected), default=0)
    out.max_in = max((fan_in for fan_in, _ in selected), default=0)
    out.max_out = max((fan_out for _, fan_out in selected), default=0)
    out.input_embedding = 0 if factorizes(shape, config) else _input_embedding_bytes(shape, dtype)  # factors: read whole
    return out


def _block_index(shape: ModelShape) -> dict[str, int]:
    index = {}
    for i, (linears, tensors, experts) in enumerate(zip(shape.block_linears, shape.block_tensors, shape.block_experts, strict=True)):
        index.update({lin.name: i for lin in linears})
        index.update({t.name: i for t in tensors})
        index.update({e.name.rpartition(".")[0]: i for e in experts})  # the experts module: its tensors' prefix
    return index


def _input_embedding_bytes(shape: ModelShape, dtype: str) -> int:
    """The word embedding; when tied to the output layer it is read whole every step, so it counts as 0 here."""
    if shape.tied_embeddings:
        return 0
    embeddings = [t for t in shape.outer_tensors if t.dtype is None and t.numel >= shape.vocab * shape.hidden > 0]
    return embeddings[0].numel * dtype_bytes(dtype) if embeddings else 0
