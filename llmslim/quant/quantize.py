"""`quantize_`: compress an already-loaded float model in place."""

from __future__ import annotations

import torch

from llmslim.config import SlimConfig
from llmslim.hf import compat
from llmslim.quant.experts import quantize_experts_
from llmslim.quant.head import apply_decode_head
from llmslim.quant.mixed import choose_int8_layers, oriented
from llmslim.quant.modules import quantization_targets


@torch.no_grad()
def quantize_(model: torch.nn.Module, config: SlimConfig) -> list[str]:
    """Replace the layers `config` selects by quantized ones, in place (torchao-style).

    Any `nn.Module` works: its Linear / Conv1D layers are selected by name; a transformers model
    also gets its tied-head handling. Float weights holding NaN or Inf raise a ValueError naming
    the layer (see `SlimConfig.allow_nonfinite`).

    Prefer `llmslim.from_pretrained` for large models: it never holds the float weights; this
    is for a model that is already in memory.

    Returns:
        The names of the quantized layers.
    """
    if config.weights is None:
        return []
    if hasattr(model, "get_output_embeddings") and hasattr(model, "get_input_embeddings"):  # a transformers model
        compat.untie_int8_head(model, config)  # an int8 head named in int8_layers gets its own weight
    selected = quantization_targets(model, config, keep=compat.tied_module_names(model))
    if config.needs_mixed_choice:
        config = choose_int8_layers(((n, oriented(m, m.weight)) for n, m in selected), config)
    replaced = []
    for name, module in selected:
        spec = config.layer_spec(name)
        layer = spec.module_class().from_linear(module, spec, name)
        layer.set_float_weight(module.weight.data)
        if module.bias is not None:
            layer.bias = torch.nn.Parameter(module.bias.data, requires_grad=False)
        model.set_submodule(name, layer)
        replaced.append(name)
    replaced += quantize_experts_(model, config)
    if hasattr(model, "config"):
        compat.mark_quantized(model, config)
    apply_decode_head(model, config)
    return replaced
