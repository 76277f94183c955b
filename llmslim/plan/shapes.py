"""Every tensor a causal LM holds, from its `config.json` alone.

Architecture math per family (Llama-like, GPT-2, OPT, BLOOM, Falcon), written to list exactly the
parameters and buffers transformers creates, under the same names, so that a `SlimConfig`'s
include / exclude patterns select the same layers the loader would. Any other architecture falls
back to a meta-device skeleton built by transformers (exact, slower, needs its code).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LinearSpec:
    """A linear layer llmslim may quantize: `name` is the module name, weight `(out_features, in_features)`."""

    name: str
    in_features: int
    out_features: int
    bias: bool


@dataclass(frozen=True)
class TensorSpec:
    """A tensor kept as is: `dtype=None` means the model's float dtype (embeddings, norms, experts)."""

    name: str
    numel: int
    dtype: str | None = None


@dataclass
class ModelShape:
    """The tensors and the attention geometry of a model.

    Args:
        name: a label (folder name, bundled name or `model_type`).
        model_type: the config's `model_type`.
        linears / tensors: every linear layer and every other tensor, per decoder block
            (`blocks[i]`) and outside the blocks (`outer_*`).
        n_layers, hidden, n_heads, n_kv_heads, head_dim, intermediate, vocab: the geometry.
        experts / experts_per_token: MoE experts per block and how many each token uses (0 if dense).
        tied_embeddings: the output layer shares the input embedding's weight.
        dtype: the checkpoint's float dtype name (None when the config does not say).
        max_context: the longest context the config supports (None when it does not say).
        sliding_window: tokens the KV cache keeps per layer when the model attends to a window.
        notes: what the math could not represent (shown with the plan).
    """

    name: str
    model_type: str
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    block_linears: list[list[LinearSpec]]
    block_tensors: list[list[TensorSpec]]
    outer_linears: list[LinearSpec]
    outer_tensors: list[TensorSpec]
    tied_embeddings: bool = False
    experts: int = 0
    experts_per_token: int = 0
    dtype: str | None = None
    max_context: int | None = None
    sliding_window: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def linears(self) -> list[LinearSpec]:
        return [lin for block in self.block_linears for lin in block] + self.outer_linears

    @property
    def tensors(self) -> list[TensorSpec]:
        return [t for block in self.block_tensors for t in block] + self.outer_tensors

    @property
    def n_params(self) -> int:
        """Parameters (buffers excluded; tied weights once)."""
        linear = sum(lin.in_features * lin.out_features + (lin.out_features if lin.bias else 0) for lin in self.linears)
        return linear + sum(t.numel for t in self.tensors if t.dtype is None)

    @property
    def kv_width(self) -> int:
        """Elements of keys plus values one token adds to one layer's cache."""
        return 2 * self.n_kv_heads * self.head_dim


# Sane upper bounds of the config.json fields the planner reads (a real model is far below each): a
# bound keeps a typo such as `num_hidden_layers: 1000000` from planning (and listing) a million blocks.
MAX_LAYERS = 4096
MAX_WIDTH = 2**20  # hidden, intermediate, head_dim, embedding projection
MAX_HEADS = 2**16  # attention and KV heads, experts
MAX_VOCAB = 2**24
MAX_POSITIONS = 2**30
_INT_FIELDS: dict[str, tuple[int, int]] = {  # field -> (lowest, highest) allowed
    **dict.fromkeys(("num_hidden_layers", "n_layer"), (1, MAX_LAYERS)),
    **dict.fromkeys(
        (
            "hidden_size",
            "n_embd",
            "n_embed",
            "intermediate_size",
            "ffn_dim",
            "n_inner",
            "ffn_hidden_size",
            "head_dim",
            "word_embed_proj_dim",
        ),
        (1, MAX_WIDTH),
    ),
    **dict.fromkeys(("num_attention_heads", "n_head", "num_key_value_heads", "num_kv_heads"), (1, MAX_HEADS)),
    **dict.fromkeys(("num_local_experts", "num_experts_per_tok"), (0, MAX_HEADS)),
    "vocab_size": (1, MAX_VOCAB),
    **dict.fromkeys(("max_position_embeddings", "n_positions", "seq_length", "sliding_window"), (1, MAX_POSITIONS)),
    "num_ln_in_parallel_attn": (1, 2),
}
_BOOL_FIELDS = (
    "tie_word_embeddings", "attention_bias", "mlp_bias", "enable_bias", "layer_norm_elementwise_affine", "do_layer_norm_before",
    "_remove_final_layer_norm", "new_decoder_architecture", "multi_query", "bias", "parallel_attn", "alibi", "use_sliding_window",
)  # fmt: skip


