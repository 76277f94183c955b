"""Lean decode steps: a Llama-family decoder layer decodes one token on CPU in a few operator calls.

At batch 1 a decoded token through SmolLM2 is ~30 layers x ~16 `nn.Module` calls (norms, attention,
four projections, MLP, activation), ~45 small operators and transformers' wrappers around them; on a
2-core CPU their cost was as large as the 4-bit kernels themselves (`benchmarks/bench_token_time.py`).
A layer made lean here keeps its modules, parameters, names and `state_dict`; only its class changes,
to a subclass whose `forward` runs the step in one Python frame when the call allows it:

    h = rms_norm(x); q, k, v = proj(h); rotary(q, k); k, v = cache.update(k, v)
    x = x + o_proj(sdpa(q, k, v)); h = rms_norm(x); x = x + down(silu(gate(h)) * up(h))

With bf16 rows and llmslim's operators built, the step runs on llmslim's fused operators
(`csrc/ops_cpu.cpp`): one per norm (the residual add fused into the second), rotary, the one-token attention
over the cache (`attend_one_rows`) and SiLU-times-up, and with
the AVX-512 BF16 decode kernels one call for the q/k/v projections and one for gate/up when they are 4-bit
weights: ~12 calls a layer instead of ~60 (on AVX2 `mm_4bit_i16_multi` likewise). A layer whose seven projections
are weights of one kind a decode kernel of this build takes (4-bit: `mm_4bit_i16` on AVX2, the CPU layout on AVX-512
BF16; LLM.int8: `gemv_int8_rows`) runs as two operators around the cache's update (`lean_qkv`, `lean_out`: the same
operators called from C++, the same bits), with their operands kept on the layer
(`_layer_plan`): SmolLM2, 2 threads on an EPYC, 20.1 -> 14.8 ms a token (median of 8 alternating runs). The
cache's update appends into room kept with each `DynamicLayer` (`kv_append`) instead of `torch.cat` of the whole
cache. A Llama base model (`LEAN_MODEL_CLASSES`) runs a decoded token through its lean layers' steps directly
(`_LeanDecodeModel`), without each layer's `nn.Module.__call__` and wrappers.
They reproduce torch's bf16 arithmetic except the RMS norm's sum of squares
(another summation order) and SiLU's exp, each at most one bf16 step off on under 1% of elements, and the
attention's sums (another order than SDPA's GEMMs: one bf16 step off on ~5% of its outputs);
SmolLM2's greedy tokens stay those of the standard forward (tests/hf/test_decode.py). Elsewhere the
step runs torch's own operators in the standard forward's order, bit-identical to it.

Every other call (a prompt, a batch, a mask, training, gradients, a GPU, another attention
implementation, hooks on a bypassed module) runs the class's own forward. Only the classes whose
forward the step restates are made lean (`LEAN_LAYER_CLASSES`, `LEAN_MODEL_CLASSES`): a look-alike with other semantics
(Granite's residual multiplier, Gemma's norm offset, Qwen3's q/k norms) keeps its own.
`use_standard_layers` undoes it (the documented opt-out).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module_globals

from llmslim.hf import compat
from llmslim.hf.attention import SDPA_NAMES
from llmslim.hf.compat import DynamicLayer
from llmslim.quant import kernels
from llmslim.quant.modules import SlimLinear4bit, SlimLinear8bit

# decoder layers whose forward the lean step restates (transformers 5.x): norm -> attention -> residual -> norm -> MLP
LEAN_LAYER_CLASSES = frozenset({"LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer"})
# base models whose forward the lean token loop restates (embedding, rotary embedding, causal mask, layers, norm)
LEAN_MODEL_CLASSES = frozenset({"LlamaModel"})
_MODEL_PARTS = ("embed_tokens", "rotary_emb", "layers", "norm", "config")
_NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm"})
_SILU = frozenset({"SiLUActivation", "SiLU"})
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")
# the weight kinds `lean_qkv` / `lean_out` take (csrc/ops_cpu.cpp): 4-bit through mm_4bit_i16 (AVX2), 4-bit in the
# CPU layout through gemv_4bit_cpu_layout (AVX-512 BF16), int8 rows through gemv_int8_rows (both)
LEAN_4BIT_I16, LEAN_4BIT_TILES, LEAN_INT8 = 0, 1, 2
_LAYER_KWARGS = frozenset({"position_ids", "use_cache", "cache_position"})  # what a decode step may pass that the step ignores
_lean_classes: dict[type, type] = {}


class _LeanDecodeLayer:
    """Mixed into a decoder layer's class ahead of it: `forward` takes the lean step when the call allows it."""

    def forward(
        self, hidden_states, attention_mask=None, position_ids=None, cache=None, use_cache=False, position_embeddings=None, **kwargs
    ):
        x = hidden_states
        if (  # cheapest checks first: this runs ~30 times per token, where each microsecond is 30 per token
            attention_mask is None
            and cache is not None
            and position_embeddings is not None
            and x.dim() == 3
            and x.shape[0] == 1
            and x.shape[1] == 1
            and not torch.is_grad_enabled()
            and not self.training
            and x.is_cpu
            and _LAYER_KWARGS.issuperset(kwargs)
        ):
            parts = _step_parts(self)
            if parts is not None:
                return _lean_step(self, *parts, x, cache, position_embeddings)
        return super().forward(
            hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )


