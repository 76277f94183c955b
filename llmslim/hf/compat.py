"""Every use of transformers and peft internals, behind names llmslim owns.

transformers moves its internals between releases (tying, key renaming, the attention and quantizer
interfaces); llmslim reaches them only through this module, so a new transformers version is
adapted here. Public API (`from transformers import AutoConfig`, `from peft import LoraConfig`) may be
used anywhere; anything deeper is imported here and nowhere else (checked by the import-linter
contract in `pyproject.toml`).
"""

from __future__ import annotations

import copy
import logging
import re
from typing import TYPE_CHECKING, NamedTuple

import torch
import transformers
from packaging import version
from transformers import AttentionInterface, CompileConfig
from transformers.cache_utils import DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward, use_gqa_in_sdpa
from transformers.masking_utils import AttentionMaskInterface, create_causal_mask, sdpa_mask
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.pytorch_utils import Conv1D

if TYPE_CHECKING:
    from llmslim.config import SlimConfig

__all__ = [
    "AttentionInterface",
    "BaseModelOutputWithPast",
    "CompileConfig",
    "Conv1D",
    "create_causal_mask",
    "DynamicLayer",
    "sdpa_attention_forward",
    "use_gqa_in_sdpa",
]


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
    tied = tied_weights(model)
    names = set(tied) | set(tied.values())
    return {n.removesuffix(".weight") for n in names}


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
    tied = tied_weights(model)
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
    tied = tied_weights(model)
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


def transformers_renaming(model: torch.nn.Module):
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


def ignored_when_missing(model: torch.nn.Module, name: str) -> bool:
    """Tensors transformers fills without the checkpoint: tied ones, and those llmslim shares (`declare_shared`)."""
    tied = tied_weights(model)
    patterns = getattr(model, "_keys_to_ignore_on_load_missing", None) or []
    return name in tied or any(re.search(p, name) for p in patterns)


def mark_quantized(model: torch.nn.Module, config: SlimConfig) -> None:
    """Give a model quantized outside `from_pretrained` what transformers expects of a quantized one."""
    from transformers.quantizers import AutoHfQuantizer

    model.config.quantization_config = config
    model.hf_quantizer = AutoHfQuantizer.from_config(config, pre_quantized=True)  # llmslim's, registered by `import llmslim`
    model.is_quantized = True
    model.quantization_method = config.quant_method


def tied_weights(model: torch.nn.Module) -> dict[str, str]:
    """{tied tensor name: source tensor name} as transformers records them (the live dict: popping unties)."""
    tied = getattr(model, "all_tied_weights_keys", None)
    return tied if tied is not None else {}


def no_split_modules(model: torch.nn.Module) -> list[str]:
    """Module classes accelerate must keep on one device (a decoder block), as the model declares them."""
    return list(getattr(model, "_no_split_modules", None) or [])


def block_index(name: str, blocks_name: str) -> int | None:
    """The block a tensor or module belongs to: `block_index("model.layers.3.mlp.up_proj.weight", "model.layers")` is 3;
    None outside the blocks."""
    rest = name.removeprefix(f"{blocks_name}.")
    index = rest.split(".", 1)[0]
    return int(index) if rest != name and index.isdigit() else None


def transformers_checkpointing_active(model: torch.nn.Module) -> bool:
    """Whether transformers' own per-block activation checkpointing is on (`gradient_checkpointing_enable`)."""
    active = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5; before: is_gradient_checkpointing
    return bool(getattr(model, "is_gradient_checkpointing", False) if active is None else active)


def swap_model_class(module: torch.nn.Module, cls: type) -> None:
    """`module.__class__ = cls` for a transformers model, keeping what transformers registers by the class: which
    outputs (hidden states, attentions) its `capture_outputs` can record (a registry keyed on the class's name)."""
    from transformers.utils import output_capturing

    registry = getattr(output_capturing, "_CAN_RECORD_REGISTRY", None)
    flags = registry.get(module) if registry is not None else None
    module.__class__ = cls
    if flags:
        registry[module] = flags


def register_attention(name: str, function) -> None:
    """Register `function` as attention implementation `name`, its masks built as for "sdpa" (transformers builds no mask
    at all for an implementation without a mask function)."""
    AttentionInterface.register(name, function)
    AttentionMaskInterface.register(name, sdpa_mask)


def attn_implementation(config) -> str | None:
    """`config._attn_implementation`, read without PretrainedConfig's `__getattribute__` (about 2.5 us; the lean decode
    step reads it once per layer per token)."""
    return vars(config).get("_attn_implementation_internal")


