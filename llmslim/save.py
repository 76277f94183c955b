"""Saving compressed models: llmslim's own layout, or bitsandbytes' layout for stock transformers.

Both write into a temporary folder next to the target and rename it at the end, so a crash never
leaves a half-written model under the final name.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

from llmslim.quant import kernels
from llmslim.quant.modules import SlimLinear, SlimLinear4bit, SlimLinear8bit, quantizable, quantized_layers

SAVE_FORMATS = ("llmslim", "bnb")


def save_pretrained(
    model: torch.nn.Module,
    out: str | os.PathLike,
    *,
    format: str = "llmslim",
    overwrite: bool = False,
    tokenizer=None,
    max_shard_size: str = "2GB",
) -> Path:
    """Save a model loaded by llmslim.

    Args:
        model: the model.
        out: target folder; must not exist unless `overwrite`.
        format: `"llmslim"` (reloads with `import llmslim`) or `"bnb"` (stock transformers +
            bitsandbytes load it with no llmslim import).
        overwrite: replace an existing `out`.
        tokenizer: saved alongside when given.
        max_shard_size: largest safetensors shard.

    Returns:
        The folder written.
    """
    if format not in SAVE_FORMATS:
        raise ValueError(f"format must be one of {list(SAVE_FORMATS)}, got {format!r}")
    with atomic_directory(out, overwrite) as tmp:
        if format == "llmslim":
            model.save_pretrained(tmp, max_shard_size=max_shard_size)
        else:
            _save_bnb(model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out)


@contextmanager
def atomic_directory(out: str | os.PathLike, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder that becomes `out` only if the block finishes."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists: choose another output folder or pass --overwrite (overwrite=True)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def bnb_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors named as bitsandbytes' `Linear4bit` / `Linear8bitLt` save them."""
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    quantized = {name: layer for name, layer in model.named_modules() if isinstance(layer, SlimLinear)}
    state = {}
    for key, tensor in model.state_dict().items():
        module_name = key.rpartition(".")[0]
        if key in tied or module_name in quantized:
            continue
        state[key] = tensor
    for name, layer in quantized.items():
        state.update({f"{name}.{k}": v for k, v in _bnb_layer_tensors(layer).items()})
    return {k: v.contiguous() for k, v in state.items()}


def _bnb_layer_tensors(layer: SlimLinear) -> dict[str, torch.Tensor]:
    tensors = {} if layer.bias is None else {"bias": layer.bias.data}
    if isinstance(layer, SlimLinear4bit):
        stored = layer.four_bit_weight()  # the stored layout, also while the layer runs in the CPU one
        qs = kernels.quant_state(stored, layer.compute_dtype)
        tensors["weight"] = stored.codes
        # code tables are shared between layers in memory; safetensors wants each tensor once
        tensors.update({f"weight.{k}": v.clone() if "quant_map" in k else v for k, v in qs.as_dict(packed=True).items()})
    elif isinstance(layer, SlimLinear8bit):
        tensors.update(weight=layer.weight.data, SCB=layer.SCB, weight_format=torch.tensor(0, dtype=torch.uint8))
    else:  # pragma: no cover - every format module is handled above
        raise TypeError(f"no bitsandbytes layout for {type(layer).__name__}")
    return tensors


def bnb_quantization_config(model: torch.nn.Module) -> dict:
    """The `BitsAndBytesConfig` (as a dict) that makes transformers rebuild this model's layers."""
    from transformers import BitsAndBytesConfig

    config = model.config.quantization_config
    skip = [name for name, module in model.named_modules() if quantizable(module)]
    compute_dtype = config.torch_compute_dtype or next(layer.compute_dtype for _, layer in quantized_layers(model))
    if config.is_4bit:
        bnb = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=config.weights,
            bnb_4bit_use_double_quant=config.double_quant,
            bnb_4bit_compute_dtype=compute_dtype,
            llm_int8_skip_modules=skip,
        )
    else:
        bnb = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=config.int8_threshold, llm_int8_skip_modules=skip)
    return bnb.to_dict()


def _save_bnb(model: torch.nn.Module, folder: Path) -> None:
    if not any(True for _ in quantized_layers(model)):
        raise ValueError("the model has no llmslim quantized layers: there is nothing to export in bitsandbytes format")
    if model.config.quantization_config.weights not in ("int8", "nf4", "fp4"):
        raise ValueError(f"bitsandbytes has no format {model.config.quantization_config.weights!r}")
    config = copy.deepcopy(model.config)
    config.quantization_config = bnb_quantization_config(model)
    config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    _write_shards(bnb_state_dict(model), folder)


def _write_shards(state: dict[str, torch.Tensor], folder: Path, max_bytes: int = 2 * 1024**3) -> None:
    from huggingface_hub import split_torch_state_dict_into_shards

    split = split_torch_state_dict_into_shards(state, max_shard_size=max_bytes)
    for filename, keys in split.filename_to_tensors.items():
        save_file({k: state[k] for k in keys}, str(folder / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