def check_config(config: Any) -> None:
    """Validate the config.json fields the planner reads: types, ranges and sane upper bounds.

    A field set to null counts as absent, as in transformers.

    Raises:
        ValueError: naming the field, its value and what it must be.
    """
    if not isinstance(config, dict):
        raise ValueError(f"config.json must hold a JSON object of a model's fields, got {type(config).__name__}: {config!r:.200}")
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ValueError(f"config.json field 'model_type' must name an architecture such as 'llama', got {model_type!r:.200}")
    for key, (low, high) in _INT_FIELDS.items():
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high):
            raise ValueError(
                f"config.json field {key!r} must be an integer from {low} to {high}, got {value!r:.200}: fix it in config.json"
            )
    for key in _BOOL_FIELDS:
        value = config.get(key)
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"config.json field {key!r} must be true or false, got {value!r:.200}: fix it in config.json")
    factor = config.get("partial_rotary_factor")
    if factor is not None and (isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor <= 1):
        raise ValueError(
            f"config.json field 'partial_rotary_factor' must be a number in (0, 1], got {factor!r:.200}: fix it in config.json"
        )
    for key in ("dtype", "torch_dtype"):
        value = config.get(key)
        if value is not None and not isinstance(value, str):
            raise ValueError(
                f"config.json field {key!r} must be a dtype name such as 'bfloat16', got {value!r:.200}: fix it in config.json"
            )


def _head_dim(config: dict, hidden: int, heads: int) -> int:
    """The config's `head_dim`, else hidden / heads (which must then be at least 1)."""
    head_dim = config.get("head_dim") or hidden // heads
    if head_dim < 1:
        raise ValueError(
            f"config.json has more attention heads ({heads}) than hidden units ({hidden}): fix num_attention_heads or hidden_size"
        )
    return head_dim


def _get(config: dict, *keys: str, default: Any = None) -> Any:
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    if default is None:
        raise ValueError(f"config.json has none of {list(keys)}: is it a causal LM config?")
    return default


def _dtype(config: dict) -> str | None:
    return config.get("dtype") or config.get("torch_dtype")


def _rotary(prefix: str, head_dim: int, config: dict) -> list[TensorSpec]:
    """transformers' rotary embedding keeps `inv_freq` and `original_inv_freq` (float32 buffers)."""
    partial = config.get("partial_rotary_factor") or 1.0
    half = int(head_dim * partial) // 2
    return [
        TensorSpec(f"{prefix}.rotary_emb.inv_freq", half, "float32"),
        TensorSpec(f"{prefix}.rotary_emb.original_inv_freq", half, "float32"),
    ]


def _lm_head(shape_in: int, vocab: int, tied: bool) -> list[LinearSpec]:
    return [] if tied else [LinearSpec("lm_head", shape_in, vocab, False)]


