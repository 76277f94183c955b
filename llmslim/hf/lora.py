"""LoRA on llmslim's quantized linear layers, for plain peft and for `llmslim finetune`.

peft wraps only layer types it knows. `SlimLoraLinear` is a peft `lora.Linear` around a frozen
`SlimLinear4bit`, `SlimLinear8bit` or `SlimLinearInt4` (whose own backward is QLoRA's: grad_x =
grad_y @ W, dequantized then, nothing kept between the passes); its `merge` dequantizes, adds
B @ A * scaling and quantizes again in the layer's own format, so peft's `merge_and_unload()` gives
what `llmslim merge` gives.

A model loaded by llmslim (either door) calls `enable_peft`: from then on `get_peft_model`,
`PeftModel.from_pretrained` and `prepare_model_for_kbit_training` treat it as they treat a
bitsandbytes model, with no call from the user (the hook is `compat.install_peft_dispatch`).
"""

from __future__ import annotations

import torch
from peft import LoraConfig
from torch import nn

from llmslim.hf import compat
from llmslim.quant.modules import SlimLinear, SlimLinear8bit, quantized_layers

DoraLinearLayer, DoraLinearVariant = compat.peft_dora()


class _FloatView(nn.Module):
    """An llmslim layer as peft's DoRA reads a base layer: its dequantized `weight` (float32) and its `bias`."""

    def __init__(self, layer: SlimLinear) -> None:
        super().__init__()
        self.weight = nn.Parameter(layer.dequantized_weight(torch.float32), requires_grad=False)  # (out, in)
        self.bias = layer.bias


class SlimDoraVariant(DoraLinearVariant):
    """peft's DoRA (weight-decomposed LoRA) on an llmslim layer: the magnitude vector and the column norms come from
    the dequantized weight, computed when needed (as peft does for bitsandbytes' 4-bit layers)."""

    @staticmethod
    def init(module: SlimLoraLinear, adapter_name: str, **kwargs) -> None:
        if not module.lora_magnitude_vector:  # the first DoRA adapter: its magnitudes become trainable adapter tensors
            module.adapter_layer_names = module.adapter_layer_names[:] + ("lora_magnitude_vector",)
        dora = DoraLinearLayer(fan_in_fan_out=False)
        lora_A, lora_B = module.lora_A[adapter_name].weight, module.lora_B[adapter_name].weight
        dora.update_layer(
            base_layer=_FloatView(module.get_base_layer()), lora_A=lora_A, lora_B=lora_B, scaling=module.scaling[adapter_name]
        )
        module.lora_magnitude_vector[adapter_name] = dora

    @staticmethod
    def forward(module: SlimLoraLinear, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs) -> torch.Tensor:
        dropout = module.lora_dropout[active_adapter]
        keeps_x = isinstance(dropout, nn.Identity) or not module.training
        x = x if keeps_x else dropout(x)
        extra = module.lora_magnitude_vector[active_adapter](
            x,
            lora_A=module.lora_A[active_adapter],
            lora_B=module.lora_B[active_adapter],
            scaling=module.scaling[active_adapter],
            base_layer=_FloatView(module.get_base_layer()),
            base_result=result if keeps_x else None,
            adapter_name=active_adapter,
        )
        return result + extra.to(result.dtype)


