"""The only module that touches transformers internals: llmslim's `HfQuantizer` and its registration.

After `import llmslim`, `from_pretrained(..., quantization_config=SlimConfig(...))` quantizes while
loading, and a checkpoint whose `config.json` says `quant_method: "llmslim"` loads pre-quantized.
"""

from __future__ import annotations

import copy
import logging
import re
from pathlib import Path
from typing import Any, NamedTuple

import torch
import transformers
from packaging import version
from transformers import PreTrainedModel
from transformers.core_model_loading import ConversionOps
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

from llmslim.config import QUANT_METHOD, SlimConfig
from llmslim.quant.modules import SlimLinear, quantized_layers, replace_linear_modules
from llmslim.quant.registry import FORMATS

logger = logging.getLogger(__name__)

is_transformers_ge_v5 = version.parse(transformers.__version__).major >= 5


CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
MASKED_SUFFIXES = ("ForMaskedLM", "ForPreTraining")


def detect_objective(hf_config) -> tuple[str, bool]:
    """("causal" | "masked", has an LM head) from the architectures a config names."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    archs = hf_config.architectures or []
    if any(a.endswith(CAUSAL_SUFFIXES) for a in archs):
        return "causal", True
    if any(a.endswith(MASKED_SUFFIXES) for a in archs):
        return "masked", True
    if hf_config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(hf_config, "is_decoder", False):
        return "masked", False  # a bare encoder such as BertModel (sentence-transformers)
    return "causal", True


def auto_class(hf_config):
    """The transformers Auto class for a checkpoint: causal LM, masked LM, or a bare encoder (`AutoModel`)."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM

    objective, has_head = detect_objective(hf_config)
    if objective == "causal":
        return AutoModelForCausalLM
    return AutoModelForMaskedLM if has_head else AutoModel


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


def check_checkpoint_files(model: torch.nn.Module, files: list, pre_quantized: bool, source: str) -> None:
    """Check a checkpoint against `model`'s llmslim layers before any weight is read, from the shards' headers.

    Every safetensors shard must be complete; each llmslim layer's tensors must all be there, none more, in the
    dtype and shape the layer expects (a float `weight` for a float checkpoint quantized on load). transformers
    would only report a missing tensor as "newly initialized" (a zero or random buffer), ignore an extra one and
    cast one of the wrong dtype. (A pickled `.bin` shard torch cannot map is left to transformers.)

    Raises:
        ValueError: naming the file, the tensor, what was found and what was expected.
    """
    from llmslim.offload.store import safetensors_index  # offload/ sits above this module

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
    missing = [n for n in expected if n not in found and not _ignored_when_missing(model, n)]
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
    rename = _transformers_renaming(model)
    found = {}
    for file, index in headers.items():
        for key, loc in index.items():
            names, converted = rename(key)
            for name in names:
                found[name] = (file, None if converted else loc)
    return found


def _transformers_renaming(model: torch.nn.Module):
    """key -> ([model names], converted): transformers' own renaming of checkpoint keys for this model."""
    meta_state = model.state_dict()
    prefix = model.base_model_prefix
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # another transformers 5.x layout: names as saved, with or without the base-model prefix

        def plain(key: str) -> tuple[list[str], bool]:
            name = next((n for n in (key, f"{prefix}.{key}", key.removeprefix(f"{prefix}.")) if n in meta_state), key)
            return [name], False

        return plain
    transforms = copy.deepcopy(get_model_conversion_mapping(model))
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]

    def rename(key: str) -> tuple[list[str], bool]:
        name, pattern = rename_source_key(key, renamings, converters, prefix, meta_state)
        if name not in meta_state and key in meta_state:
            name, pattern = rename_source_key(key, [], [], prefix, meta_state)
        if pattern is None:
            return [name], False
        converter = next(c for c in converters if pattern in c.source_patterns)
        return [name.replace(converter.target_patterns[0], target) for target in converter.target_patterns], True

    return rename