def cpu_compile_config() -> CompileConfig:
    """A `CompileConfig` for `generate` that transformers also honours on CPU (it compiles on accelerators only unless told)."""
    config = CompileConfig(fullgraph=False, dynamic=False)
    config._compile_all_devices = True
    return config


# ---- peft (imported on use: `import llmslim` stays free of peft) ------------------------------


def peft_lora_linear() -> type:
    """peft's LoRA `Linear` layer class, the base of llmslim's LoRA layer."""
    from peft.tuners.lora.layer import Linear

    return Linear


def peft_dora() -> tuple[type, type]:
    """peft's DoRA pieces: the magnitude layer of a linear layer, and the LoRA variant that uses it."""
    from peft.tuners.lora.dora import DoraLinearLayer
    from peft.tuners.lora.variants import DoraLinearVariant

    return DoraLinearLayer, DoraLinearVariant


def adapters_to_merge(layer: torch.nn.Module, adapter_names: list[str] | None) -> list[str]:
    """The adapters of `layer` a merge applies to (peft's own selection and warnings)."""
    from peft.tuners.tuners_utils import check_adapters_to_merge

    return check_adapters_to_merge(layer, adapter_names)


def register_peft_custom_module(config, mapping: dict[type, type]):
    """Make peft wrap the layer types of `mapping` with the LoRA classes it maps them to (peft's documented
    `LoraConfig._register_custom_module`); returns `config`."""
    config._register_custom_module(mapping)
    return config


# peft versions whose private `LoraModel._create_new_module(lora_config, adapter_name, target, **kwargs)` the
# hook below was tested against (the installed one is tested by tests/hf/test_plain_peft.py)
PEFT_DISPATCH_VERSIONS = ("0.13", "1.0")


def install_peft_dispatch(dispatch, linear_names) -> bool:
    """Make every `get_peft_model` / `PeftModel.from_pretrained` try `dispatch(target, adapter_name, lora_config,
    **kwargs)` first (it returns the LoRA layer for a target it handles, None for the others: peft's own layers),
    and make `target_modules="all-linear"` also select the layers `linear_names(model)` names.

    peft chooses a LoRA layer class in the private static `LoraModel._create_new_module` (its public alternative,
    `LoraConfig._register_custom_module`, needs a call on every config the user makes), and resolves "all-linear"
    in the private `tuners_utils._maybe_include_all_linear_layers`, which takes `nn.Linear` subclasses only.
    Idempotent. Returns False (and logs why) when the installed peft is outside `PEFT_DISPATCH_VERSIONS` or lacks
    either function.
    """
    import inspect

    import peft
    from peft.tuners import tuners_utils
    from peft.tuners.lora.model import LoraModel

    current = getattr(LoraModel, "_create_new_module", None)
    if getattr(current, "_llmslim_dispatch", None) is dispatch:
        return True
    include = getattr(tuners_utils, "_maybe_include_all_linear_layers", None)
    low, high = (version.parse(v) for v in PEFT_DISPATCH_VERSIONS)
    fits = current is not None and include is not None and low <= version.parse(peft.__version__) < high
    if not fits or list(inspect.signature(current).parameters)[:3] != ["lora_config", "adapter_name", "target"]:
        logging.getLogger(__name__).warning(
            "peft %s is outside the versions llmslim hooks into (%s <= peft < %s): plain get_peft_model will not wrap "
            "llmslim's quantized layers; call llmslim.hf.lora.register_slim_layers(lora_config) on your LoraConfig",
            peft.__version__,
            *PEFT_DISPATCH_VERSIONS,
        )
        return False
    original = getattr(current, "_llmslim_original", current)
    original_include = getattr(include, "_llmslim_original", include)

    def _create_new_module(lora_config, adapter_name, target, **kwargs):
        module = dispatch(target, adapter_name, lora_config, **kwargs)
        return module if module is not None else original(lora_config, adapter_name, target, **kwargs)

    def _maybe_include_all_linear_layers(peft_config, model):
        targets = getattr(peft_config, "target_modules", None)
        all_linear = isinstance(targets, str) and targets.lower() == "all-linear"
        peft_config = original_include(peft_config, model)
        if all_linear:
            peft_config.target_modules = set(peft_config.target_modules) | set(linear_names(model))
        return peft_config

    _create_new_module._llmslim_dispatch = dispatch
    _create_new_module._llmslim_original = original
    _maybe_include_all_linear_layers._llmslim_original = original_include
    LoraModel._create_new_module = staticmethod(_create_new_module)
    tuners_utils._maybe_include_all_linear_layers = _maybe_include_all_linear_layers
    return True