class SlimLoraLinear(compat.peft_lora_linear()):
    """peft's LoRA `Linear` around a frozen llmslim quantized layer.

    Plain LoRA and DoRA (`use_dora=True`); `resolve_lora_variant` refuses the other variants by name.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, **kwargs) -> None:
        kwargs.pop("fan_in_fan_out", None)
        super().__init__(base_layer, adapter_name, config, **kwargs)
        self.fan_in_fan_out = False  # llmslim layers compute x @ W.T whatever layout they were built from

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs):
        requested = [name for name in ("use_bdlora", "alora_invocation_tokens", "arrow_config") if getattr(config, name, None)]
        if requested:
            raise ValueError(f"LoRA variants {requested} are not supported on llmslim's quantized layers: use plain LoRA or DoRA")
        return SlimDoraVariant() if config.use_dora else None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        base = self.get_base_layer()
        result = base(x)  # differentiable in x: llmslim layers dequantize in backward
        if self.disable_adapters or self.merged:
            return result
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            lora_x = self._cast_input_dtype(x, self.lora_A[name].weight.dtype)
            if name in self.lora_variant:
                result = self.lora_variant[name].forward(self, name, lora_x, result)
                continue
            delta = self.lora_B[name](self.lora_A[name](self.lora_dropout[name](lora_x))) * self.scaling[name]
            result = result + delta.to(result.dtype)
        return result

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Dequantize the base weight, add each adapter's B @ A * scaling (DoRA: and scale each output row to its
        magnitude), quantize it again in place."""
        for name in compat.adapters_to_merge(self, adapter_names):
            if name in self.lora_A:
                self._requantize(name, sign=1.0, safe=safe_merge)
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        """Subtract merged adapters again (lossy: the weight is quantized once more)."""
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.lora_A:
                self._requantize(name, sign=-1.0, safe=False)

    @torch.no_grad()
    def _requantize(self, name: str, sign: float, safe: bool) -> None:
        base = self.get_base_layer()
        weight = base.dequantized_weight(torch.float32)  # (out, in)
        delta = self.get_delta_weight(name).float().to(weight.device)
        if name in self.lora_variant:  # DoRA: W' = m / ||W + dW|| * (W + dW), row by row; undone with the same norms
            if sign > 0:
                norm = self.lora_magnitude_vector[name].get_weight_norm(weight, delta, scaling=1).detach()
                self._cache_store(f"{name}-weight_norm", norm)
                factor = self.lora_magnitude_vector[name].weight.float() / norm
                weight = factor.view(-1, 1) * (weight + delta)
            else:
                factor = self.lora_magnitude_vector[name].weight.float() / self._cache_pop(f"{name}-weight_norm")
                weight = weight / factor.view(-1, 1) - delta
        else:
            weight = weight + sign * delta
        if safe and not torch.isfinite(weight).all():
            raise ValueError(f"merging adapter {name!r} gives non-finite weights: the adapter is broken; retrain it")
        base.set_float_weight(weight.t().contiguous() if getattr(base, "source_transposed", False) else weight)
        if self.lora_bias[name] and base.bias is not None:
            base.bias.add_(sign * self.lora_B[name].bias.to(base.bias.dtype))


def register_slim_layers(config: LoraConfig) -> LoraConfig:
    """Let peft wrap llmslim's quantized layers (`config` is changed and returned)."""
    return compat.register_peft_custom_module(config, {SlimLinear: SlimLoraLinear})


def _dispatch(target: nn.Module, adapter_name: str, config: LoraConfig, **kwargs) -> SlimLoraLinear | None:
    """peft's choice of LoRA layer, made for llmslim's quantized layers (None for every other layer)."""
    if isinstance(compat.peft_base_layer(target), SlimLinear):
        return SlimLoraLinear(target, adapter_name, config=config, **kwargs)
    return None


def _all_linear(model: nn.Module) -> list[str]:
    """What `target_modules="all-linear"` adds to peft's choice: llmslim's quantized layers, but the output head and
    layers inside LoRA wrappers (peft leaves those out of its own choice too)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    wrapped = {id(m.get_base_layer()) for m in model.modules() if isinstance(m, SlimLoraLinear)}
    return [name for name, layer in quantized_layers(model) if layer is not head and id(layer) not in wrapped]


def enable_peft(model: nn.Module) -> None:
    """Let plain peft wrap `model`'s quantized layers, and mark the model as k-bit loaded the way bitsandbytes does
    (`is_loaded_in_4bit` / `is_loaded_in_8bit`), which `prepare_model_for_kbit_training` and transformers' Trainer
    read. Does nothing for a model without quantized layers."""
    layers = [layer for _, layer in quantized_layers(model)]
    if not layers:
        return
    model.is_loaded_in_8bit = any(isinstance(layer, SlimLinear8bit) for layer in layers)
    model.is_loaded_in_4bit = any(not isinstance(layer, SlimLinear8bit) for layer in layers)
    compat.install_peft_dispatch(_dispatch, _all_linear)