def _ignored_when_missing(model: torch.nn.Module, name: str) -> bool:
    """Tensors transformers fills without the checkpoint: tied ones, and those llmslim shares (`declare_shared`)."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    patterns = getattr(model, "_keys_to_ignore_on_load_missing", None) or []
    return name in tied or any(re.search(p, name) for p in patterns)


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


FACTORIZED_HEAD_KEY = "llmslim_factorized_head"  # config.json: the head computes its logits through the embedding's factors


def untie_embeddings(model: torch.nn.Module, factorized_head: bool) -> None:
    """Stop transformers from tying the output head to the input embedding (after llmslim replaced either).

    Args:
        model: the model.
        factorized_head: the head is now tied through the embedding's factors (recorded in the
            config, so that a saved model is rebuilt the same way).
    """
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        config.tie_word_embeddings = False
    setattr(model.config, FACTORIZED_HEAD_KEY, factorized_head)
    embedding = next((n for n, m in model.named_modules() if m is model.get_input_embeddings()), None)
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    for target, source in list(tied.items()):
        if embedding is not None and embedding in (target.rpartition(".")[0], source.rpartition(".")[0]):
            tied.pop(target)


def untie_int8_head(model: torch.nn.Module, config: SlimConfig) -> dict[str, str]:
    """Give an output head tied to the input embedding its own weight when `config.int8_layers`
    names it: the head becomes an int8 copy (half the bytes a bf16 head reads per decoded token)
    and the embedding stays as it is.

    Returns:
        {embedding weight name: head weight name}: the checkpoint tensor the head is quantized
        from (a tied checkpoint stores only the embedding); empty when nothing was untied.
    """
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if not config.int8_layers or head is None or embedding is None or not head_tied_to_embedding(model):
        return {}
    names = {id(m): n for n, m in model.named_modules()}
    head_name, embedding_name = names.get(id(head)), names.get(id(embedding))
    if head_name not in config.int8_layers:
        return {}
    untie_embeddings(model, factorized_head=False)
    if head.weight is embedding.weight and head.weight.is_meta:  # a skeleton: the loader fills the copy
        head.weight = torch.nn.Parameter(torch.empty_like(embedding.weight), requires_grad=False)
    return {f"{embedding_name}.weight": f"{head_name}.weight"}


def head_tied_to_embedding(model: torch.nn.Module) -> bool:
    """Whether the output head shares the input embedding's weight (already, or once transformers ties it)."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None:
        return False
    if head.weight is embedding.weight:
        return True
    names = {id(m): n for n, m in model.named_modules()}
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return tied.get(f"{names.get(id(head))}.weight") == f"{names.get(id(embedding))}.weight"


def has_factorized_head(model: torch.nn.Module) -> bool:
    """Whether the model's config records a head computed through a factorized embedding."""
    return bool(getattr(model.config, FACTORIZED_HEAD_KEY, False))


def declare_shared(model: torch.nn.Module, pairs: dict[str, str]) -> None:
    """Declare tensors shared by llmslim's layer sharing, {member name: source name}.

    transformers then saves each shared tensor once, under the source name (its save path drops
    the names listed in a module's `_tied_weights_keys`), and does not report the members'
    tensors as missing when loading.
    """
    # Loading, transformers must neither report the members' tensors as missing nor tie them itself (its tying
    # resizes a bias to the weight's first dimension, wrong for Conv1D and packed quantized weights): the modules are
    # shared by llmslim (`llmslim.compress.load.share_loaded_`).
    ignored = list(getattr(model, "_keys_to_ignore_on_load_missing", None) or [])
    model._keys_to_ignore_on_load_missing = list(dict.fromkeys(ignored + [f"^{re.escape(name)}$" for name in pairs]))
    by_module: dict[str, dict[str, str]] = {}
    for target, source in pairs.items():
        owner, leaf = _split_block(target)
        by_module.setdefault(owner, {})[leaf] = source
    for owner, keys in by_module.items():
        block = model.get_submodule(owner)
        block._tied_weights_keys = {**(getattr(block, "_tied_weights_keys", None) or {}), **keys}


def _split_block(name: str) -> tuple[str, str]:
    """The block and the rest of a tensor name: "model.layers.3.mlp.up_proj.weight" -> ("model.layers.3", "mlp.up_proj.weight")."""
    parts = name.split(".")
    index = next(i for i, p in enumerate(parts) if p.isdigit())
    return ".".join(parts[: index + 1]), ".".join(parts[index + 1 :])


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
        module_name, _, tensor_name = param_name.rpartition(".")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            return False
        return isinstance(module, SlimLinear) and tensor_name == "weight"

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
        self.quantized_modules = prepare_skeleton(model, self.quantization_config)
        if self.pre_quantized and self.quantization_config.compresses:
            from llmslim.compress.load import prepare_compression  # compress/ sits above this module

            prepare_compression(model, self.quantization_config, pre_quantized=True, tie_now=False)
            _skip_init_of_shared_members(model)
        check_checkpoint_files(model, checkpoint_files, self.pre_quantized, getattr(model.config, "_name_or_path", "model"))
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        check_loaded(model, getattr(model.config, "_name_or_path", "model"))
        for _, layer in quantized_layers(model):
            layer.own_memory()
        if self.quantization_config.compresses:
            self.quantization_config = _compress_loaded(model, self.quantization_config, self.pre_quantized)
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
        from llmslim.compress.load import share_loaded_  # compress/ sits above this module

        if config.share_layers is not None:
            share_loaded_(model, config)
        return config
    from llmslim.compress.apply import compress_

    return compress_(model, config)


def register() -> None:
    """Make transformers aware of `quant_method="llmslim"` (idempotent)."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(SlimConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(SlimHfQuantizer)
