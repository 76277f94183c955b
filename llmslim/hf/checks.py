"""Checks of a checkpoint against the llmslim layers of the skeleton that loads it, before and after loading.

A missing, extra, mis-typed or mis-shaped tensor becomes an error that names the file, the tensor, what
was found and what was expected (transformers alone would initialise, ignore or cast it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import torch

from llmslim.hf import compat
from llmslim.offload.store import safetensors_index
from llmslim.quant.experts import quantized_experts
from llmslim.quant.modules import SlimLinear, quantized_layers


def check_loaded(model: torch.nn.Module, source: str) -> None:
    """Raise if a quantized layer still has tensors on the meta device (not found in the checkpoint)."""
    missing = [f"{name}.{t}" for name, layer in quantized_layers(model) for t, v in layer.state_dict().items() if v.is_meta]
    missing += [
        f"{name.rpartition('.')[0]}.{store.names[t]}"
        for name, store in quantized_experts(model)
        for t, v in store.tensors().items()
        if v.is_meta
    ]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(
            f"{source}: the checkpoint does not match its llmslim quantization config: no data for {shown}. "
            "Re-create it with `llmslim quantize` or load the float model with a SlimConfig."
        )


def check_checkpoint_files(model: torch.nn.Module, files: list, pre_quantized: bool, source: str) -> None:
    """Check a checkpoint against `model`'s llmslim layers before any weight is read, from the shards' headers.

    Every safetensors shard must be complete; each llmslim layer's tensors must all be there, none more, in the
    dtype and shape the layer expects (a float `weight` for a float checkpoint quantized on load). transformers
    would only report a missing tensor as "newly initialized" (a zero or random buffer), ignore an extra one and
    cast one of the wrong dtype. (A pickled `.bin` shard torch cannot map is left to transformers.)

    Raises:
        ValueError: naming the file, the tensor, what was found and what was expected.
    """
    files = [Path(f) for f in files or []]
    layers = dict(quantized_layers(model))
    headers = {f: safetensors_index(f) if f.suffix == ".safetensors" else _pickle_index(f) for f in files}
    if not layers or not headers or any(h is None for h in headers.values()):
        return
    expected = _layer_tensors(layers, pre_quantized)
    found = _checkpoint_tensors(model, headers)
    for name, (file, loc) in found.items():
        module_name, _, tensor_name = name.rpartition(".")
        if module_name not in layers:
            continue
        if name not in expected:
            raise ValueError(extra_tensor_message(file, name, module_name, layers[module_name], pre_quantized))
        if loc is not None and loc.dtype is not None:
            _check_header_tensor(layers[module_name], name, tensor_name, loc, expected[name], file)
    missing = [n for n in expected if n not in found and not compat.ignored_when_missing(model, n)]
    if missing:
        raise ValueError(missing_message(model, missing, pre_quantized, source, files))


class _Stored(NamedTuple):
    dtype: torch.dtype
    shape: tuple[int, ...]


def _pickle_index(file: Path) -> dict[str, _Stored] | None:
    """Dtype and shape of each tensor of a pickled checkpoint (memory-mapped: only the pickle is read); None if unreadable."""
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # torch raises several types for a bad or legacy (non-zip) pickle
        return None
    if not isinstance(state, dict):
        return None
    return {k: _Stored(v.dtype, tuple(v.shape)) for k, v in state.items() if isinstance(v, torch.Tensor)}


def _layer_tensors(layers: dict[str, SlimLinear], pre_quantized: bool) -> dict[str, torch.Tensor]:
    """The checkpoint tensors llmslim layers load: their state dict (pre-quantized), else the float weight and bias."""
    expected = {}
    for module_name, layer in layers.items():
        for tensor_name, tensor in layer.state_dict(keep_vars=True).items():
            if pre_quantized or tensor_name == "bias":
                expected[f"{module_name}.{tensor_name}"] = tensor
        if not pre_quantized:
            expected[f"{module_name}.weight"] = None  # a float weight, checked by `check_float_weight`
    return expected


def _check_header_tensor(layer: SlimLinear, name: str, tensor_name: str, loc, tensor: torch.Tensor | None, file: Path) -> None:
    if tensor is None:
        check_float_weight(layer, name, loc.dtype, loc.shape, file)
    elif tensor_name == "bias":  # float: transformers casts it to the model's dtype
        if loc.shape != tuple(tensor.shape):
            raise ValueError(shape_message(file, name, loc.shape, tuple(tensor.shape)))
    elif (loc.dtype, loc.shape) != (tensor.dtype, tuple(tensor.shape)):
        raise ValueError(quant_tensor_message(file, name, loc.dtype, loc.shape, tensor))


def _checkpoint_tensors(model: torch.nn.Module, headers: dict) -> dict[str, tuple[Path, Any]]:
    """{model tensor name: (file, `Location`)} for the tensors of `headers`, named as transformers will load them
    (its key renamings and base-model prefix); a tensor a converter merges or splits has no single `Location` (None)."""
    rename = compat.transformers_renaming(model)
    found = {}
    for file, index in headers.items():
        for key, loc in index.items():
            names, converted = rename(key)
            for name in names:
                found[name] = (file, None if converted else loc)
    return found


def float_weight_shape(layer: SlimLinear) -> tuple[int, int]:
    """The shape of the float weight a layer is quantized from: `(out, in)`, or `(in, out)` for Conv1D."""
    if getattr(layer, "source_transposed", False):
        return layer.in_features, layer.out_features
    return layer.out_features, layer.in_features


def check_float_weight(layer: SlimLinear, name: str, dtype: torch.dtype | None, shape: tuple, file) -> None:
    """Raise unless a checkpoint's float weight (quantized on load) fits `layer`."""
    if dtype is not None and not dtype.is_floating_point:
        raise ValueError(
            f"{file}: tensor {name} is {dtype}, not a float weight: is this a quantized checkpoint whose config.json lost "
            "its quantization_config? Re-save it, or load the float model"
        )
    if tuple(shape) != float_weight_shape(layer):
        raise ValueError(shape_message(file, name, tuple(shape), float_weight_shape(layer)))