def _llama_like(config: dict, name: str) -> ModelShape:
    """Llama, Mistral, Qwen2, Mixtral: RMSNorm, rotary, grouped-query attention, gated MLP or MoE."""
    hidden, layers = _get(config, "hidden_size"), _get(config, "num_hidden_layers")
    heads = _get(config, "num_attention_heads")
    kv_heads = _get(config, "num_key_value_heads", default=heads)
    head_dim = _head_dim(config, hidden, heads)
    inter, vocab = _get(config, "intermediate_size"), _get(config, "vocab_size")
    qkv_bias = config.get("model_type") == "qwen2" or bool(config.get("attention_bias", False))
    experts = int(config.get("num_local_experts") or 0)
    tied = bool(config.get("tie_word_embeddings", False))
    block_linears, block_tensors = [], []
    for i in range(layers):
        p = f"model.layers.{i}"
        lin = [
            LinearSpec(f"{p}.self_attn.q_proj", hidden, heads * head_dim, qkv_bias),
            LinearSpec(f"{p}.self_attn.k_proj", hidden, kv_heads * head_dim, qkv_bias),
            LinearSpec(f"{p}.self_attn.v_proj", hidden, kv_heads * head_dim, qkv_bias),
            LinearSpec(f"{p}.self_attn.o_proj", heads * head_dim, hidden, bool(config.get("attention_bias", False))),
        ]
        tensors = [TensorSpec(f"{p}.input_layernorm.weight", hidden), TensorSpec(f"{p}.post_attention_layernorm.weight", hidden)]
        if experts:  # transformers 5 fuses the experts into 3-D parameters and routes with a plain parameter
            tensors += [
                TensorSpec(f"{p}.mlp.gate.weight", experts * hidden),
                TensorSpec(f"{p}.mlp.experts.gate_up_proj", experts * 2 * inter * hidden),
                TensorSpec(f"{p}.mlp.experts.down_proj", experts * hidden * inter),
            ]
        else:
            mlp_bias = bool(config.get("mlp_bias", False))
            lin += [
                LinearSpec(f"{p}.mlp.gate_proj", hidden, inter, mlp_bias),
                LinearSpec(f"{p}.mlp.up_proj", hidden, inter, mlp_bias),
                LinearSpec(f"{p}.mlp.down_proj", inter, hidden, mlp_bias),
            ]
        block_linears.append(lin)
        block_tensors.append(tensors)
    outer = [TensorSpec("model.embed_tokens.weight", vocab * hidden), TensorSpec("model.norm.weight", hidden)]
    notes = []
    if experts:
        notes.append("MoE experts are fused 3-D parameters in transformers 5, not nn.Linear layers: llmslim keeps them in the float dtype")
    return ModelShape(
        name, config.get("model_type", "llama"), layers, hidden, heads, kv_heads, head_dim, inter, vocab,
        block_linears, block_tensors, _lm_head(hidden, vocab, tied), outer + _rotary("model", head_dim, config),
        tied_embeddings=tied, experts=experts, experts_per_token=int(config.get("num_experts_per_tok") or 0),
        dtype=_dtype(config), max_context=config.get("max_position_embeddings"),
        sliding_window=config.get("sliding_window") if config.get("use_sliding_window", True) else None, notes=notes,
    )  # fmt: skip


def _gpt2(config: dict, name: str) -> ModelShape:
    """GPT-2: learned positions, LayerNorm with bias, Conv1D layers (fused qkv), tied output layer."""
    hidden, layers, heads = _get(config, "n_embd", "hidden_size"), _get(config, "n_layer", "num_hidden_layers"), _get(config, "n_head")
    inter, vocab, positions = config.get("n_inner") or 4 * hidden, _get(config, "vocab_size"), _get(config, "n_positions")
    tied = bool(config.get("tie_word_embeddings", True))
    block_linears, block_tensors = [], []
    for i in range(layers):
        p = f"transformer.h.{i}"
        block_linears.append([
            LinearSpec(f"{p}.attn.c_attn", hidden, 3 * hidden, True),
            LinearSpec(f"{p}.attn.c_proj", hidden, hidden, True),
            LinearSpec(f"{p}.mlp.c_fc", hidden, inter, True),
            LinearSpec(f"{p}.mlp.c_proj", inter, hidden, True),
        ])  # fmt: skip
        block_tensors.append([TensorSpec(f"{p}.{ln}.{w}", hidden) for ln in ("ln_1", "ln_2") for w in ("weight", "bias")])
    outer = [TensorSpec("transformer.wte.weight", vocab * hidden), TensorSpec("transformer.wpe.weight", positions * hidden)]
    outer += [TensorSpec(f"transformer.ln_f.{w}", hidden) for w in ("weight", "bias")]
    return ModelShape(
        name, "gpt2", layers, hidden, heads, heads, _head_dim({}, hidden, heads), inter, vocab, block_linears, block_tensors,
        _lm_head(hidden, vocab, tied), outer, tied_embeddings=tied, dtype=_dtype(config), max_context=positions,
    )  # fmt: skip


