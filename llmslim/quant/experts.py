"""Quantized mixture-of-experts weights: the fused 3-D expert parameters of transformers v5.

transformers stores the experts of a layer as 3-D parameters of an `...Experts` module built with
its `use_experts_implementation` decorator: `gate_up_proj` (experts, 2 * intermediate, hidden) (or
`up_proj`) and `down_proj` (experts, hidden, intermediate), transposed for some models (gpt-oss).
`replace_experts` swaps each such parameter for a `SlimExpertWeights`: every expert's 2-D slice
quantized exactly as the dense format quantizes a linear layer (NF4 codes and absmax of a slice equal
bitsandbytes' `quantize_4bit` of that slice), the slices stacked along a leading expert dimension.
The experts module keeps its own class, router, biases and gate; its forward goes through
transformers' experts interface to `experts_forward`, which reads only the routed experts' bytes.

Experts modules are found by structure (a module the decorator marked, holding 3-D expert
parameters), never by per-architecture name lists; a layout this module does not know is left in
float and logged once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import torch
from torch import nn

from llmslim.config import SlimConfig
from llmslim.hf import compat
from llmslim.quant import kernels
from llmslim.quant.modules import SlimLinear
from llmslim.quant.registry import LayerSpec

logger = logging.getLogger(__name__)

EXPERT_PROJECTIONS = ("gate_up_proj", "up_proj", "down_proj")


class SlimExpertWeights:
    """One projection (`gate_up_proj`, `up_proj` or `down_proj`) of every expert of a layer, quantized.

    The tensors are those of the format's dense layer (`LayerSpec.module_class()`) with a leading
    expert dimension, registered on the experts module itself so that its state dict keeps the name
    transformers gives the fused parameter: the codes under `gate_up_proj`, the scales beside it
    (`gate_up_proj_absmax`, `gate_up_proj_SCB`, `gate_up_proj_scale`, ...). This object only
    describes them and reads them from the module at each use.

    Args:
        module: the experts module.
        proj: the projection's name.
        in_features / out_features: the shape of one expert's `x @ W.T`.
        spec: format and its options.
        dtype: the float dtype of the weight it replaces (the compute dtype unless the spec sets one).
        transposed: the float weight is stored `(experts, in, out)` (gpt-oss) instead of `(experts, out, in)`.
    """

    def __init__(
        self, module: nn.Module, proj: str, in_features: int, out_features: int, spec: LayerSpec, dtype: torch.dtype, transposed: bool
    ):
        self.module, self.proj = module, proj
        self.num_experts = module.num_experts
        self.in_features, self.out_features = in_features, out_features
        self.fmt = spec.fmt
        self.transposed = transposed
        self.template = spec.module_class()(in_features, out_features, False, spec, dtype, device="meta")
        self.template.source_transposed = transposed
        self.template.streamed = True  # views of stacked storage: never repacked in place (see SlimLinear4bit._want_cpu_layout)
        self.names = {name: stored_name(proj, name) for name in self.template.state_dict()}  # layer tensor -> module tensor
        self._views: dict[int, SlimLinear] = {}
        # While calibrating (`llmslim.calibrate`): each expert's float weight until it is quantized, in the layout
        # `set_expert_float` takes (None: quantize on arrival), and a callback given each float expert's inputs.
        self.floats: dict[int, torch.Tensor] | None = None
        self.observer: Callable[[int, torch.Tensor], None] | None = None

    def register(self, device) -> None:
        """Put empty stacked tensors for every expert on the module, in place of its float parameter."""
        del self.module._parameters[self.proj]
        for name, tensor in self.template.state_dict(keep_vars=True).items():
            stacked = torch.empty((self.num_experts, *tensor.shape), dtype=tensor.dtype, device=device)
            if isinstance(tensor, nn.Parameter):
                self.module.register_parameter(self.names[name], nn.Parameter(stacked, requires_grad=False))
            else:
                self.module.register_buffer(self.names[name], stacked)

    def tensors(self) -> dict[str, torch.Tensor]:
        """{layer tensor name: stacked tensor} as the module holds them now."""
        return {name: getattr(self.module, stored) for name, stored in self.names.items()}

    def expert(self, index: int) -> SlimLinear:
        """Expert `index` as a dense quantized layer whose tensors are views of the module's (no copy)."""
        stacked = self.tensors()
        key = tuple(t.data_ptr() for t in stacked.values())
        layer = self._views.get(index)
        if layer is None or layer.__dict__.get("_view_key") != key:
            layer = _view_layer(self.template, {name: t[index] for name, t in stacked.items()})
            layer.__dict__["_view_key"] = key
            self._views[index] = layer
        return layer

    @torch.no_grad()
    def set_float_weight(self, weight: torch.Tensor, name: str = "") -> None:
        """Quantize a float 3-D weight (in the layout of the parameter this replaced) into the module's tensors (or,
        while calibrating, keep each expert's slice in `floats`)."""
        if self.floats is not None:
            self._check_shape(weight, name)
            self.floats.update(enumerate(weight.unbind(0)))
            return
        for key, value in self.quantize(weight, name).items():
            self._assign(self.names[key], value)

    @torch.no_grad()
    def set_expert_float(self, index: int, weight: torch.Tensor, name: str = "") -> None:
        """Quantize one expert's float 2-D weight (`(out, in)`, or `(in, out)` when transposed) into slot `index` (or,
        while calibrating, keep it in `floats`)."""
        if self.floats is not None:
            self.floats[index] = weight
            return
        self.set_expert_tensors(index, self.expert_tensors(index, weight, name))

    @torch.no_grad()
    def expert_tensors(self, index: int, weight: torch.Tensor, name: str = "") -> dict[str, torch.Tensor]:
        """One expert's float 2-D weight quantized by round-to-nearest: {layer tensor name: tensor}."""
        self.template.module_name = f"{name or self.proj}[expert {index}]"
        return self.template.quantize(weight)

    @torch.no_grad()
    def set_expert_tensors(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        """Write one expert's quantized tensors ({layer tensor name: tensor}, as the dense layer of this format holds
        them) into slot `index`, allocating the stacked tensors on their device first if they are still empty (meta)."""
        if not set(tensors) <= set(self.names):
            raise ValueError(f"{self.proj}[expert {index}]: expected the tensors {sorted(self.names)}, got {sorted(tensors)}")
        for key, value in tensors.items():
            stacked = getattr(self.module, self.names[key])
            if stacked.is_meta:
                stacked = torch.empty(stacked.shape, dtype=stacked.dtype, device=value.device)
                self._assign(self.names[key], stacked)
            stacked[index] = value

    @torch.no_grad()
    def quantize_floats(self, name: str = "") -> None:
        """Quantize by round-to-nearest every expert still held in `floats`, then stop holding them."""
        floats, self.floats = self.floats or {}, None
        for index in sorted(floats):
            self.set_expert_tensors(index, self.expert_tensors(index, floats.pop(index), name))

    def _assign(self, stored: str, value: torch.Tensor) -> None:
        if stored in self.module._parameters:
            self.module._parameters[stored] = nn.Parameter(value, requires_grad=False)
        else:
            self.module._buffers[stored] = value

    @torch.no_grad()
    def quantize(self, weight: torch.Tensor, name: str = "") -> dict[str, torch.Tensor]:
        """{layer tensor name: stacked tensor} of a float 3-D weight, each expert quantized as the dense format does."""
        self._check_shape(weight, name)
        per_expert = [self.expert_tensors(index, weight[index], name) for index in range(self.num_experts)]
        return {key: torch.stack([tensors[key] for tensors in per_expert]) for key in per_expert[0]}

    def _check_shape(self, weight: torch.Tensor, name: str) -> None:
        expected = (
            self.num_experts,
            *((self.in_features, self.out_features) if self.transposed else (self.out_features, self.in_features)),
        )
        if tuple(weight.shape) != expected:
            raise ValueError(f"{name or self.proj}: a weight of shape {tuple(weight.shape)} does not fit experts of shape {expected}")

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """All experts in float, `(experts, out, in)` (tests and merges; the forward never builds it)."""
        return torch.stack([self.expert(i).dequantized_weight(dtype) for i in range(self.num_experts)])

    def quantized_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def own_memory(self) -> None:
        """Give every stacked tensor aligned storage of its own (see `kernels.aligned`): each load path then picks
        the same kernels for the same expert, for bit-identical logits."""
        for stored in self.names.values():
            tensor = getattr(self.module, stored)
            copy = kernels.aligned(tensor.data)
            if copy is not tensor.data:
                tensor.data = copy


def stored_name(proj: str, layer_tensor: str) -> str:
    """The module's name for a dense layer's tensor: `weight` -> `gate_up_proj`, `weight_absmax` -> `gate_up_proj_absmax`,
    `SCB` -> `gate_up_proj_SCB`."""
    return proj + layer_tensor.removeprefix("weight") if layer_tensor.startswith("weight") else f"{proj}_{layer_tensor}"


def expert_stores(module: nn.Module) -> dict[str, SlimExpertWeights]:
    """The quantized projections of an experts module, by projection name (empty for float experts)."""
    return module.__dict__.get("_slim_experts", {})


def _view_layer(template: SlimLinear, tensors: dict[str, torch.Tensor]) -> SlimLinear:
    layer = type(template).__new__(type(template))
    layer.__dict__.update(template.__dict__)
    layer._parameters = {n: nn.Parameter(t, requires_grad=False) for n, t in tensors.items() if n in template._parameters}
    layer._buffers = {n: t for n, t in tensors.items() if n in template._buffers}
    layer._modules = {}
    return layer


def experts_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' experts contract on quantized (or float) expert weights, reading only the routed experts.

    Tokens are grouped by expert: one matmul per expert that at least one token chose, on that
    expert's slice only (decode: one GEMV per selected expert).

    Args:
        self: the experts module (`use_experts_implementation` set `has_gate`, `has_bias`, `is_transposed`).
        hidden_states: `(tokens, hidden)`.
        top_k_index: `(tokens, k)` expert ids (ids >= num_experts are expert-parallel sentinels, skipped).
        top_k_weights: `(tokens, k)` routing weights.
    """
    out = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)  # (tokens, hidden)
    first = "gate_up_proj" if self.has_gate else "up_proj"
    first_bias = getattr(self, "gate_up_proj_bias" if self.has_gate else "up_proj_bias", None) if self.has_bias else None
    down_bias = getattr(self, "down_proj_bias", None) if self.has_bias else None
    for expert in torch.unique(top_k_index).tolist():
        if expert >= self.num_experts:
            continue
        token_idx, slot = torch.where(top_k_index == expert)  # (n,), (n,)
        h = _project(self, first, expert, hidden_states[token_idx], first_bias, self.is_transposed)  # (n, 2 * inter) or (n, inter)
        h = self._apply_gate(h) if self.has_gate else self.act_fn(h)  # (n, inter)
        h = _project(self, "down_proj", expert, h, down_bias, self.is_transposed)  # (n, hidden)
        if getattr(self, "has_post_expert_norm", False):
            h = self.post_expert_norm(h)
        out.index_add_(0, token_idx, (h * top_k_weights[token_idx, slot, None]).float())
    return out.to(hidden_states.dtype)


def _project(module: nn.Module, proj: str, expert: int, x: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> torch.Tensor:
    store = expert_stores(module).get(proj)
    floats = store.floats if store is not None else None
    if store is not None and (floats is None or expert not in floats):
        layer = store.expert(expert)
        home = layer.weight.device  # offloaded experts run where their weights are (CPU RAM or a mapped file)
        y = layer(x) if home == x.device else layer(x.to(home)).to(x.device)
    else:  # a float 3-D parameter, or an expert held in float while it is calibrated
        w = floats[expert] if floats is not None else getattr(module, proj)[expert]
        if store is not None and store.observer is not None:
            store.observer(expert, x)
        y = x @ w.to(x.dtype) if transposed else torch.nn.functional.linear(x, w.to(x.dtype))
    return y if bias is None else y + bias[expert].to(y.dtype)


def experts_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of every experts module built with transformers' experts decorator."""
    for name, module in model.named_modules():
        if compat.is_experts_module(module):
            yield name, module


def expert_parameters(module: nn.Module) -> list[str]:
    """The projections of an experts module that hold per-expert weights, `(experts, a, b)` each."""
    return [p for p in EXPERT_PROJECTIONS if p in module._parameters or p in expert_stores(module)]


def replace_experts(model: nn.Module, config: SlimConfig) -> list[str]:
    """Swap the expert weights `config` selects for empty quantized ones, in place (usually on a meta skeleton).

    A projection is selected by its full name (`model.layers.0.mlp.experts.gate_up_proj`) through
    include / exclude, like a linear layer. Returns the names replaced.
    """
    if config.weights is None:
        return []
    replaced = []
    for module_name, module in experts_modules(model):
        reason = _unsupported(module)
        if reason:
            logger.warning("not quantizing the experts of %s: %s; they stay in float", module_name, reason)
            continue
        for proj in expert_parameters(module):
            name = f"{module_name}.{proj}"
            weight = module._parameters.get(proj)
            if proj in expert_stores(module) or not config.selects(name):
                continue
            _, a, b = weight.shape
            in_features, out_features = (a, b) if module.is_transposed else (b, a)
            store = SlimExpertWeights(module, proj, in_features, out_features, config.layer_spec(name), weight.dtype, module.is_transposed)
            store.register(weight.device)
            module.__dict__.setdefault("_slim_experts", {})[proj] = store
            replaced.append(name)
    if replaced:
        compat.use_llmslim_experts(model, experts_forward)
        compat.save_with_model_names(model)
    return replaced


def _unsupported(module: nn.Module) -> str | None:
    projections = expert_parameters(module)
    if "down_proj" not in projections or not ({"gate_up_proj", "up_proj"} & set(projections)):
        return f"expected 3-D gate_up_proj (or up_proj) and down_proj parameters, found {sorted(module._parameters)}"
    for proj in projections:
        weight = module._parameters.get(proj)
        if weight is not None and weight.dim() != 3:
            return f"{proj} has shape {tuple(weight.shape)}, not (experts, out, in)"
    if not hasattr(module, "num_experts"):
        return "it has no num_experts"
    return None


def quantize_experts_(model: nn.Module, config: SlimConfig) -> list[str]:
    """Quantize the float expert weights of a loaded model in place (`quantize_`'s part for experts)."""
    floats = {
        f"{name}.{proj}": module._parameters[proj].data
        for name, module in experts_modules(model)
        for proj in expert_parameters(module)
        if proj in module._parameters
    }
    replaced = replace_experts(model, config)
    for name in replaced:
        module_name, _, proj = name.rpartition(".")
        expert_stores(model.get_submodule(module_name))[proj].set_float_weight(floats[name], name)
    return replaced


def quantized_experts(model: nn.Module) -> Iterator[tuple[str, SlimExpertWeights]]:
    """(full name, store) of every quantized expert projection of `model`."""
    for name, module in experts_modules(model):
        for proj, store in expert_stores(module).items():
            yield f"{name}.{proj}", store


class ExpertAssembler:
    """Quantizes a checkpoint's per-expert float tensors into the stacked storage as they arrive.

    Memory stays bounded: a tensor waits only for the other parts of its own expert (gate for up),
    the fused float 3-D tensor is never built. Names come from transformers' conversion mapping
    (`hf.compat.expert_sources`), so every architecture it knows works.
    """

    def __init__(self, model: nn.Module, on_complete=None):
        self.on_complete = on_complete  # called with (fused name, store) once every expert of it is in
        self.source = compat.expert_sources(model)
        self.stores = dict(quantized_experts(model))
        self.pending: dict[tuple[str, int], dict[int, torch.Tensor]] = {}
        self.done: dict[str, set[int]] = {name: set() for name in self.stores}
        self.examples: dict[tuple[str, int], tuple[str, int, int]] = {}  # (name, part) -> a key seen, its expert digits' span
        self.parts: dict[str, int] = {}

    def take(self, key: str, read, device_for) -> bool:
        """Consume `key` (read with `read()`) if it is a part of a quantized experts parameter, quantizing on the
        device `device_for(fused name)` gives."""
        found = self.source(key) if self.stores else None
        if found is None or found[0] not in self.stores:
            return False
        name, expert, part, parts = found.name, found.expert, found.part, found.parts
        self.parts[name] = parts
        self.examples.setdefault((name, part), (key, *found.span))
        slot = self.pending.setdefault((name, expert), {})
        slot[part] = read().to(device_for(name))
        if len(slot) == parts:
            del self.pending[(name, expert)]
            weight = torch.cat([slot[i] for i in range(parts)], dim=0)  # (out, in): gate rows, then up rows
            self.stores[name].set_expert_float(expert, weight, name)
            self.done[name].add(expert)
            if len(self.done[name]) == self.stores[name].num_experts and self.on_complete is not None:
                self.on_complete(name, self.stores[name])
        return True

    def missing(self) -> list[str]:
        """Checkpoint keys of expert parts never seen, in order (best effort: named after a sibling's key)."""
        names = []
        for name, store in self.stores.items():
            if name not in self.parts:
                continue  # loaded fused, or not at all: the loader's own check names the fused tensor
            for expert in range(store.num_experts):
                seen = self.pending.get((name, expert), {}) if expert not in self.done[name] else range(self.parts[name])
                names += [self._key(name, expert, p) for p in range(self.parts[name]) if p not in seen]
        return names

    def _key(self, name: str, expert: int, part: int) -> str:
        example = self.examples.get((name, part))
        return _key_for(example, expert) if example else f"{name} (expert {expert}, part {part + 1} of {self.parts[name]})"


def _key_for(example: tuple[str, int, int], expert: int) -> str:
    key, start, end = example
    return f"{key[:start]}{expert}{key[end:]}"