class _LeanDecodeModel:
    """Mixed into a Llama base model's class ahead of it: `forward` runs one decoded token through the layers' lean
    steps directly, without each layer's `nn.Module.__call__` and forward wrappers (~40 us a layer, 30 layers a
    SmolLM2 token), when the call is one the standard forward would give each layer as a lean step: one token of one
    sequence after a prompt, positions given, no mask (`create_causal_mask` none), the cache used, no gradients, no
    outputs to capture and no keyword it does not know. Embedding, rotary embedding and final norm are called as
    modules (their hooks run); a layer that is not lean, or hooked itself, is called as the standard forward calls it."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None, use_cache=None, **kwargs):
        if (
            not kwargs
            and attention_mask is None
            and inputs_embeds is None
            and input_ids is not None
            and position_ids is not None
            and cache is not None
            and use_cache
            and input_ids.shape == (1, 1)
            and position_ids.shape == (1, 1)
            and input_ids.is_cpu
            and not torch.is_grad_enabled()
            and not self.training
            and _plain_outputs(self.config)
        ):
            inputs_embeds, input_ids = self._modules["embed_tokens"](input_ids), None  # the standard forward's first step
            mask = compat.create_causal_mask(
                config=self.config, inputs_embeds=inputs_embeds, attention_mask=None, cache=cache, position_ids=position_ids
            )
            if mask is None:
                return self._lean_forward(inputs_embeds, position_ids, cache)
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )

    def _lean_forward(self, x: torch.Tensor, position_ids: torch.Tensor, cache):
        modules = self._modules
        position_embeddings = modules["rotary_emb"](x, position_ids=position_ids)
        for layer in modules["layers"][: self.config.num_hidden_layers]:
            parts = None
            if isinstance(layer, _LeanDecodeLayer) and not (layer.training or _hooked((layer,))):
                parts = _step_parts(layer)
            if parts is not None:
                x = _lean_step(layer, *parts, x, cache, position_embeddings)
            else:
                x = layer(
                    x, attention_mask=None, position_embeddings=position_embeddings, position_ids=position_ids, cache=cache, use_cache=True
                )
        return compat.BaseModelOutputWithPast(last_hidden_state=modules["norm"](x), cache=cache)


def _plain_outputs(config) -> bool:
    """Whether the config asks for no captured outputs (hidden states, attentions) and returns a dict."""
    return not (getattr(config, "output_hidden_states", False) or getattr(config, "output_attentions", False)) and getattr(
        config, "return_dict", True
    )


def _step_parts(layer) -> tuple | None:
    """(attention, MLP, norms) of a lean layer whose step may run (SDPA attention, nothing hooked it bypasses), else None."""
    modules = layer._modules  # not through nn.Module.__getattr__
    attn, mlp = modules["self_attn"], modules["mlp"]
    norms = modules["input_layernorm"], modules["post_attention_layernorm"]
    if compat.attn_implementation(attn.config) in SDPA_NAMES and not _hooked((*norms, attn, mlp, mlp._modules["act_fn"])):
        return attn, mlp, norms
    return None


def _hooked(modules) -> bool:
    """Whether something watches or replaces a module the lean step does not call (hooks, an instance `forward`)."""
    if _module_globals._global_forward_hooks or _module_globals._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__ for m in modules)


def _project(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`module(x)` for rows `x`: a 4-bit layer's decode operator, else the module's forward (its `__call__` if hooked or
    given an instance `forward`, as accelerate's hooks do)."""
    if module._forward_hooks or module._forward_pre_hooks or "forward" in module.__dict__:
        return module(x)
    if type(module) is SlimLinear4bit:
        out = module.decode_rows(x)
        if out is not None:
            return out
    return module.forward(x)


