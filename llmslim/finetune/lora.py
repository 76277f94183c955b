"""LoRA on llmslim's quantized linear layers, through peft's custom-module mechanism.

peft wraps only layer types it knows; `LoraConfig._register_custom_module({SlimLinear: SlimLoraLinear})`
(peft's documented way for custom layers) makes it wrap `SlimLinear4bit`, `SlimLinear8bit` and
`SlimLinearInt4` with `SlimLoraLinear`, a peft `lora.Linear` around the frozen base (whose own
backward is QLoRA's: grad_x = grad_y @ W, dequantized then, nothing kept between the passes),
and whose `merge` dequantizes, adds
B @ A * scaling and quantizes again in the layer's own format.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel
from torch import nn

from llmslim.config import SlimConfig
from llmslim.hf import compat
from llmslim.hf.compat import Conv1D
from llmslim.quant.modules import SlimLinear

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class SlimLoraLinear(compat.peft_lora_linear()):
    """peft's LoRA `Linear` around a frozen llmslim quantized layer.

    Only vanilla LoRA (no DoRA or other variants): `resolve_lora_variant` raises for the others.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, **kwargs) -> None:
        kwargs.pop("fan_in_fan_out", None)
        super().__init__(base_layer, adapter_name, config, **kwargs)
        self.fan_in_fan_out = False  # llmslim layers compute x @ W.T whatever layout they were built from

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs):
        requested = [name for name in ("use_dora", "use_bdlora", "alora_invocation_tokens", "arrow_config") if getattr(config, name, None)]
        if requested:
            raise ValueError(f"LoRA variants {requested} are not supported on llmslim's quantized layers: use plain LoRA")
        return None

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
            delta = self.lora_B[name](self.lora_A[name](self.lora_dropout[name](lora_x))) * self.scaling[name]
            result = result + delta.to(result.dtype)
        return result

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Dequantize the base weight, add each adapter's B @ A * scaling, quantize it again in place."""
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
        weight = base.dequantized_weight(torch.float32) + sign * self.get_delta_weight(name).float().to(base.weight.device)  # (out, in)
        if safe and not torch.isfinite(weight).all():
            raise ValueError(f"merging adapter {name!r} gives non-finite weights: the adapter is broken; retrain it")
        base.set_float_weight(weight.t().contiguous() if getattr(base, "source_transposed", False) else weight)
        if self.lora_bias[name] and base.bias is not None:
            base.bias.add_(sign * self.lora_B[name].bias.to(base.bias.dtype))


def register_slim_layers(config: LoraConfig) -> LoraConfig:
    """Let peft wrap llmslim's quantized layers (`config` is changed and returned)."""
    return compat.register_peft_custom_module(config, {SlimLinear: SlimLoraLinear})


def linear_layer_names(model: nn.Module) -> list[str]:
    """Names of the linear layers of `model`: nn.Linear, GPT-2's Conv1D and llmslim's quantized ones."""
    return [name for name, module in model.named_modules() if name and isinstance(module, (nn.Linear, Conv1D, SlimLinear))]


def resolve_targets(model: nn.Module, targets: list[str] | None, exclude: list[str]) -> list[str]:
    """The linear layers `targets` selects (fnmatch on the name or its suffix, as `SlimConfig.include`).

    Args:
        model: the model (a meta-device skeleton is enough).
        targets: patterns; None selects every linear layer.
        exclude: patterns never selected (the output layer by default).

    Raises:
        ValueError: nothing matches; lists the linear layer names to choose from.
    """
    names = linear_layer_names(model)
    selector = SlimConfig(weights=None, include=targets, exclude=exclude)
    chosen = [name for name in names if selector.selects(name)]
    if not chosen:
        shown = sorted({name.rpartition(".")[2] for name in names})
        raise ValueError(
            f"LoRA target patterns {targets} (exclude {exclude}) match no linear layer of {type(model).__name__}; "
            f"its linear layers are named {shown} (e.g. {names[:3]}): pass --target with some of those names"
        )
    return chosen


def load_adapter(base: nn.Module, adapter: str | Path, trainable: bool = False) -> PeftModel:
    """`base` (quantized by llmslim or float) with the peft adapter saved in `adapter`.

    Raises:
        FileNotFoundError: `adapter` holds no peft adapter.
        ValueError: the adapter does not fit `base` (a layer missing or of another shape).
    """
    adapter = Path(adapter)
    if not (adapter / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(f"{adapter} holds no {ADAPTER_CONFIG}: pass the folder `llmslim finetune` wrote (--out)")
    check_adapter_fits(base, adapter)
    config = register_slim_layers(LoraConfig.from_pretrained(str(adapter)))
    config.inference_mode = not trainable
    return PeftModel.from_pretrained(base, str(adapter), config=config, is_trainable=trainable)


def check_adapter_fits(base: nn.Module, adapter: Path) -> None:
    """Every LoRA matrix of the adapter must match a linear layer of `base` in name and shape."""
    from safetensors import safe_open

    layers = {name: module for name, module in base.named_modules() if isinstance(module, (nn.Linear, Conv1D, SlimLinear))}
    with safe_open(str(adapter / ADAPTER_WEIGHTS), framework="pt") as f:
        for key in f.keys():
            _check_lora_tensor(key, tuple(f.get_slice(key).get_shape()), layers, adapter)


def _check_lora_tensor(key: str, shape: tuple[int, ...], layers: dict[str, nn.Module], adapter: Path) -> None:
    module_name, _, kind = key.removeprefix("base_model.model.").rpartition(".lora_")
    layer = layers.get(module_name)
    if layer is None:
        raise ValueError(
            f"adapter {adapter} adapts {module_name!r}, which is not a linear layer of the base model: use the base it was trained on"
        )
    in_features, out_features = _features(layer)
    expected = shape[1] if kind.startswith("A") else shape[0]
    actual = in_features if kind.startswith("A") else out_features
    if expected != actual:
        side = "inputs" if kind.startswith("A") else "outputs"
        raise ValueError(
            f"adapter {adapter} does not fit the base model: {key} has shape {list(shape)}, but {module_name} has {actual} {side}; "
            "use the base it was trained on"
        )


def _features(layer: nn.Module) -> tuple[int, int]:
    if isinstance(layer, Conv1D):
        return tuple(layer.weight.shape)
    return layer.in_features, layer.out_features


def read_training_record(adapter: str | Path) -> dict:
    """What `llmslim finetune` recorded next to the adapter (base, quantization), or {}."""
    path = Path(adapter) / "llmslim_finetune.json"
    return json.loads(path.read_text()) if path.is_file() else {}
