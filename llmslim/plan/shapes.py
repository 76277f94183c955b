"""Every tensor a causal LM holds, from its `config.json` alone.

Architecture math per family (Llama-like, GPT-2, OPT, BLOOM, Falcon), written to list exactly the
parameters and buffers transformers creates, under the same names, so that a `SlimConfig`'s
include / exclude patterns select the same layers the loader would. Any other architecture falls
back to a meta-device skeleton built by transformers (exact, slower, needs its code).

Mixture-of-experts layers: transformers 5 fuses each layer's routed experts into 3-D parameters of
an experts module; each such parameter is an `ExpertSpec` (quantized per expert by `quant.experts`),
found by structure in a skeleton (`hf.compat.is_experts_module`), never by per-architecture lists.
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
class ExpertSpec:
    """One projection of a layer's routed experts, fused into a 3-D parameter (transformers 5).

    Args:
        name: the parameter's full name (`model.layers.3.mlp.experts.gate_up_proj`): llmslim stores the
            quantized codes under it and the format's scales beside it (`..._absmax`, `..._SCB`, ...).
        experts: experts in the layer (the leading dimension).
        in_features / out_features: one expert's weight is `(out_features, in_features)`, as a linear layer's.
        bias: a float `(experts, out_features)` bias `{name}_bias` beside it (gpt-oss).
        quantized: llmslim quantizes it (its module was built with transformers' experts decorator and has
            the layout `quant.experts` knows); otherwise it stays in the float dtype.
    """

    name: str
    experts: int
    in_features: int
    out_features: int
    bias: bool = False
    quantized: bool = True

    @property
    def expert_params(self) -> int:
        """Parameters of one expert's slice (weight and bias)."""
        return self.in_features * self.out_features + (self.out_features if self.bias else 0)

    @property
    def n_params(self) -> int:
        return self.experts * self.expert_params