def _opt(config: dict, name: str) -> ModelShape:
    """OPT: learned positions (offset 2), biases everywhere, optional projection of the embedding."""
    hidden, layers, heads = _get(config, "hidden_size"), _get(config, "num_hidden_layers"), _get(config, "num_attention_heads")
    inter, vocab, positions = _get(config, "ffn_dim"), _get(config, "vocab_size"), _get(config, "max_position_embeddings")
    embed_dim = config.get("word_embed_proj_dim") or hidden
    bias = bool(config.get("enable_bias", True))
    ln_params = ("weight", "bias") if config.get("layer_norm_elementwise_affine", True) else ()
    tied = bool(config.get("tie_word_embeddings", True))
    block_linears, block_tensors = [], []
    for i in range(layers):
        p = f"model.decoder.layers.{i}"
        lin = [LinearSpec(f"{p}.self_attn.{n}_proj", hidden, hidden, bias) for n in ("k", "v", "q", "out")]
        lin += [LinearSpec(f"{p}.fc1", hidden, inter, bias), LinearSpec(f"{p}.fc2", inter, hidden, bias)]
        block_linears.append(lin)
        block_tensors.append(
            [TensorSpec(f"{p}.{ln}.{w}", hidden) for ln in ("self_attn_layer_norm", "final_layer_norm") for w in ln_params]
        )
    outer = [
        TensorSpec("model.decoder.embed_tokens.weight", vocab * embed_dim),
        TensorSpec("model.decoder.embed_positions.weight", (positions + 2) * hidden),
    ]
    outer_linears = []
    if embed_dim != hidden:
        outer_linears += [
            LinearSpec("model.decoder.project_out", hidden, embed_dim, False),
            LinearSpec("model.decoder.project_in", embed_dim, hidden, False),
        ]
    if config.get("do_layer_norm_before", True) and not config.get("_remove_final_layer_norm", False):
        outer += [TensorSpec(f"model.decoder.final_layer_norm.{w}", hidden) for w in ln_params]
    return ModelShape(
        name, "opt", layers, hidden, heads, heads, _head_dim({}, hidden, heads), inter, vocab, block_linears, block_tensors,
        outer_linears + _lm_head(embed_dim, vocab, tied), outer, tied_embeddings=tied, dtype=_dtype(config), max_context=positions,
    )  # fmt: skip


def _bloom(config: dict, name: str) -> ModelShape:
    """BLOOM: ALiBi (no position tensors), LayerNorm after the embedding, fused qkv with bias, tied output."""
    hidden, layers = _get(config, "hidden_size", "n_embed"), _get(config, "n_layer", "num_hidden_layers")
    heads, vocab = _get(config, "n_head", "num_attention_heads"), _get(config, "vocab_size")
    tied = bool(config.get("tie_word_embeddings", True))
    block_linears, block_tensors = [], []
    for i in range(layers):
        p = f"transformer.h.{i}"
        block_linears.append([
            LinearSpec(f"{p}.self_attention.query_key_value", hidden, 3 * hidden, True),
            LinearSpec(f"{p}.self_attention.dense", hidden, hidden, True),
            LinearSpec(f"{p}.mlp.dense_h_to_4h", hidden, 4 * hidden, True),
            LinearSpec(f"{p}.mlp.dense_4h_to_h", 4 * hidden, hidden, True),
        ])  # fmt: skip
        block_tensors.append(
            [TensorSpec(f"{p}.{ln}.{w}", hidden) for ln in ("input_layernorm", "post_attention_layernorm") for w in ("weight", "bias")]
        )
    outer = [TensorSpec("transformer.word_embeddings.weight", vocab * hidden)]
    outer += [TensorSpec(f"transformer.{ln}.{w}", hidden) for ln in ("word_embeddings_layernorm", "ln_f") for w in ("weight", "bias")]
    return ModelShape(
        name, "bloom", layers, hidden, heads, heads, _head_dim({}, hidden, heads), 4 * hidden, vocab, block_linears, block_tensors,
        _lm_head(hidden, vocab, tied), outer, tied_embeddings=tied, dtype=_dtype(config), max_context=config.get("seq_length"),
    )  # fmt: skip


