"""The only module that touches transformers internals: llmslim's `HfQuantizer` and its registration.

After `import llmslim`, `from_pretrained(..., quantization_config=SlimConfig(...))` quantizes while
loading, and a checkpoint whose `config.json` says `quant_method: "llmslim"` loads pre-quantized.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import transformers
from packaging import version
from transformers.core_model_loading import ConversionOps
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

from llmslim.config import QUANT_METHOD, SlimConfig
from llmslim.quant.modules import SlimLinear, quantized_layers, replace_linear_modules

logger = logging.getLogger(__name__)

is_transformers_ge_v5 = version.parse(transformers.__version__).major >= 5


def tied_module_names(model: torch.nn.Module) -> set[str]:
    """Modules whose weight is shared with another module (e.g. lm_head tied to the embedding)."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    names = set(tied) | set(tied.values())
    return {n.removesuffix(".weight") for n in names}


def prepare_skeleton(model: torch.nn.Module, config: SlimConfig) -> list[str]:
    """Replace the selected layers of a (meta) model by empty llmslim layers."""
    return replace_linear_modules(model, config, keep=tied_module_names(model))


def check_loaded(model: torch.nn.Module, source: str) -> None:
    """Raise if a quantized layer still has tensors on the meta device (not found in the checkpoint)."""
    missing = [f"{name}.{t}" for name, layer in quantized_layers(model) for t, v in layer.state_dict().items() if v.is_meta]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(
            f"{source}: the checkpoint does not match its llmslim quantization config: no data for {shown}. "
            "Re-create it with `llmslim quantize` or load the float model with a SlimConfig."
        )


def mark_quantized(model: torch.nn.Module, config: SlimConfig) -> None:
    """Give a model quantized outside `from_pretrained` what transformers expects of a quantized one."""
    model.config.quantization_config = config
    model.hf_quantizer = SlimHfQuantizer(config, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = QUANT_METHOD


class SlimQuantize(ConversionOps):
    """Quantize one float weight read from a checkpoint into its llmslim layer's tensors."""

    def __init__(self, hf_quantizer: SlimHfQuantizer):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict: dict[str, Any], model=None, full_layer_name: str | None = None, **kwargs) -> dict[str, torch.Tensor]:
        result = {}
        for param_name, value in input_dict.items():
            value = value[0] if isinstance(value, list) else value
            module_name = param_name.rpartition(".")[0]
            module = model.get_submodule(module_name)
            for name, tensor in module.quantize(value).items():
                result[f"{module_name}.{name}"] = tensor
            module._is_hf_initialized = True
        return result


class SlimHfQuantizer(HfQuantizer):
    """transformers' hooks for llmslim: skeleton rewrite, quantize-on-load, serialization."""

    requires_calibration = False
    quantization_config: SlimConfig

    def __init__(self, quantization_config: SlimConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.quantized_modules: list[str] = []

    @property
    def quantized_element_size(self) -> float | None:
        return {"int8": 1.0, "nf4": 0.5, "fp4": 0.5}.get(self.quantization_config.weights)

    def update_device_map(self, device_map: dict[str, Any] | None) -> dict[str, Any] | None:
        if device_map is None:
            device_map = {"": torch.cuda.current_device()} if torch.cuda.is_available() else {"": "cpu"}
        return device_map

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        if self.pre_quantized:
            return False
        module_name, _, tensor_name = param_name.rpartition(".")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            return False
        return isinstance(module, SlimLinear) and tensor_name == "weight"

    def _process_model_before_weight_loading(self, model, **kwargs):
        if self.quantization_config.needs_mixed_choice:
            raise ValueError(
                "SlimConfig(bits_per_param=...) chooses its int8 layers from the weights before the layers are built, which "
                "transformers' from_pretrained cannot do: load with llmslim.from_pretrained(path, config), or save that "
                "model once (its config then lists int8_layers) and load the saved folder here"
            )
        self.quantized_modules = prepare_skeleton(model, self.quantization_config)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        check_loaded(model, getattr(model.config, "_name_or_path", "model"))
        for _, layer in quantized_layers(model):
            layer.own_memory()
        return model

    def get_quantize_ops(self):
        return SlimQuantize(self)

    def get_weight_conversions(self):
        # A saved llmslim checkpoint holds exactly the llmslim layers' state dicts, so loading it
        # needs no conversion: the skeleton built in `_process_model_before_weight_loading` has
        # every tensor under its saved name, dtype and shape.
        return []

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True


def register() -> None:
    """Make transformers aware of `quant_method="llmslim"` (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(SlimConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(SlimHfQuantizer)