def shape_message(file, name: str, shape: tuple, expected: tuple) -> str:
    return (
        f"{file}: tensor {name} has shape {tuple(shape)}, the model expects {tuple(expected)}: the checkpoint does not "
        "match its config.json: re-download or re-save it"
    )


def quant_tensor_message(file, name: str, dtype, shape: tuple, expected: torch.Tensor) -> str:
    return (
        f"{file}: tensor {name} is {dtype} {tuple(shape)} but the llmslim config expects {expected.dtype} "
        f"{tuple(expected.shape)}: the checkpoint's tensors do not match its quantization_config: re-create it with "
        "`llmslim quantize` or load the float model with a SlimConfig"
    )


def extra_tensor_message(file, name: str, module_name: str, layer: SlimLinear, pre_quantized: bool) -> str:
    if pre_quantized:
        holds, config = sorted(layer.state_dict(keep_vars=True)), "its quantization_config"
    else:
        holds, config = ["weight"] + (["bias"] if layer.bias is not None else []), "its config.json (a float model)"
    return (
        f"{file}: tensor {name} is not part of the {layer.fmt} layer {module_name}, which loads {holds}: the checkpoint's "
        f"tensors do not match {config}: re-create it with `llmslim quantize` or load the float model with a SlimConfig"
    )


def missing_message(model: torch.nn.Module, missing: list[str], pre_quantized: bool, source: str, files: list) -> str:
    """The error for tensors a checkpoint lacks (named as the checkpoint would: a float layer's `weight`)."""
    layers = dict(quantized_layers(model))

    def checkpoint_name(name: str) -> str:
        module_name, _, tensor_name = name.rpartition(".")
        return f"{module_name}.weight" if module_name in layers and not pre_quantized and tensor_name != "bias" else name

    names = list(dict.fromkeys(checkpoint_name(n) for n in missing))
    shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
    read = ", ".join(Path(f).name for f in files[:3]) + (f" and {len(files) - 3} more" if len(files) > 3 else "")
    if pre_quantized and any(n.rpartition(".")[0] in layers for n in missing):
        return (
            f"{source}: the checkpoint does not match its llmslim quantization config: no data for {shown} in {read}. "
            "Re-create it with `llmslim quantize` or load the float model with a SlimConfig."
        )
    return f"{source}: the checkpoint has no data for {shown} in {read}: is it the right model for its config.json? Re-download it"