def _rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """LlamaRMSNorm.forward, the same operations."""
    xf = x.to(torch.float32)
    variance = xf.pow(2).mean(-1, keepdim=True)
    return norm._parameters["weight"] * (xf * torch.rsqrt(variance + norm.variance_epsilon)).to(x.dtype)


def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rotary_pos_emb for one tensor: x * cos + rotate_half(x) * sin."""
    half = x.shape[-1] // 2
    return (x * cos) + (torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin)


def _lean_step(layer, attn, mlp, norms, x: torch.Tensor, cache, position_embeddings) -> torch.Tensor:
    """The layer's forward for one token (see the module docstring), the same operations in the same order.

    Submodules are read from `_modules`, not through `nn.Module.__getattr__` (~0.5 us each, 11 per layer)."""
    d = attn.head_dim
    a, f = attn._modules, mlp._modules
    x = x.view(1, -1)  # (1, hidden): rows, which the projections take without reshaping
    cos, sin = position_embeddings
    ops = _fused_ops(x, norms, cos, sin)
    plan = _layer_plan(layer, a, f, x) if ops else None
    if plan:  # the whole step in two operators (around the cache's update)
        q, k, v = ops.lean_qkv(x, norms[0]._parameters["weight"], norms[0].variance_epsilon, *plan[2], cos, sin, d)
    else:
        h = ops.rms_norm_rows(x, norms[0]._parameters["weight"], norms[0].variance_epsilon) if ops else _rms_norm(norms[0], x)
        q, k, v = _projections(ops, (a["q_proj"], a["k_proj"], a["v_proj"]), h)
        q, k, v = q.view(1, -1, 1, d), k.view(1, -1, 1, d), v.view(1, -1, 1, d)  # (1, heads, 1, d): one token, no transpose
        if ops:
            q, k = ops.rotary_rows(q, cos, sin), ops.rotary_rows(k, cos, sin)
        else:
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (1, 1, 1, d)
            q, k = _rotary(q, cos, sin), _rotary(k, cos, sin)
    k, v = _cache_update(cache, k, v, attn.layer_idx) if ops else cache.update(k, v, attn.layer_idx)  # (1, kv_heads, seen, d)
    attend = ops and k.dtype is torch.bfloat16 and v.dtype is torch.bfloat16 and k.stride(-1) == 1 and v.stride(-1) == 1
    if plan and attend:
        x = ops.lean_out(x, q, k, v, attn.scaling, *plan[3], norms[1]._parameters["weight"], norms[1].variance_epsilon)
        return x.view(1, 1, -1)
    if attend:
        o = ops.attend_one_rows(q, k, v, attn.scaling)  # SDPA's arithmetic in one call (SDPA: ~70 us a SmolLM2 layer on an EPYC)
    else:
        o = _attention(attn, q, k, v)
    o = _project(a["o_proj"], o)
    if ops:
        x, h = ops.add_rms_norm_rows(x, o, norms[1]._parameters["weight"], norms[1].variance_epsilon)
    else:
        x = x + o
        h = _rms_norm(norms[1], x)
    gate, up = _projections(ops, (f["gate_proj"], f["up_proj"]), h)
    x = x + _project(f["down_proj"], ops.silu_mul_rows(gate, up) if ops else F.silu(gate) * up)
    return x.view(1, 1, -1)


def _cache_update(cache, k: torch.Tensor, v: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`cache.update(k, v, index)` for one token: on a `DynamicLayer` the same keys and values, written into spare
    room kept with the layer (`kv_append`) instead of `torch.cat` of the whole cache (2 copies of every cached
    position per layer and token, ~20-35 us a SmolLM2 layer). The layer's `keys` / `values` are then views of the
    room; the room is replaced (the cache copied into a larger one) when full or when anything else has replaced them
    (a crop, a reorder, another update), so a view handed out earlier never sees a later write. Up to 1/4 more
    memory than the cache holds, at least 128 positions."""
    layers = getattr(cache, "layers", None)
    layer = layers[index] if layers is not None and index < len(layers) else None
    if type(layer) is not DynamicLayer or not layer.is_initialized or getattr(cache, "offloading", False):
        return cache.update(k, v, index)
    keys, values = layer.keys, layer.values
    room = layer.__dict__.get("_llmslim_room")
    seen = keys.shape[-2]
    if room is None or room[2] is not keys or room[3] is not values or room[0].shape[-2] <= seen:
        alike = keys.dim() == 4 and keys.shape[:2] == k.shape[:2] and keys.shape[-1] == k.shape[-1] and values.shape == keys.shape
        if not alike or keys.dtype != k.dtype or values.dtype != v.dtype:
            return cache.update(k, v, index)
        capacity = seen + max(128, seen // 4)
        key_room = keys.new_empty((*keys.shape[:2], capacity, keys.shape[-1]))
        value_room = values.new_empty((*values.shape[:2], capacity, values.shape[-1]))
        key_room[:, :, :seen] = keys
        value_room[:, :, :seen] = values
        room = (key_room, value_room)
    keys, values = torch.ops.llmslim.kv_append(room[0], room[1], k, v, seen)
    layer.keys, layer.values = keys, values
    layer.__dict__["_llmslim_room"] = (room[0], room[1], keys, values)
    return keys, values


def _layer_plan(layer, a, f, x: torch.Tensor) -> tuple | None:
    """What `lean_qkv` and `lean_out` take for this layer's seven projections, or None: each a weight of one kind that
    this build's decode kernel takes for rows like `x`, unhooked (`_plan_4bit`, `_plan_int8`). Kept on the layer while
    each projection is the same module, unhooked, in eval mode, with the same weight, absmax and bias tensors (what the
    kernels' operands are kept by; checked here directly: ~5 us a layer instead of ~13)."""
    modules = (a["q_proj"], a["k_proj"], a["v_proj"], a["o_proj"], f["gate_proj"], f["up_proj"], f["down_proj"])
    plan = layer.__dict__.get("_lean_plan")
    if plan is not None:
        absmax_name = plan[1]
        for m, (kept, weight, absmax, bias) in zip(modules, plan[0], strict=True):
            if (
                m is not kept
                or m._forward_hooks
                or m._forward_pre_hooks
                or m.training
                or m._parameters["weight"] is not weight
                or m._buffers.get(absmax_name) is not absmax
                or m._parameters.get("bias") is not bias
            ):
                break
        else:
            return plan
    if not kernels.lean_layer_ops() or any(_bypassed(m) for m in modules):
        return None
    if all(type(m) is SlimLinear4bit for m in modules):
        found = _plan_4bit(modules, x)
    elif all(type(m) is SlimLinear8bit for m in modules):
        found = _plan_int8(modules, x)
    else:
        return None
    if found is None:
        return None
    kind, absmax_name, weights, scales, table, block = found
    biases, ns = [m._parameters.get("bias") for m in modules], [m.out_features for m in modules]
    key = tuple((m, m._parameters["weight"], m._buffers[absmax_name], m._parameters.get("bias")) for m in modules)
    qkv = (kind, weights[:3], scales[:3], table, biases[:3], ns[:3], block)
    out = (kind, weights[3:], scales[3:], table, biases[3:], ns[3:], block)
    plan = layer.__dict__["_lean_plan"] = (key, absmax_name, qkv, out)
    return plan


def _bypassed(m: nn.Module) -> bool:
    """Whether a projection does more in its call than its kernel (hooks, an instance `forward` such as accelerate's,
    streamed or offloaded weights) or trains: a layer plan would skip that."""
    return m.training or _hooked((m,)) or hasattr(m, "_hf_hook") or bool(getattr(m, "streamed", False))


def _plan_4bit(modules, x: torch.Tensor) -> tuple | None:
    """(kind, absmax buffer, weights, scales, table, block) of 4-bit projections all with one table and block: on
    AVX2 `mm_4bit_i16`'s operands (a float32 absmax each: double quantization kept decoded), on AVX-512 BF16 the CPU
    layout `gemv_4bit_cpu_layout` takes; else None."""
    block = modules[0].block_size
    if any(m.block_size != block for m in modules):
        return None
    operands = [m.i16_operands(x) for m in modules]
    if all(o is not None and o[3] is None and o[1] is operands[0][1] for o in operands):
        return LEAN_4BIT_I16, "weight_absmax", [o[0] for o in operands], [o[2] for o in operands], operands[0][1], block
    operands = [m.decode_operands(x) for m in modules]
    if all(o is not None and o[2] is operands[0][2] for o in operands):
        return LEAN_4BIT_TILES, "weight_absmax_cpu", [o[0] for o in operands], [o[1] for o in operands], operands[0][2], block
    return None


def _plan_int8(modules, x: torch.Tensor) -> tuple | None:
    """(kind, absmax buffer, weights, scales, table, block) of LLM.int8 projections whose decode rows take
    `gemv_int8_rows` (what `kernels.linear_int8` picks for a bf16 token on CPU), else None."""
    for m in modules:
        weight, absmax = m._parameters["weight"], m._buffers["SCB"]
        if (
            m.compute_dtype is not x.dtype
            or weight.device.type != "cpu"
            or kernels.INT8_DECODE_MAX_TOKENS < 1
            or not kernels.int8_decode_usable(x, weight, absmax)
        ):
            return None
    weights = [m._parameters["weight"] for m in modules]
    return LEAN_INT8, "SCB", weights, [m._buffers["SCB"] for m in modules], None, 0


def _fused_ops(x: torch.Tensor, norms, cos: torch.Tensor, sin: torch.Tensor):
    """`torch.ops.llmslim` when its fused decode operators take this step (bf16 rows and norms, llmslim's operators
    built), else None: the step then runs torch's operators."""
    if not (
        x.dtype is torch.bfloat16
        and cos.dtype is torch.bfloat16
        and cos.is_contiguous()
        and sin.is_contiguous()
        and x.is_contiguous()
        and all(n._parameters["weight"].dtype is torch.bfloat16 for n in norms)
        and kernels.fused_decode_ops()
    ):
        return None
    return torch.ops.llmslim


def _projections(ops, modules: tuple, h: torch.Tensor) -> list[torch.Tensor]:
    """Each module applied to rows `h`; 4-bit weights that llmslim decodes alike (same table and block) in one call."""
    operands = [_operands(m, h) for m in modules] if ops else [None]
    if operands[0] is None or any(o is None or o[2] is not operands[0][2] or o[3] != operands[0][3] for o in operands):
        outs = _projections_i16(ops, modules, h)
        if outs is None:
            return [_project(m, h) for m in modules]
    else:
        packed, absmax, code, block = zip(*operands, strict=True)
        outs = ops.gemv_4bit_multi(h, list(packed), list(absmax), code[0], [m.out_features for m in modules], block[0])
    biases = [m._parameters.get("bias") for m in modules]
    return [out if bias is None else out + bias.to(out.dtype) for out, bias in zip(outs, biases, strict=True)]


def _projections_i16(ops, modules: tuple, h: torch.Tensor) -> list[torch.Tensor] | None:
    """The modules' products (no bias) in one `mm_4bit_i16_multi` call (AVX2) when each is a 4-bit weight that
    `mm_4bit_i16` takes, all with one table and block and alike in double quantization; else None."""
    if not ops:
        return None
    operands = []
    for m in modules:
        if type(m) is not SlimLinear4bit or m._forward_hooks or m._forward_pre_hooks:
            return None
        o = m.i16_operands(h)
        if o is None:
            return None
        if operands and (o[1] is not operands[0][1] or (o[3] is None) != (operands[0][3] is None)):
            return None
        operands.append(o)
    block = modules[0].block_size
    if any(m.block_size != block for m in modules):
        return None
    codes, tables, absmax, nested_absmax, nested_map, nested_offset = zip(*operands, strict=True)
    nested = nested_absmax[0] is not None
    return ops.mm_4bit_i16_multi(
        h,
        list(codes),
        tables[0],
        list(absmax),
        list(nested_absmax) if nested else [],
        nested_map[0],
        list(nested_offset) if nested else [],
        [m.out_features for m in modules],
        block,
    )


def _operands(module: nn.Module, h: torch.Tensor):
    if type(module) is not SlimLinear4bit or module._forward_hooks or module._forward_pre_hooks:
        return None
    return module.decode_operands(h)


def _attention(attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """transformers' sdpa_attention_forward for one query token and no mask: its GQA choice, its operator."""
    groups = attn.num_key_value_groups
    if groups > 1 and compat.use_gqa_in_sdpa(None, k, v):
        o = F.scaled_dot_product_attention(q, k, v, scale=attn.scaling, enable_gqa=True)
    elif groups > 1:  # one query token: its heads packed per key/value head
        o = F.scaled_dot_product_attention(q.reshape(1, k.shape[1], groups, q.shape[-1]), k, v, scale=attn.scaling)
    else:
        o = F.scaled_dot_product_attention(q, k, v, scale=attn.scaling)
    return o.reshape(1, -1)


def use_lean_layers(model: nn.Module) -> int:
    """Give each decoder layer of a class in `LEAN_LAYER_CLASSES` (with the modules its step reads) the lean decode
    step, and a base model of a class in `LEAN_MODEL_CLASSES` the lean token loop; the number of layers that have the
    step. Parameters, names and `state_dict` are unchanged."""
    count = 0
    for module in model.modules():
        if isinstance(module, _LeanDecodeLayer):
            count += 1
        elif type(module).__name__ in LEAN_LAYER_CLASSES and _has_lean_structure(module):
            module.__class__ = _lean_class(type(module), _LeanDecodeLayer)
            count += 1
        elif type(module).__name__ in LEAN_MODEL_CLASSES and all(hasattr(module, name) for name in _MODEL_PARTS):
            compat.swap_model_class(module, _lean_class(type(module), _LeanDecodeModel))
    return count


def use_standard_layers(model: nn.Module) -> None:
    """Undo `use_lean_layers`: every decoder layer and base model runs its class's own forward again."""
    for module in model.modules():
        if isinstance(module, _LeanDecodeLayer):
            module.__class__ = type(module).__mro__[2]
        elif isinstance(module, _LeanDecodeModel):
            compat.swap_model_class(module, type(module).__mro__[2])


def _lean_class(cls: type, mixin: type) -> type:
    lean = _lean_classes.get(cls)
    if lean is None:
        lean = _lean_classes[cls] = type(f"Lean{cls.__name__}", (mixin, cls), {"__module__": __name__})
    return lean


def _has_lean_structure(layer: nn.Module) -> bool:
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    norms = (getattr(layer, "input_layernorm", None), getattr(layer, "post_attention_layernorm", None))
    return (
        attn is not None
        and mlp is not None
        and all(type(n).__name__ in _NORMS and hasattr(n, "variance_epsilon") for n in norms)
        and all(hasattr(attn, name) for name in (*_PROJECTIONS, "head_dim", "scaling", "num_key_value_groups", "layer_idx"))
        and all(hasattr(mlp, name) for name in _MLP)
        and type(getattr(mlp, "act_fn", None)).__name__ in _SILU
    )