@dataclass(frozen=True)
class TensorSpec:
    """A tensor kept as is: `dtype=None` means the model's float dtype (embeddings, norms, routers)."""

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
        experts / experts_per_token: routed experts per MoE layer and how many each token uses (0 if dense).
        block_experts: the routed experts' fused projections of each block (empty lists when dense).
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
    block_experts: list[list[ExpertSpec]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.block_experts:
            self.block_experts = [[] for _ in range(self.n_layers)]

    @property
    def linears(self) -> list[LinearSpec]:
        return [lin for block in self.block_linears for lin in block] + self.outer_linears

    @property
    def tensors(self) -> list[TensorSpec]:
        return [t for block in self.block_tensors for t in block] + self.outer_tensors

    @property
    def expert_specs(self) -> list[ExpertSpec]:
        return [e for block in self.block_experts for e in block]

    @property
    def n_params(self) -> int:
        """Parameters (buffers excluded; tied weights once)."""
        linear = sum(lin.in_features * lin.out_features + (lin.out_features if lin.bias else 0) for lin in self.linears)
        routed = sum(e.n_params for e in self.expert_specs)
        return linear + routed + sum(t.numel for t in self.tensors if t.dtype is None)

    @property
    def active_params(self) -> int:
        """Parameters one token uses: everything but the routed experts (attention, routers, shared experts,
        embeddings), plus `experts_per_token` of each layer's routed experts. Equals `n_params` for a dense model."""
        routed = sum(e.n_params for e in self.expert_specs)
        used = sum(min(self.experts_per_token, e.experts) * e.expert_params for e in self.expert_specs)
        return self.n_params - routed + used

    @property
    def expert_intermediate(self) -> int:
        """One routed expert's intermediate width (the input of its `down_proj`), 0 when dense."""
        return max((e.in_features for e in self.expert_specs if e.name.endswith("down_proj")), default=0)

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
    **dict.fromkeys(("num_local_experts", "num_experts_per_tok", "num_experts", "n_routed_experts"), (0, MAX_HEADS)),
    **dict.fromkeys(("moe_intermediate_size", "intermediate_size_mlp"), (1, MAX_WIDTH)),
    "vocab_size": (1, MAX_VOCAB),
    **dict.fromkeys(("max_position_embeddings", "n_positions", "seq_length"), (1, MAX_POSITIONS)),
    "sliding_window": (0, MAX_POSITIONS),  # 0: no window (transformers writes it so for Qwen2-MoE without one)
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
    experts, per_token = _mixtral_experts(config)
    tied = bool(config.get("tie_word_embeddings", False))
    block_linears, block_tensors, block_experts = [], [], []
    for i in range(layers):
        p = f"model.layers.{i}"
        lin = [
            LinearSpec(f"{p}.self_attn.q_proj", hidden, heads * head_dim, qkv_bias),
            LinearSpec(f"{p}.self_attn.k_proj", hidden, kv_heads * head_dim, qkv_bias),
            LinearSpec(f"{p}.self_attn.v_proj", hidden, kv_heads * head_dim, qkv_bias),
            LinearSpec(f"{p}.self_attn.o_proj", heads * head_dim, hidden, bool(config.get("attention_bias", False))),
        ]
        tensors = [TensorSpec(f"{p}.input_layernorm.weight", hidden), TensorSpec(f"{p}.post_attention_layernorm.weight", hidden)]
        if experts:  # transformers 5 fuses the experts into 3-D parameters and routes with a plain (float) parameter
            tensors.append(TensorSpec(f"{p}.mlp.gate.weight", experts * hidden))
            block_experts.append([
                ExpertSpec(f"{p}.mlp.experts.gate_up_proj", experts, hidden, 2 * inter),
                ExpertSpec(f"{p}.mlp.experts.down_proj", experts, inter, hidden),
            ])  # fmt: skip
        else:
            mlp_bias = bool(config.get("mlp_bias", False))
            lin += [
                LinearSpec(f"{p}.mlp.gate_proj", hidden, inter, mlp_bias),
                LinearSpec(f"{p}.mlp.up_proj", hidden, inter, mlp_bias),
                LinearSpec(f"{p}.mlp.down_proj", inter, hidden, mlp_bias),
            ]
            block_experts.append([])
        block_linears.append(lin)
        block_tensors.append(tensors)
    outer = [TensorSpec("model.embed_tokens.weight", vocab * hidden), TensorSpec("model.norm.weight", hidden)]
    return ModelShape(
        name, config.get("model_type", "llama"), layers, hidden, heads, kv_heads, head_dim, inter, vocab,
        block_linears, block_tensors, _lm_head(hidden, vocab, tied), outer + _rotary("model", head_dim, config),
        tied_embeddings=tied, experts=experts, experts_per_token=per_token,
        dtype=_dtype(config), max_context=config.get("max_position_embeddings"),
        sliding_window=config.get("sliding_window") if config.get("use_sliding_window", True) else None,
        block_experts=block_experts,
    )  # fmt: skip


def _mixtral_experts(config: dict) -> tuple[int, int]:
    """(experts, experts per token) of a Mixtral config (transformers' defaults: 8 and 2); (0, 0) for the dense families."""
    if config.get("model_type") != "mixtral":
        return 0, 0
    experts, per_token = config.get("num_local_experts"), config.get("num_experts_per_tok")
    return (8 if experts is None else experts), (2 if per_token is None else per_token)


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
    import torch
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
        # the meta device for every tensor factory too: some experts modules fill their 3-D parameters at
        # construction (Llama-4's `torch.zeros`), 43 GB of RAM each before init_empty_weights could move them
        with init_empty_weights(include_buffers=False), torch.device("meta"):
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
    experts: list[ExpertSpec] = []
    notes = []
    for mod_name, module in model.named_modules():
        if quantizable(module) and mod_name not in tied:
            out_f, in_f = (
                (module.weight.shape[1], module.weight.shape[0])
                if not hasattr(module, "in_features")
                else (module.out_features, module.in_features)
            )
            linears[mod_name] = LinearSpec(mod_name, in_f, out_f, module.bias is not None)
        specs = _expert_specs(mod_name, module)
        experts += specs
        if specs and not specs[0].quantized and not notes:
            notes.append(
                f"the experts of {type(module).__name__} are not built with transformers' experts decorator: llmslim keeps them "
                "in the float dtype"
            )
    covered = {f"{n}.{t}" for n in linears for t in ("weight", "bias")}
    covered |= {e.name for e in experts} | {f"{e.name}_bias" for e in experts if e.bias}
    covered |= set(tied_weights(model))  # tied copies: counted once, at their source
    tensors = [TensorSpec(n, t.numel()) for n, t in model.named_parameters() if n not in covered]
    tensors += [TensorSpec(n, b.numel(), str(b.dtype).removeprefix("torch.")) for n, b in model.named_buffers() if n not in covered]
    n = len(blocks)

    def block_of(item_name: str) -> int | None:
        return block_index(item_name, blocks_name)

    block_linears: list[list[LinearSpec]] = [[] for _ in range(n)]
    block_tensors: list[list[TensorSpec]] = [[] for _ in range(n)]
    block_experts: list[list[ExpertSpec]] = [[] for _ in range(n)]
    outer_linears, outer_tensors = [], []
    for lin in linears.values():
        (outer_linears if block_of(lin.name) is None else block_linears[block_of(lin.name)]).append(lin)
    for t in tensors:
        (outer_tensors if block_of(t.name) is None else block_tensors[block_of(t.name)]).append(t)
    for e in experts:
        block_experts[block_of(e.name)].append(e)  # experts live in the decoder blocks
    cfg = model.config
    heads = getattr(cfg, "num_attention_heads", 1)
    hidden = getattr(cfg, "hidden_size", 0)
    n_experts = max((e.experts for e in experts), default=0)
    per_token = _experts_per_token(cfg, n_experts, notes)
    notes.insert(0, f"no architecture math for {cfg.model_type!r}: tensors counted from a meta skeleton; KV, activations: generic formulas")
    return ModelShape(
        name, cfg.model_type, n, hidden, heads, getattr(cfg, "num_key_value_heads", None) or heads,
        getattr(cfg, "head_dim", None) or hidden // max(heads, 1), getattr(cfg, "intermediate_size", None) or 4 * hidden,
        getattr(cfg, "vocab_size", 0), block_linears, block_tensors, outer_linears, outer_tensors, tied_embeddings=bool(tied),
        experts=n_experts, experts_per_token=per_token, dtype=_dtype(cfg.to_dict()),
        max_context=getattr(cfg, "max_position_embeddings", None), notes=notes, block_experts=block_experts,
    )  # fmt: skip


EXPERT_PROJECTIONS = ("gate_up_proj", "up_proj", "down_proj")  # quant.experts.EXPERT_PROJECTIONS


def _expert_specs(module_name: str, module) -> list[ExpertSpec]:
    """The fused routed-expert projections of `module`, if it is an experts module (else []).

    A module transformers built with its experts decorator (`hf.compat.is_experts_module`) in the layout
    `quant.experts` quantizes (3-D `down_proj` and `gate_up_proj` or `up_proj`) is quantized; any other
    module holding `num_experts` and 3-D parameters of that many experts (Llama-4's) stays in float.
    """
    from llmslim.hf.compat import is_experts_module

    count = getattr(module, "num_experts", None)
    if not isinstance(count, int) or count < 1:
        return []
    weights = {n: p for n, p in module.named_parameters(recurse=False) if p.dim() == 3 and p.shape[0] == count}
    if not weights:
        return []
    decorated = is_experts_module(module)
    supported = decorated and "down_proj" in weights and bool({"gate_up_proj", "up_proj"} & set(weights))
    transposed = getattr(module, "is_transposed", None)  # (experts, in, out) instead of (experts, out, in)
    if transposed is None:
        transposed = _looks_transposed(weights)
    params = dict(module.named_parameters(recurse=False))
    specs = []
    for proj, weight in weights.items():
        _, a, b = weight.shape
        in_f, out_f = (a, b) if transposed else (b, a)
        quantized = supported and proj in EXPERT_PROJECTIONS
        specs.append(ExpertSpec(f"{module_name}.{proj}", count, in_f, out_f, f"{proj}_bias" in params, quantized))
    return specs


def _looks_transposed(weights: dict) -> bool:
    """An undecorated experts module does not say its layout: (experts, in, out) when the first projection's
    input (hidden) is the down projection's output, as in Llama-4's `gate_up_proj` (E, hidden, 2I), `down_proj` (E, I, hidden)."""
    first, down = weights.get("gate_up_proj", weights.get("up_proj")), weights.get("down_proj")
    if first is None or down is None:
        return False
    return first.shape[1] == down.shape[2] and first.shape[2] != down.shape[1]


def _experts_per_token(cfg, experts: int, notes: list[str]) -> int:
    """Routed experts each token uses, from the config (all of them, with a note, when it does not say)."""
    if not experts:
        return 0
    for key in ("num_experts_per_tok", "experts_per_token", "moe_topk"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return min(value, experts)
    notes.append("the config does not say how many experts a token uses: active parameters and bytes per token count all")
    return experts