def _falcon(config: dict, name: str) -> ModelShape:
    """Falcon (new decoder architecture: grouped KV heads, two LayerNorms, parallel attention and MLP)."""
    hidden, layers = _get(config, "hidden_size"), _get(config, "num_hidden_layers")
    heads, vocab = _get(config, "num_attention_heads"), _get(config, "vocab_size")
    head_dim = _head_dim({}, hidden, heads)
    new_arch = bool(config.get("new_decoder_architecture", False))
    kv_heads = config.get("num_kv_heads") or heads if new_arch else (1 if config.get("multi_query", True) else heads)
    inter, bias = config.get("ffn_hidden_size") or 4 * hidden, bool(config.get("bias", False))
    tied = bool(config.get("tie_word_embeddings", True))
    two_ln = new_arch and config.get("num_ln_in_parallel_attn", 2) == 2
    norms = (
        ("ln_attn", "ln_mlp")
        if two_ln
        else ("input_layernorm",) + (() if config.get("parallel_attn", True) else ("post_attention_layernorm",))
    )
    block_linears, block_tensors = [], []
    for i in range(layers):
        p = f"transformer.h.{i}"
        block_linears.append([
            LinearSpec(f"{p}.self_attention.query_key_value", hidden, (heads + 2 * kv_heads) * head_dim, bias),
            LinearSpec(f"{p}.self_attention.dense", hidden, hidden, bias),
            LinearSpec(f"{p}.mlp.dense_h_to_4h", hidden, inter, bias),
            LinearSpec(f"{p}.mlp.dense_4h_to_h", inter, hidden, bias),
        ])  # fmt: skip
        block_tensors.append([TensorSpec(f"{p}.{ln}.{w}", hidden) for ln in norms for w in ("weight", "bias")])
    outer = [TensorSpec("transformer.word_embeddings.weight", vocab * hidden)]
    outer += [TensorSpec(f"transformer.ln_f.{w}", hidden) for w in ("weight", "bias")]
    if not config.get("alibi", False):
        outer += _rotary("transformer", head_dim, config)
    return ModelShape(
        name, "falcon", layers, hidden, heads, kv_heads, head_dim, inter, vocab, block_linears, block_tensors,
        _lm_head(hidden, vocab, tied), outer, tied_embeddings=tied, dtype=_dtype(config), max_context=config.get("max_position_embeddings"),
    )  # fmt: skip


FAMILIES: dict[str, Callable[[dict, str], ModelShape]] = {
    "llama": _llama_like,
    "mistral": _llama_like,
    "qwen2": _llama_like,
    "mixtral": _llama_like,
    "gpt2": _gpt2,
    "opt": _opt,
    "bloom": _bloom,
    "falcon": _falcon,
}


def model_shape(config: dict, name: str | None = None) -> ModelShape:
    """The tensors of the causal LM `config` (a parsed config.json) describes.

    Raises:
        ValueError: the config has no `model_type`, a field its family needs is missing, or a field
            has a wrong type or is out of range (`check_config`).
    """
    if isinstance(config, dict) and not config.get("model_type"):
        raise ValueError("config.json has no model_type: give the config.json of a Hugging Face causal LM")
    check_config(config)
    model_type = config["model_type"]
    name = name or model_type
    if model_type in FAMILIES:
        return FAMILIES[model_type](config, name)
    logger.info("no architecture math for model_type %r: counting a meta-device skeleton built by transformers", model_type)
    return skeleton_shape(config, name)


