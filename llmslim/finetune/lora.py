"""LoRA targets, adapters and training records of `llmslim finetune`.

The LoRA layer on llmslim's quantized layers (`SlimLoraLinear`) and the hook that lets plain peft
wrap them are in `llmslim.hf.lora`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from peft import LoraConfig, PeftModel
from torch import nn

from llmslim.config import SlimConfig
from llmslim.hf.compat import Conv1D
from llmslim.hf.lora import register_slim_layers
from llmslim.quant.modules import SlimLinear

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


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
