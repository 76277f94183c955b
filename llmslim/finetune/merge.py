"""`merge()`: fold a LoRA adapter into a quantized base and save a quantized model.

For each adapted layer: dequantize the base weight, add B @ A * alpha / r, quantize again in the
layer's format (`SlimLoraLinear.merge`, run by peft's `merge_and_unload`); then save with
llmslim's atomic `save_pretrained`. bitsandbytes cannot do this for 8-bit layers ("Cannot merge
LoRA layers when the model is loaded in 8-bit").

Error of the merged model: each merged weight is within half a code step of the exact sum, per
absmax block: |Q(W) - W| <= absmax_block * max_gap / 2 (NF4's largest gap between neighbouring
code values is 0.2766, so <= 0.139 * absmax; int8 rows: absmax / 254), and the layer's output
moves by at most |x| @ |Q(W) - W|.T; `weight_error_bound` gives that per-element bound.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from llmslim import models
from llmslim.finetune.lora import load_adapter, read_training_record
from llmslim.quant import formats
from llmslim.quant.modules import SlimLinear, SlimLinear4bit, SlimLinear8bit, SlimLinearInt4
from llmslim.save import check_output

logger = logging.getLogger(__name__)


@dataclass
class MergeResult:
    """What `merge` wrote: the folder, the base's format and the merged layer names."""

    out: Path
    weights: str
    merged_layers: list[str]


def merge(
    base: str | Path | None, adapter: str | Path, out: str | Path, *, weights: str | None = None, overwrite: bool = False
) -> MergeResult:
    """Merge `adapter` into `base` quantized with `weights`, and save the quantized result to `out`.

    Args:
        base: the base model folder (float or saved by llmslim); None is the embedded default.
        adapter: the folder `llmslim finetune` wrote.
        out: target folder; must not exist unless `overwrite`, and must be apart from `base` and `adapter`.
        weights: format of the merged layers; None uses the one the adapter was trained on (nf4 if unknown).
        overwrite: replace an existing `out` if it is a model folder llmslim could have written (`llmslim.save`).
    """
    inputs = {"base model folder": None if base is None else Path(base), "adapter folder": Path(adapter)}
    out = check_output(out, overwrite=overwrite, inputs=inputs)  # before anything loads
    record = read_training_record(adapter)
    weights = weights or record.get("weights") or "nf4"
    if weights == "none":
        raise ValueError("merge writes a quantized model: pass --weights nf4, fp4, int4 or int8 (weights='none' is not a quantized format)")
    model = merged_model(base, adapter, weights, record.get("block_size_quant", 64))
    merged = [name for name, module in model.named_modules() if isinstance(module, SlimLinear)]
    _save(model, base, adapter, out, overwrite)
    return MergeResult(out, weights, merged)


def merged_model(base: str | Path | None, adapter: str | Path, weights: str, block_size: int = 64) -> torch.nn.Module:
    """The base quantized with `weights` (its adapted layers), with the adapter merged in."""
    import llmslim

    path = models.resolve(base)
    model = llmslim.from_pretrained(path, _slim_config(path, adapter, weights, block_size), progress=False)
    return load_adapter(model, adapter).merge_and_unload()


def weight_error_bound(layer: SlimLinear) -> torch.Tensor:
    """(out, in) bound on |dequantized - exact| of the weight `layer` was last quantized from."""
    out_features, in_features = layer.out_features, layer.in_features
    if isinstance(layer, SlimLinear4bit):
        code = formats.code_4bit(layer.fmt)
        half_gap = (code.sort().values.diff().max() / 2).item()
        absmax = formats.dequantize_4bit(layer.four_bit_weight(), torch.float32).abs()  # lower bound of each block's absmax
        blocks = _block_max(absmax, layer.block_size)  # (n_blocks,)
        per_element = blocks.repeat_interleave(layer.block_size)[: out_features * in_features]
        return (per_element * half_gap * _DOUBLE_QUANT_SLACK).view(out_features, in_features)
    if isinstance(layer, SlimLinear8bit):
        return (layer.SCB / 254.0).unsqueeze(1).expand(out_features, in_features)  # half an int8 step per row
    if isinstance(layer, SlimLinearInt4):
        scale = layer.weight_scale.float().repeat_interleave(layer.group_size, dim=1)[:, :in_features]  # (out, in)
        return scale / 2
    raise TypeError(f"no error bound for {type(layer).__name__}")


# The stored absmax of a block is the largest dequantized value divided by the largest code (1.0),
# rounded by double quantization to 8 bits per 256 blocks: allow its relative error (<= 1/127 * 2).
_DOUBLE_QUANT_SLACK = 1.0 + 2.0 / 127


def _block_max(values: torch.Tensor, block_size: int) -> torch.Tensor:
    flat = values.reshape(-1)
    pad = (-flat.numel()) % block_size
    flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, block_size).amax(dim=1)  # (n_blocks,)


def _slim_config(path: Path, adapter: str | Path, weights: str, block_size: int):
    from transformers import AutoConfig

    from llmslim.config import SlimConfig

    if getattr(AutoConfig.from_pretrained(path), "quantization_config", None) is not None:
        return None  # saved by llmslim: its own config applies
    targets = sorted(_adapted_layers(adapter))
    return SlimConfig(weights=weights, block_size=block_size, include=targets)


def _adapted_layers(adapter: str | Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(Path(adapter) / "adapter_model.safetensors"), framework="pt") as f:
        return {key.removeprefix("base_model.model.").rpartition(".lora_")[0] for key in f.keys()}


def _save(model: torch.nn.Module, base: str | Path | None, adapter: str | Path, out: Path, overwrite: bool) -> None:
    """Save with the adapter's tokenizer (finetune saves one there), else the base's, else none (logged)."""
    import llmslim

    tokenizer = models.load_tokenizer(adapter)
    if tokenizer is None:
        tokenizer = models.load_tokenizer(models.resolve(base))
    if tokenizer is None:
        logger.warning("no tokenizer in %s or %s: the merged model %s is saved without one", adapter, base, out)
    llmslim.save_pretrained(model, out, overwrite=overwrite, tokenizer=tokenizer)
