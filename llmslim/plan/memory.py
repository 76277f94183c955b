"""Memory besides the weights: KV cache, peak activations of a forward pass, and what training adds.

Formulas count the tensors alive at the worst moment of a transformers forward pass with SDPA
attention (no T x T score matrix is materialized):

- KV cache: per layer, per sequence and per cached token, keys and values of the KV heads:
  `layers * batch * tokens * 2 * kv_heads * head_dim * bytes`.
- Inference activations (no autograd): the residual stream and the widest moment of a block, the
  MLP (normed input, gate, up and activation for gated MLPs; fc1 output and activation otherwise;
  in a MoE layer one routed expert's at a time, over at most every token, beside the float32 sum of
  the experts' outputs and the router's logits) or attention (normed input, q, k, v, output), plus
  the logits of the last position.
- Prompt workspace: 4-bit layers dequantize their weight once for a prompt's dense GEMM.
- Training (QLoRA): LoRA factors on every quantized layer, their gradients and optimizer states,
  and the activations autograd keeps, under the cheapest checkpointing policy (none, per block,
  or ~sqrt(n) segments, after Chen et al. 2016).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from llmslim.plan.shapes import ModelShape
from llmslim.plan.weights import WeightBytes
from llmslim.quant.registry import FORMATS

FP32 = 4
OPTIMIZER_BYTES = {"adamw": 8, "adamw8bit": 2, "sgd": 0}  # per trainable parameter: two fp32 moments, two 8-bit ones, none


def cached_tokens(shape: ModelShape, context: int) -> int:
    """Tokens each layer's cache holds for a context: all of them, or the sliding window."""
    return min(context, shape.sliding_window) if shape.sliding_window else context


def kv_cache_bytes(shape: ModelShape, context: int, batch: int, dtype_bytes: int) -> int:
    """Bytes of keys and values for `batch` sequences of `context` tokens."""
    return shape.n_layers * batch * cached_tokens(shape, context) * shape.kv_width * dtype_bytes


def _gated(shape: ModelShape) -> bool:
    return shape.model_type in ("llama", "mistral", "qwen2", "mixtral")


def _experts_gated(shape: ModelShape) -> bool:
    """Routed experts with a fused gate and up projection (`gate_up_proj`)."""
    return any(e.name.endswith("gate_up_proj") for e in shape.expert_specs)


def _mlp_width(shape: ModelShape) -> int:
    """Widths alive at once inside the MLP: gate, up and act(gate) when gated; fc1 output and its activation otherwise.

    A MoE layer runs its routed experts one at a time (`quant.experts.experts_forward`), each over the tokens that
    chose it (at most all of them), beside the float32 sum of their outputs (two widths of hidden), an expert's
    output and the router's logits; a dense MLP (DeepSeek's first layers) may be wider.
    """
    dense = (3 if _gated(shape) else 2) * shape.intermediate
    if not shape.experts:
        return dense
    routed = (3 if _experts_gated(shape) else 2) * shape.expert_intermediate + 3 * shape.hidden + shape.experts
    return max(dense, routed)


def _attention_width(shape: ModelShape) -> int:
    """q, k, v and the attention output, per token."""
    return shape.n_heads * shape.head_dim * 2 + shape.kv_width


def activation_bytes(shape: ModelShape, tokens: int, batch: int, dtype_bytes: int) -> int:
    """Peak bytes of activations while a forward pass (no autograd) runs `batch` x `tokens` tokens."""
    # the embedding output (transformers keeps `inputs_embeds` alive for the whole forward), the
    # residual stream and the normed input of the current sub-layer
    residual = 3 * shape.hidden
    widest = residual + max(_mlp_width(shape), _attention_width(shape))
    logits = batch * shape.vocab * (dtype_bytes + FP32)  # last position only (generate), cast to float32 for sampling
    return batch * tokens * widest * dtype_bytes + logits


INT8_BF16_CHUNK_ELEMENTS = 1 << 24  # quant.kernels.INT8_BF16_CHUNK_ELEMENTS: weights turned into bf16 at a time
PACKED_GEMV_MAX_TOKENS = 64  # quant.kernels.PACKED_GEMV_MAX_TOKENS: NF4/FP4 in the CPU layout run the decode kernel up to here


def _cpu_layout(weights: str | None) -> bool:
    """NF4/FP4: bitsandbytes' blockwise absmax, repacked for CPU inference (`quant.registry`)."""
    return weights is not None and FORMATS[weights].blockwise_absmax


def cpu_layout_bytes(w: WeightBytes, weights: str | None, block_size: int) -> int:
    """The bfloat16 absmax copy NF4/FP4 layers keep while they run in bitsandbytes' CPU layout
    (CPU inference; `quant.kernels.pack_4bit_for_cpu`): 2 bytes per block of every quantized weight but the
    routed experts' (views of stacked storage, never repacked)."""
    return 2 * (w.codes - w.expert_codes) // block_size * 2 if _cpu_layout(weights) else 0  # two codes per byte