def peft_base_layer(target: torch.nn.Module) -> torch.nn.Module:
    """The layer a peft tuner layer wraps (`target` itself when it is not one)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return target.get_base_layer() if isinstance(target, BaseTunerLayer) else target


# ---- mixture of experts (transformers.integrations.moe) -----------------------------------------

EXPERTS_IMPLEMENTATION = "llmslim"


def is_experts_module(module: torch.nn.Module) -> bool:
    """A module built with transformers' `use_experts_implementation` (it sets these attributes): fused
    3-D expert weights whose forward is dispatched through the experts interface."""
    return all(hasattr(module, a) for a in ("has_gate", "has_bias", "is_transposed", "num_experts")) and hasattr(module, "_apply_gate")


def use_llmslim_experts(model: torch.nn.Module, forward) -> None:
    """Register `forward` as transformers' experts implementation "llmslim" and select it for `model`
    (every experts module then calls it with `(self, hidden_states, top_k_index, top_k_weights)`)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, ExpertsInterface

    if ALL_EXPERTS_FUNCTIONS.get(EXPERTS_IMPLEMENTATION) is not forward:
        ExpertsInterface.register(EXPERTS_IMPLEMENTATION, forward)
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation(EXPERTS_IMPLEMENTATION)
    else:  # a bare experts-holding module: set it on the configs its experts read
        for module in model.modules():
            if is_experts_module(module) and getattr(module, "config", None) is not None:
                module.config._experts_implementation_internal = EXPERTS_IMPLEMENTATION


def save_with_model_names(model: torch.nn.Module) -> None:
    """Save `model` under its own tensor names: no reverse of transformers' checkpoint conversion mapping.

    That mapping splits fused 3-D experts back into one tensor per expert when saving; quantized
    experts are stacked codes and scales, which only llmslim's layout (the model's own names) holds.
    """
    model._weight_conversions = []


class ExpertSource(NamedTuple):
    """Where a per-expert checkpoint tensor goes: `name` (the fused parameter), `expert`, `part` of `parts`
    (gate 0 and up 1 of 2), and `span`, the position of the expert number in the checkpoint key."""

    name: str
    expert: int
    part: int
    parts: int
    span: tuple[int, int]


def expert_sources(model: torch.nn.Module):
    """key -> `ExpertSource` | None: where a per-expert checkpoint tensor goes in the fused 3-D
    experts parameters, from transformers' own checkpoint conversion mapping.

    A Hub checkpoint stores `...experts.3.w1.weight` (Mixtral) or `...experts.3.gate_proj.weight`; transformers
    stacks the experts (`MergeModulelist`) and concatenates gate and up (`Concatenate`) into `...experts.gate_up_proj`.
    `part` is the tensor's place in that concatenation (gate 0, up 1 of `parts` 2). Keys of other converters, and
    converters doing anything else, map to None (they load as they are).
    """
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import Concatenate, MergeModulelist, WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # another transformers 5.x layout: no per-expert checkpoints to convert
        return lambda key: None
    transforms = copy.deepcopy(get_model_conversion_mapping(model))
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter) and _stacks_experts(t, MergeModulelist, Concatenate)]
    meta_state = model.state_dict()
    prefix = model.base_model_prefix

    def source(key: str):
        name, pattern = rename_source_key(key, renamings, converters, prefix, meta_state)
        if pattern is None:
            return None
        converter = next(c for c in converters if pattern in c.source_patterns)
        match = re.search(re.escape(pattern).replace(r"\*", r"(\d+)"), key)
        if match is None:
            return None
        index = converter.source_patterns.index(pattern)
        return ExpertSource(name, int(match.group(1)), index, len(converter.source_patterns), match.span(1))

    return source


def _stacks_experts(converter, merge, concatenate) -> bool:
    """A converter that stacks per-expert 2-D tensors along dim 0, then (for several sources) concatenates along dim 1."""
    ops = converter.operations
    if not ops or not isinstance(ops[0], merge) or ops[0].dim != 0 or len(converter.target_patterns) != 1:
        return False
    if len(converter.source_patterns) == 1:
        return len(ops) == 1
    return len(ops) == 2 and isinstance(ops[1], concatenate) and ops[1].dim == 1