def skeleton_shape(config: dict, name: str | None = None) -> ModelShape:
    """The tensors of a meta-device skeleton transformers builds from `config` (any architecture it knows)."""
    model = _meta_model(config)
    return shape_of_model(model, name or config["model_type"])


def _meta_model(config: dict):
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {k: v for k, v in config.items() if k not in ("model_type", "architectures", "quantization_config")}
    try:
        hf_config = AutoConfig.for_model(config["model_type"], **fields)
    except ValueError as err:
        raise ValueError(f"model_type {config['model_type']!r} is unknown to llmslim's planner and to transformers: {err}") from err
    except Exception as err:  # transformers' own checks of the fields raise many types
        raise ValueError(f"transformers rejects this {config['model_type']!r} config.json: {type(err).__name__}: {err}") from err
    try:
        with init_empty_weights(include_buffers=False):
            return AutoModelForCausalLM.from_config(hf_config)
    except Exception as err:
        raise ValueError(
            f"transformers cannot build a {config['model_type']!r} model from this config.json: {type(err).__name__}: {err}"
        ) from err


def shape_of_model(model, name: str) -> ModelShape:
    """A `ModelShape` listing the tensors of an (unquantized, possibly meta) transformers model."""
    from llmslim.hf.compat import block_index, tied_module_names, tied_weights
    from llmslim.memory.blocks import find_blocks
    from llmslim.quant.modules import quantizable

    blocks_name, blocks = find_blocks(model)
    tied = tied_module_names(model)
    linears: dict[str, LinearSpec] = {}
    for mod_name, module in model.named_modules():
        if quantizable(module) and mod_name not in tied:
            out_f, in_f = (
                (module.weight.shape[1], module.weight.shape[0])
                if not hasattr(module, "in_features")
                else (module.out_features, module.in_features)
            )
            linears[mod_name] = LinearSpec(mod_name, in_f, out_f, module.bias is not None)
    covered = {f"{n}.{t}" for n in linears for t in ("weight", "bias")}
    covered |= set(tied_weights(model))  # tied copies: counted once, at their source
    tensors = [TensorSpec(n, t.numel()) for n, t in model.named_parameters() if n not in covered]
    tensors += [TensorSpec(n, b.numel(), str(b.dtype).removeprefix("torch.")) for n, b in model.named_buffers() if n not in covered]
    n = len(blocks)

    def block_of(item_name: str) -> int | None:
        return block_index(item_name, blocks_name)

    block_linears: list[list[LinearSpec]] = [[] for _ in range(n)]
    block_tensors: list[list[TensorSpec]] = [[] for _ in range(n)]
    outer_linears, outer_tensors = [], []
    for lin in linears.values():
        (outer_linears if block_of(lin.name) is None else block_linears[block_of(lin.name)]).append(lin)
    for t in tensors:
        (outer_tensors if block_of(t.name) is None else block_tensors[block_of(t.name)]).append(t)
    cfg = model.config
    heads = getattr(cfg, "num_attention_heads", 1)
    hidden = getattr(cfg, "hidden_size", 0)
    return ModelShape(
        name, cfg.model_type, n, hidden, heads, getattr(cfg, "num_key_value_heads", None) or heads,
        getattr(cfg, "head_dim", None) or hidden // max(heads, 1), getattr(cfg, "intermediate_size", None) or 4 * hidden,
        getattr(cfg, "vocab_size", 0), block_linears, block_tensors, outer_linears, outer_tensors, tied_embeddings=bool(tied),
        dtype=_dtype(cfg.to_dict()), max_context=getattr(cfg, "max_position_embeddings", None),
        notes=[f"no architecture math for {cfg.model_type!r}: tensors counted from a meta skeleton; KV, activations: generic formulas"],
    )  # fmt: skip