def decode_head_bytes(shape: ModelShape, config) -> int:
    """The int8 copy a float output head decodes through on a CPU (`SlimConfig.decode_head`, `quant.head`): one int8
    byte per weight and a float32 absmax per vocabulary row, built at the first decoded token. 0 when the head is
    quantized, computes through a factorized embedding, or `config` keeps it float."""
    if config is None or config.weights is None or config.decode_head != "int8" or config.embedding_rank is not None:
        return 0
    if shape.tied_embeddings:
        if config.int8_layers and "lm_head" in config.int8_layers:  # its own int8 copy, already counted
            return 0
        weights = shape.vocab * shape.hidden
    else:
        heads = [lin for lin in shape.outer_linears if lin.name == "lm_head" and not config.selects(lin.name)]
        if not heads:
            return 0
        weights = heads[0].in_features * heads[0].out_features
    return weights + FP32 * shape.vocab


def prompt_workspace_bytes(
    w: WeightBytes,
    dtype_bytes: int,
    weights: str | None,
    tokens: int,
    block_size: int = 64,
    cpu: bool = False,
    half_gemm: bool = True,
) -> int:
    """Temporaries of the largest quantized layer on a prompt of `tokens` rows (batch included).

    NF4/FP4 inference on a CPU (`cpu`): the layers run in bitsandbytes' CPU layout
    (`quant.kernels.pack_4bit_for_cpu`; its bf16 absmax copy is `cpu_layout_bytes`); a prompt of
    more than `PACKED_GEMV_MAX_TOKENS` rows dequantizes the layer for a dense GEMM.
    Other 4-bit: dequantize once, dense GEMM (a float weight in the compute dtype).
    On a CPU without hardware bf16 GEMMs (not `half_gemm`) a 16-bit prompt's dense product runs in
    float32 (`SlimLinear._gemm_dtype`) from `decode_max_tokens` rows on, NF4/FP4 included: a float32 weight and a
    float32 copy of the layer's input.
    int8 (LLM.int8 on CPU): an upper bound, as if the int8 weight were transposed for `torch._int_mm`
    and every column were an outlier dequantized in float32 at once (the kernel goes in chunks of
    weight rows, `quant.kernels.INT8_PROMPT_CHUNK_ELEMENTS`, so it needs less); per token, the
    input in float32 and int8 and the float32 output. int8 on a CPU with hardware bf16 GEMMs (`half_gemm`): the
    weight dequantized to bf16 (at most `INT8_BF16_CHUNK_ELEMENTS` at a time; a layer that needs several chunks also
    holds a chunk's product per token) (`quant.kernels.int8_prompt_matmul_bf16`; its bf16 output is the layer's
    activation).
    """
    if weights is None:
        return 0
    fmt = FORMATS[weights]
    float32_product = cpu and not half_gemm and dtype_bytes < FP32 and fmt.bits == 4  # past decode_max_tokens rows
    packed = cpu and fmt.blockwise_absmax and not float32_product  # bitsandbytes' CPU layout, up to its own row limit
    if tokens <= (PACKED_GEMV_MAX_TOKENS if packed else fmt.decode_max_tokens):
        return 0
    if fmt.bits == 8 and cpu and half_gemm and dtype_bytes == 2:  # a chunked product is copied into the output
        chunked = w.largest_linear > INT8_BF16_CHUNK_ELEMENTS
        return min(w.largest_linear, INT8_BF16_CHUNK_ELEMENTS) * 2 + (tokens * w.max_out * 2 if chunked else 0)
    if fmt.bits == 8:
        return w.largest_linear * (1 + FP32) + tokens * (w.max_in * (FP32 + 1) + w.max_out * FP32)
    if float32_product:
        return w.largest_linear * FP32 + tokens * w.max_in * FP32
    return w.largest_linear * (2 if packed else dtype_bytes)


@dataclass
class TrainingMemory:
    """Bytes training adds to the frozen (quantized) weights.

    Args:
        lora_params: trainable parameters (LoRA A and B of every quantized layer).
        lora_bytes / grad_bytes / optimizer_bytes: their float32 values, gradients and optimizer states.
        activation_bytes: activations kept for the backward pass under `policy`, logits and loss included.
        policy: the checkpointing policy with the smallest activation memory ("none", "all" or "sqrt").
        policies: activation bytes of each policy.
    """

    lora_params: int
    lora_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    policy: str
    policies: dict[str, int]

    @property
    def total(self) -> int:
        return self.lora_bytes + self.grad_bytes + self.optimizer_bytes + self.activation_bytes


