"""llmslim's transformers `HfQuantizer` and its registration.

After `import llmslim`, `from_pretrained(..., quantization_config=SlimConfig(...))` quantizes while
loading, and a checkpoint whose `config.json` says `quant_method: "llmslim"` loads pre-quantized.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
from transformers import PreTrainedModel
from transformers.core_model_loading import ConversionOps
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

from llmslim import models
from llmslim.calibrate import calibrate_, calibration_ids
from llmslim.compress.apply import compress_
from llmslim.compress.load import prepare_compression, share_loaded_
from llmslim.config import QUANT_METHOD, SlimConfig
from llmslim.hf import compat
from llmslim.hf.attention import use_prompt_attention
from llmslim.hf.checks import check_checkpoint_files, check_loaded
from llmslim.hf.compat import head_tied_to_embedding, untie_int8_head
from llmslim.hf.decode import use_lean_layers
from llmslim.quant.experts import SlimExpertWeights, expert_stores, quantized_experts, replace_experts
from llmslim.quant.head import apply_decode_head
from llmslim.quant.modules import SlimLinear, prepare_skeleton, quantized_layers
from llmslim.quant.registry import FORMATS


class SlimQuantize(ConversionOps):
    """Quantize one float weight read from a checkpoint into its llmslim layer's tensors."""

    def __init__(self, hf_quantizer: SlimHfQuantizer):
        self.hf_quantizer = hf_quantizer

    def convert(self, input_dict: dict[str, Any], model=None, full_layer_name: str | None = None, **kwargs) -> dict[str, torch.Tensor]:
        result = {}
        for param_name, value in input_dict.items():
            value = value[0] if isinstance(value, list) else value
            target = _quantized_target(model, param_name)
            module_name = param_name.rpartition(".")[0]
            if isinstance(target, SlimExpertWeights):  # a fused 3-D experts parameter: stacked codes and scales
                tensors = {target.names[k]: v for k, v in target.quantize(value, param_name).items()}
                target.module._is_hf_initialized = True
            else:
                tensors = target.quantize(value)
                target._is_hf_initialized = True
            for name, tensor in tensors.items():
                result[f"{module_name}.{name}"] = tensor
        return result


def _quantized_target(model, param_name: str) -> SlimLinear | SlimExpertWeights | None:
    """The llmslim module a float checkpoint tensor is quantized into: a layer for its `weight`, or the
    experts store that took the place of a fused 3-D parameter; None for a tensor loaded as it is."""
    module_name, _, tensor_name = param_name.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return None
    if isinstance(module, SlimLinear) and tensor_name == "weight":
        return module
    return expert_stores(module).get(tensor_name)


class SlimHfQuantizer(HfQuantizer):
    """transformers' hooks for llmslim: skeleton rewrite, quantize-on-load, serialization."""

    requires_calibration = False
    quantization_config: SlimConfig

    def __init__(self, quantization_config: SlimConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.quantized_modules: list[str] = []
        self.compile_decode = False  # set by `llmslim.compile_decode`: generate may then compile the decode step

    @property
    def is_compileable(self) -> bool:
        """Whether transformers' `generate` may compile the model (only once `llmslim.compile_decode` asked for it)."""
        return self.compile_decode

    @property
    def quantized_element_size(self) -> float | None:
        weights = self.quantization_config.weights
        return None if weights is None else FORMATS[weights].element_size

    def update_device_map(self, device_map: dict[str, Any] | None) -> dict[str, Any] | None:
        if device_map is None:
            device_map = {"": torch.cuda.current_device()} if torch.cuda.is_available() else {"": "cpu"}
        return device_map

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        if self.pre_quantized:
            return False
        return _quantized_target(model, param_name) is not None

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        if self.quantization_config.needs_mixed_choice:
            raise ValueError(
                "SlimConfig(bits_per_param=...) chooses its int8 layers from the weights before the layers are built, which "
                "transformers' from_pretrained cannot do: load with llmslim.from_pretrained(path, config), or save that "
                "model once (its config then lists int8_layers) and load the saved folder here"
            )
        if not self.pre_quantized and head_tied_to_embedding(model) and untie_int8_head(model, self.quantization_config):
            raise ValueError(
                "int8_layers names the output head, which this model ties to its input embedding: load with "
                "llmslim.from_pretrained(path, config), which makes the head an int8 copy of the embedding"
            )
        if self._calibrates:  # GPTQ needs the float weights: they load as they are and are quantized afterwards
            return model
        self.quantized_modules = prepare_skeleton(model, self.quantization_config) + replace_experts(model, self.quantization_config)
        if self.pre_quantized and self.quantization_config.compresses:
            prepare_compression(model, self.quantization_config, pre_quantized=True, tie_now=False)
            _skip_init_of_shared_members(model)
        check_checkpoint_files(model, checkpoint_files, self.pre_quantized, getattr(model.config, "_name_or_path", "model"))
        return model

    @property
    def _calibrates(self) -> bool:
        return self.quantization_config.method == "gptq" and not self.pre_quantized

    def _process_model_after_weight_loading(self, model, **kwargs):
        if self._calibrates:  # on the shipped calibration text, 64k tokens (llmslim.from_pretrained takes others)
            path = getattr(model.config, "_name_or_path", "")
            tokenizer = models.load_tokenizer(path, needed_for="SlimConfig(method='gptq') (it tokenizes the calibration text)")
            self.quantized_modules = calibrate_(model, self.quantization_config, calibration_ids(tokenizer))
        check_loaded(model, getattr(model.config, "_name_or_path", "model"))
        if any(True for _ in quantized_experts(model)):
            compat.save_with_model_names(model)  # transformers set its conversion mapping while loading
        for _, layer in quantized_layers(model):
            layer.own_memory()
        for _, store in quantized_experts(model):
            store.own_memory()
        if self.quantization_config.compresses:
            self.quantization_config = _compress_loaded(model, self.quantization_config, self.pre_quantized)
        apply_decode_head(model, self.quantization_config)
        use_lean_layers(model)
        use_prompt_attention(model)
        enable_peft_if_installed(model)
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


def enable_peft_if_installed(model: torch.nn.Module) -> None:
    """Let plain peft wrap a loaded model's quantized layers (`llmslim.hf.lora.enable_peft`) when peft, the `train`
    extra, is installed and the model has quantized layers; peft (about 3.6 s to import here) is imported only then."""
    if importlib.util.find_spec("peft") is not None and any(True for _ in quantized_layers(model)):
        from llmslim.hf.lora import enable_peft

        enable_peft(model)


def _skip_init_of_shared_members(model: torch.nn.Module) -> None:
    """Blocks whose tensors are saved under their group's first block: transformers must not initialise their "missing"
    tensors (random init of packed codes fails); `share_loaded_` points them at the loaded ones afterwards."""
    for _, block in model.named_modules():
        if getattr(block, "_tied_weights_keys", None) and not isinstance(block, PreTrainedModel):
            for module in block.modules():
                module._is_hf_initialized = True


def _compress_loaded(model, config: SlimConfig, pre_quantized: bool) -> SlimConfig:
    """After transformers loaded the weights: share a saved compressed model's blocks, or compress a float one."""
    if pre_quantized:
        if config.share_layers is not None:
            share_loaded_(model, config)
        return config
    return compress_(model, config)


def register() -> None:
    """Make transformers aware of `quant_method="llmslim"` (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(SlimConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(SlimHfQuantizer)