def block_saved_bytes(shape: ModelShape, tokens: int, batch: int, dtype_bytes: int) -> int:
    """Activations autograd keeps for one block's backward pass (SDPA attention, LoRA inputs shared).

    Norm inputs and outputs (two norms, float32 upcast inside), q/k/v, attention output, the MLP's
    input, its intermediate tensors (gate, up, act(gate), their product when gated), per token; in a MoE layer
    those of each of the `experts_per_token` routed experts a token passes through.
    """
    mlp = (4 if _gated(shape) else 2) * shape.intermediate
    if shape.experts:
        routed = (4 if _experts_gated(shape) else 2) * shape.expert_intermediate * max(shape.experts_per_token, 1)
        mlp = max(mlp, routed)
    per_token = dtype_bytes * (4 * shape.hidden + _attention_width(shape) + mlp) + FP32 * 2 * shape.hidden
    return batch * tokens * per_token


def checkpointing_bytes(shape: ModelShape, tokens: int, batch: int, dtype_bytes: int) -> dict[str, int]:
    """Activation bytes per checkpointing policy: none keeps every block; all keeps n boundaries and
    recomputes one block; sqrt keeps ~sqrt(n) boundaries and recomputes one segment of n / sqrt(n) blocks."""
    n = shape.n_layers
    block = block_saved_bytes(shape, tokens, batch, dtype_bytes)
    boundary = batch * tokens * shape.hidden * dtype_bytes
    segments = _sqrt_segments(n)
    return {
        "none": n * block,
        "all": n * boundary + block,
        "sqrt": segments * boundary + math.ceil(n / segments) * block,
    }


def _sqrt_segments(n_blocks: int) -> int:
    try:  # the checkpointing module's own rule, so the plan matches what `enable_checkpointing` does
        from llmslim.memory.checkpointing import n_segments

        return n_segments("sqrt", n_blocks)
    except ImportError:  # pragma: no cover - memory/ is optional for the planner
        return max(1, round(math.sqrt(n_blocks)))


def training_memory(
    shape: ModelShape, lora_linears: list[tuple[int, int]], tokens: int, batch: int, dtype_bytes: int, rank: int, optimizer: str
) -> TrainingMemory:
    """What QLoRA training of `shape` adds, with rank-`rank` adapters on the (in, out) layers `lora_linears`."""
    if optimizer not in OPTIMIZER_BYTES:
        raise ValueError(f"optimizer must be one of {list(OPTIMIZER_BYTES)}, got {optimizer!r}")
    params = sum(rank * (fan_in + fan_out) for fan_in, fan_out in lora_linears)
    policies = checkpointing_bytes(shape, tokens, batch, dtype_bytes)
    policy = min(policies, key=policies.get)
    logits = batch * tokens * shape.vocab * (dtype_bytes + 2 * FP32)  # logits, float32 copy, log-softmax for the loss
    return TrainingMemory(
        lora_params=params,
        lora_bytes=params * FP32,
        grad_bytes=params * FP32,
        optimizer_bytes=params * OPTIMIZER_BYTES[optimizer],
        activation_bytes=policies[policy] + logits,
        policy=policy,
        policies=policies,
    )


PARALLEL_MODES = ("none", "ddp", "fsdp")


@dataclass
class ProcessMemory:
    """Bytes one training process holds when `processes` processes train together.

    `ddp`: every process holds the whole quantized base, its own LoRA state and activations, and DDP's
    gradient buckets (one more copy of the LoRA gradients). `fsdp` (torch FSDP2, as in
    examples/qlora_accelerate.py): parameters (quantized codes, float tensors, LoRA matrices), their gradients
    and optimizer states are split across the processes; the quantization scales and buffers stay whole on
    each; while a block runs its parameters are gathered (two blocks at a time with prefetch), and the
    parts outside the blocks (embeddings, head) stay gathered through the step.
    """

    parallel: str
    processes: int
    weights: int
    training: int
    gathered: int

    @property
    def total(self) -> int:
        return self.weights + self.training + self.gathered


def process_memory(weights: WeightBytes, training: TrainingMemory, parallel: str, processes: int) -> ProcessMemory:
    """Per-process bytes of QLoRA training under `parallel` ("ddp" or "fsdp") with `processes` processes."""
    if parallel not in PARALLEL_MODES[1:]:
        raise ValueError(f"parallel must be one of {list(PARALLEL_MODES[1:])}, got {parallel!r}")
    if isinstance(processes, bool) or not isinstance(processes, int) or processes < 1:
        raise ValueError(f"processes must be an integer >= 1, got {processes!r}")
    state = training.lora_bytes + training.grad_bytes + training.optimizer_bytes
    if parallel == "ddp":
        return ProcessMemory(parallel, processes, weights.total, training.total + training.grad_bytes, 0)
    sharded = -(-(weights.codes + weights.kept) // processes)
    gathered = weights.outer + 2 * max(weights.per_block, default=0)
    return ProcessMemory(
        parallel,
        processes,
        sharded + weights.scales + weights.buffers,
        -(-state // processes) + training.activation_bytes,
        gathered - gathered // processes,
    )
