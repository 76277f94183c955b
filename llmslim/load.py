"""Streaming, bounded-memory loading of a causal LM into llmslim's compressed layers.

config.json -> meta-device skeleton -> layers replaced per SlimConfig -> for each tensor of each
shard, in order: read (pread, so the file is never mapped into this process) -> quantize or cast
-> place on its device -> free. Peak host memory is the compressed model plus about one source
tensor, never the full-precision model.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from tqdm.auto import tqdm
from transformers import AutoConfig, PreTrainedModel

from llmslim import models
from llmslim.calibrate import CALIBRATION_TOKENS, calibrate_, calibration_ids
from llmslim.compress.load import prepare_compression
from llmslim.config import QUANT_METHOD, SlimConfig
from llmslim.hf import checks, compat
from llmslim.hf.attention import use_prompt_attention
from llmslim.hf.decode import use_lean_layers
from llmslim.hf.quantizer import enable_peft_if_installed
from llmslim.memory.blocks import find_blocks
from llmslim.memory.trim import release_free_memory
from llmslim.placement import DevicePlan, plan_devices
from llmslim.quant import kernels, mixed
from llmslim.quant.experts import ExpertAssembler, expert_stores, quantized_experts, replace_experts
from llmslim.quant.head import apply_decode_head
from llmslim.quant.modules import SlimLinear, prepare_skeleton, quantization_targets

logger = logging.getLogger(__name__)

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"


def from_pretrained(
    model: str | Path | None = None,
    config: SlimConfig | None = None,
    *,
    dtype: torch.dtype | str | None = None,
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    offload_dir: str | Path | None = None,
    offload: str | None = None,
    offload_budget: int | str | None = None,
    force: bool = False,
    progress: bool = True,
    calibration_text: str | Path | None = None,
    calibration_tokens: int = CALIBRATION_TOKENS,
) -> PreTrainedModel:
    """Load a causal LM (or a masked LM or bare encoder such as BERT), compressing it on the fly, with bounded memory.

    Args:
        model: a local Hugging Face folder, a `.gguf` file, or None for the embedded default model.
        config: how to compress it. Not needed for a checkpoint saved by llmslim (its config is read).
        dtype: dtype of the layers kept in float (default: the checkpoint's).
        device_map: `"cpu"`, `"cuda"`, `"auto"` or an accelerate device map (module -> device).
        max_memory: per-device budget for `device_map="auto"`, e.g. `{0: "6GiB", "cpu": "20GiB"}`.
        offload_dir: folder for the (already quantized) weights of modules the device map sends to
            `"disk"`; they are read back layer by layer during the forward pass.
        offload: `"cpu"` or `"disk"`: decoder blocks beyond `offload_budget` stay quantized in CPU
            RAM or on disk (mapped in place from a quantized llmslim checkpoint, else written once to
            `offload_dir`) and are streamed to the compute device (`device_map`) block by block,
            the next one prefetched (`llmslim.offload`).
        offload_budget: bytes (or a size such as `"6GiB"`) of weights allowed on the compute
            device with `offload`; default: most of its free memory.
        force: load even when the planned peak exceeds the memory the load may use (preflight,
            `llmslim.plan.preflight`), which otherwise raises `PreflightError` with the numbers.
        progress: show a tqdm bar over the tensors read.
        calibration_text: with `config.method="gptq"`: a UTF-8 file or folder of them to calibrate on (default: the
            Tiny Shakespeare text shipped with llmslim). A checkpoint already quantized is never recalibrated.
        calibration_tokens: tokens of calibration text, in sequences of 512 (default 65536).

    Returns:
        An ordinary `PreTrainedModel` in eval mode, with llmslim layers where the config asked.
    """
    path = models.resolve(model)
    hf_config = _read_config(path)
    config, pre_quantized = _effective_config(path, hf_config, config)
    dtype = _float_dtype(dtype, hf_config)
    if config.method == "gptq" and not pre_quantized:
        return _calibrated(path, hf_config, config, dtype, device_map, force, progress, calibration_text, calibration_tokens)
    files = checkpoint_files(path)

    skeleton = _empty_model(hf_config, dtype)
    if config.needs_mixed_choice:
        config = _choose_int8_layers(skeleton, config, files)
    copies = compat.untie_int8_head(skeleton, config)  # a tied head named in int8_layers: quantized from the embedding
    prepare_skeleton(skeleton, config)
    replace_experts(skeleton, config)
    router = prepare_compression(skeleton, config, path, pre_quantized)
    plan = plan_devices(skeleton, device_map, max_memory, offload_dir)
    if offload is not None:
        from llmslim.offload.placement import expert_offload_plan, offload_plan

        if any(True for _ in quantized_experts(skeleton)):  # MoE: the experts leave the compute device, nothing else
            plan = expert_offload_plan(skeleton, plan, offload, offload_dir, files, pre_quantized)
        else:
            plan = offload_plan(skeleton, plan, offload, offload_budget, offload_dir, files, pre_quantized)
    from llmslim.plan.preflight import check_fits

    check_fits(skeleton, plan, files, max_memory, force, path)

    loader = _Loader(skeleton, plan, pre_quantized, path, progress, router, copies)
    for file in files:
        loader.load_file(file)
    loader.finish()
    config = router.finish(config) if router is not None else config
    return _finish_model(skeleton, config, plan, path)


def _empty_model(hf_config, dtype: torch.dtype) -> PreTrainedModel:
    """The model `hf_config` describes, its weights on the meta device (buffers such as rotary tables are real)."""
    with init_empty_weights(include_buffers=False):
        return compat.auto_class(hf_config).from_config(hf_config, dtype=dtype)


def _calibrated(
    path: Path, hf_config, config: SlimConfig, dtype: torch.dtype, device_map, force: bool, progress: bool, text, tokens: int
) -> PreTrainedModel:
    """GPTQ in bounded memory: everything outside the decoder blocks is read first; then each block is read from the
    checkpoint in float (MoE experts held in float by their quantized stores until calibrated), calibrated and
    quantized (`calibrate_`) before the next is read. Peak: the quantized model, one float block (with a MoE block's
    per-expert Hessians), and the calibration hidden states at one block boundary."""
    if config.compresses:
        raise ValueError("method='gptq' cannot be combined with embedding factorization or layer sharing yet: use method='rtn'")
    tokenizer = models.load_tokenizer(path, needed_for="method='gptq' (it tokenizes the calibration text)")
    ids = calibration_ids(tokenizer, text, tokens)  # bad text fails here, before the weights are read
    files = checkpoint_files(path)
    model = _empty_model(hf_config, dtype)
    if config.needs_mixed_choice:
        config = _choose_int8_layers(model, config, files)
    copies = compat.untie_int8_head(model, config)
    replace_experts(model, config)
    for _, store in quantized_experts(model):
        store.floats = {}  # the experts stream in as float weights, quantized when their block is calibrated
    quantized = _empty_model(hf_config, dtype)  # what the load ends as: planned and checked against free memory
    compat.untie_int8_head(quantized, config)
    prepare_skeleton(quantized, config)
    replace_experts(quantized, config)
    plan = plan_devices(quantized, device_map, None)
    from llmslim.plan.preflight import check_fits

    check_fits(quantized, plan, files, None, force, path)
    del quantized
    loader = _Loader(model, plan, False, path, False, None, copies)
    blocks_name, _ = find_blocks(model)
    block_of = _block_index(model.base_model_prefix, blocks_name)
    for file in files:
        loader.load_file(file, keep=lambda key: block_of(key) is None)

    def read_block(index: int) -> None:
        for file in files:
            loader.load_file(file, keep=lambda key: block_of(key) == index)

    calibrate_(model, config, ids, progress=progress, read_block=read_block)
    loader.finish()
    return _finish_model(model, config, plan, path)


def _block_index(prefix: str, blocks_name: str):
    """A function: checkpoint key -> the index of the decoder block it belongs to, or None (embeddings, norm, head)."""
    pattern = re.compile(rf"{re.escape(blocks_name)}\.(\d+)\.")

    def index(key: str) -> int | None:
        for name in (key, f"{prefix}.{key}", key.removeprefix(f"{prefix}.")):
            match = pattern.match(name)
            if match:
                return int(match.group(1))
        return None

    return index


def _read_config(path: Path):
    file = path / "config.json"
    try:
        json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON ({err}): re-download or re-save the model") from err
    return AutoConfig.from_pretrained(path)


def _effective_config(path: Path, hf_config, config: SlimConfig | None) -> tuple[SlimConfig, bool]:
    saved = getattr(hf_config, "quantization_config", None)
    if saved is None:
        if config is None:
            raise ValueError(
                f"{path} holds a float model: pass a SlimConfig, e.g. SlimConfig(weights='nf4') "
                "(SlimConfig(weights=None) loads it unquantized)"
            )
        return config, False
    saved = saved if isinstance(saved, dict) else saved.to_dict()
    if saved.get("quant_method") != QUANT_METHOD:
        raise ValueError(
            f"{path} is quantized with {saved.get('quant_method')!r}, not llmslim: load it with "
            "transformers' from_pretrained, or start from the float model"
        )
    saved_config = SlimConfig.from_dict(saved)
    if config is not None and config.to_dict() != saved_config.to_dict():
        raise ValueError(
            f"{path} is already quantized with {saved_config!r}, which differs from the requested {config!r}: "
            "load it without a config, or quantize the float model instead"
        )
    return saved_config, True


def _choose_int8_layers(skeleton: PreTrainedModel, config: SlimConfig, files: list[Path]) -> SlimConfig:
    """Mixed int4/int8: measure each layer's int4 error from the checkpoint (one extra read, one
    weight at a time), then pick the int8 layers for the budget."""
    targets = {f"{name}.weight": module for name, module in quantization_targets(skeleton, config, compat.tied_module_names(skeleton))}
    prefix = skeleton.base_model_prefix

    def weights():
        for file in files:
            for key, read in _checked(file, _iter_tensors(file)):
                name = next((n for n in (key, f"{prefix}.{key}", key.removeprefix(f"{prefix}.")) if n in targets), None)
                if name is not None:
                    yield name.removesuffix(".weight"), mixed.oriented(targets[name], read())

    return mixed.choose_int8_layers(weights(), config)


def _float_dtype(dtype: torch.dtype | str | None, hf_config) -> torch.dtype:
    if dtype is None:
        dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None) or torch.float32
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"dtype must be a torch dtype name such as 'bfloat16', got {dtype!r}")
        dtype = getattr(torch, dtype)
    return dtype


def checkpoint_files(path: Path) -> list[Path]:
    """The weight files of a Hugging Face folder, safetensors first, in shard order."""
    for index_name in (SAFETENSORS_INDEX, PICKLE_INDEX):
        index = path / index_name
        if index.exists():
            return _indexed_shards(index)
    for pattern in ("*.safetensors", "*.bin"):
        files = sorted(path.glob(pattern))
        if files:
            return files
    raise FileNotFoundError(f"no *.safetensors or *.bin weights in {path}: is it a Hugging Face model folder?")


def checkpoint_tensors(path: Path, keep: Callable[[str], bool]) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor on the CPU) of the tensors of the checkpoint in folder `path` whose key `keep` accepts, read one at
    a time; a damaged shard raises a ValueError that names it."""
    for file in checkpoint_files(path):
        for key, read in _checked(file, _iter_tensors(file)):
            if keep(key):
                yield key, read()


def _indexed_shards(index: Path) -> list[Path]:
    """The shard files a `*.index.json` names, each checked to exist."""
    try:
        weight_map = json.loads(index.read_text()).get("weight_map")
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{index} is not valid JSON ({err}): re-download or re-save the model") from err
    except AttributeError:
        weight_map = None  # valid JSON, not an object
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f'{index} has no "weight_map" object (tensor name -> shard file): re-download or re-save the model')
    files = [index.parent / name for name in sorted(set(weight_map.values()))]
    absent = [f.name for f in files if not f.is_file()]
    if absent:
        raise FileNotFoundError(f"{index} lists shards {absent[:3]} that do not exist in {index.parent}: re-download the missing files")
    return files


@dataclass
class _Target:
    module: torch.nn.Module
    name: str  # parameter or buffer name within the module
    full_name: str


class _Loader:
    """Reads checkpoint tensors one at a time into a skeleton model."""

    def __init__(
        self, model: PreTrainedModel, plan: DevicePlan, pre_quantized: bool, source: Path, progress: bool, router=None, copies=None
    ):
        self.model = model
        self.copies = copies or {}  # checkpoint tensor name -> another tensor loaded from it (an untied int8 head)
        self.router = router  # llmslim.compress: takes the tensors it factorizes or shares
        self.plan = plan
        self.pre_quantized = pre_quantized
        self.source = source
        self.expected = dict(model.state_dict(keep_vars=True))
        self.prefix = model.base_model_prefix
        self.unexpected: list[str] = []
        self.offloaded: set[str] = set()  # written to the offload folder, left on meta here
        self.files: list[Path] = []
        self.bar = tqdm(total=len(self.expected), desc="llmslim: loading", unit="tensor", disable=None if progress else True)
        self.experts = None if pre_quantized else ExpertAssembler(model, self._experts_complete)
        self.rename = compat.transformers_renaming(model)  # per-expert float tensors -> stacked quantized

    def load_file(self, file: Path, keep: Callable[[str], bool] | None = None) -> None:
        """Read the tensors of `file` (only the keys `keep` accepts, when given) into the model."""
        if file not in self.files:
            self.files.append(file)
        for key, read in _checked(file, _iter_tensors(file)):
            if keep is not None and not keep(key):
                continue
            self.bar.update()
            if self.router is not None and self.router.take(key, read, self.plan.device_for):
                continue
            if self.experts is not None and self.experts.take(key, read, self._expert_device):
                continue
            target = self._target(key)
            if target is None:
                self._check_unexpected(key, file)
                self.unexpected.append(key)
                continue
            if self._mapped_in_place(target.full_name):
                self.plan.names.add(target.full_name)
                self.offloaded.add(target.full_name)
                continue
            tensor = read()
            self._load_tensor(target, tensor, file)
            if target.full_name in self.copies:
                self._load_tensor(self._target(self.copies[target.full_name]), tensor, file)
            release_free_memory()  # the read and its temporaries are freed: keep the heap from holding them

    def _expert_device(self, name: str):
        """Where a quantized experts parameter is assembled: its device, or the CPU when it is offloaded (handed to
        the plan's store once complete, `_experts_complete`)."""
        device = self.plan.device_for(name)
        return torch.device("cpu") if device == "disk" else device

    def _experts_complete(self, name: str, store) -> None:
        if self.plan.device_for(name) != "disk":
            return
        module_name = name.rpartition(".")[0]
        for stored in store.names.values():
            full_name = f"{module_name}.{stored}"
            tensor = getattr(store.module, stored)
            self.plan.offload(full_name, tensor)
            self.offloaded.add(full_name)
            _assign(store.module, stored, torch.empty(tensor.shape, dtype=tensor.dtype, device="meta"), tensor)

    def _mapped_in_place(self, name: str) -> bool:
        """A tensor of a quantized checkpoint that an offload plan maps from the file itself: not read now."""
        return self.pre_quantized and self.plan.device_for(name) == "disk" and getattr(self.plan, "source_files", None) is not None

    def _target(self, key: str) -> _Target | None:
        renamed, converted = self.rename(key)  # transformers' own renamings (e.g. Mixtral's block_sparse_moe -> mlp)
        candidates = (key, f"{self.prefix}.{key}", key.removeprefix(f"{self.prefix}.")) + (() if converted else tuple(renamed))
        for name in candidates:
            if name in self.expected:
                module_name, _, tensor_name = name.rpartition(".")
                return _Target(self.model.get_submodule(module_name), tensor_name, name)
        return None

    def _check_unexpected(self, key: str, file: Path) -> None:
        """A tensor the model has no place for is ignored, unless it belongs to a quantized layer (a stray or foreign
        quantization tensor: the layer would silently run without it)."""
        for name in (key, f"{self.prefix}.{key}", key.removeprefix(f"{self.prefix}.")):
            module_name = name.rpartition(".")[0]
            try:
                layer = self.model.get_submodule(module_name)
            except AttributeError:
                continue
            if isinstance(layer, SlimLinear):
                raise ValueError(checks.extra_tensor_message(file, name, module_name, layer, self.pre_quantized))

    def _load_tensor(self, target: _Target, tensor: torch.Tensor, file: Path) -> None:
        device = self.plan.device_for(target.full_name)
        module = target.module
        store = expert_stores(module).get(target.name)
        if store is not None and not self.pre_quantized:  # a fused float 3-D experts parameter (gpt-oss, v5 saves)
            store.set_float_weight(tensor.to(self._expert_device(target.full_name)), target.full_name)
            self._experts_complete(target.full_name, store)
            return
        if isinstance(module, SlimLinear) and not self.pre_quantized and target.name == "weight":
            checks.check_float_weight(module, target.full_name, tensor.dtype, tuple(tensor.shape), file)
            if device == "disk":
                prefix = target.full_name.rpartition(".")[0]
                for name, value in module.quantize(tensor).items():
                    self.plan.offload(f"{prefix}.{name}", value)
                    self.offloaded.add(f"{prefix}.{name}")
            else:
                module.set_float_weight(tensor.to(device))
            return
        expected = self.expected[target.full_name]
        if isinstance(module, SlimLinear) and self.pre_quantized and (tensor.dtype, tensor.shape) != (expected.dtype, expected.shape):
            raise ValueError(checks.quant_tensor_message(file, target.full_name, tensor.dtype, tuple(tensor.shape), expected))
        if tensor.is_floating_point() and not isinstance(module, SlimLinear):
            tensor = tensor.to(expected.dtype)  # the skeleton's dtype (honours modules kept in float32)
        if tensor.shape != expected.shape:
            raise ValueError(checks.shape_message(file, target.full_name, tuple(tensor.shape), tuple(expected.shape)))
        if device == "disk":
            self.plan.offload(target.full_name, tensor)
            self.offloaded.add(target.full_name)
        else:
            tensor = tensor.to(device)
            _assign(module, target.name, kernels.aligned(tensor) if isinstance(module, SlimLinear) else tensor, expected)

    def finish(self) -> None:
        self.bar.close()
        if self.unexpected:
            logger.info("ignored %d checkpoint tensors the model does not use: %s", len(self.unexpected), self.unexpected[:5])
        self.model.tie_weights()
        experts = self.experts.missing() if self.experts is not None else []
        if experts:
            raise ValueError(checks.missing_message(self.model, experts, self.pre_quantized, str(self.source), self.files))
        missing = [n for n, t in self.model.state_dict(keep_vars=True).items() if t.is_meta and n not in self.offloaded]
        if missing:
            raise ValueError(checks.missing_message(self.model, missing, self.pre_quantized, str(self.source), self.files))


class _CorruptFile(Exception):
    pass


def _iter_tensors(file: Path):
    """(key, read) pairs of a checkpoint file; `read()` returns the tensor on the CPU."""
    if file.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(file), framework="pt", backend="pread") as handle:
                for key in handle.keys():
                    yield key, _guard(lambda k=key: handle.get_tensor(k), (SafetensorError, OSError, RuntimeError))
        except (SafetensorError, OSError) as err:
            raise _CorruptFile() from err
        return
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises several types for a bad pickle
        raise _CorruptFile() from err
    for key, value in state.items():
        yield key, lambda v=value: v


def _checked(file: Path, items):
    """`items` (from `_iter_tensors(file)`), turning a corrupt shard into a ValueError that says so."""

    def corrupt(err: _CorruptFile) -> ValueError:
        return ValueError(
            f"{file}: not a readable checkpoint shard ({err.__cause__}); it may be truncated or corrupt: re-download or re-save it"
        )

    def checked_read(read):
        try:
            return read()
        except _CorruptFile as err:
            raise corrupt(err) from err

    try:
        for key, read in items:
            yield key, lambda read=read: checked_read(read)
    except _CorruptFile as err:
        raise corrupt(err) from err


def _guard(read, errors):
    def guarded():
        try:
            return read()
        except errors as err:
            raise _CorruptFile() from err

    return guarded


def _assign(module: torch.nn.Module, name: str, tensor: torch.Tensor, expected: torch.Tensor) -> None:
    if name in module._parameters:
        requires_grad = expected.requires_grad and tensor.is_floating_point()
        module._parameters[name] = torch.nn.Parameter(tensor, requires_grad=requires_grad)
    else:
        module._buffers[name] = tensor


def _finish_model(model: PreTrainedModel, config: SlimConfig, plan: DevicePlan, source: Path) -> PreTrainedModel:
    for _, store in quantized_experts(model):
        store.own_memory()  # aligned as the transformers door leaves them: the same kernels, bit-identical logits
    compat.mark_quantized(model, config)
    apply_decode_head(model, config)
    use_lean_layers(model)
    use_prompt_attention(model)
    enable_peft_if_installed(model)
    model.config.name_or_path = str(source)
    plan.dispatch(model)
    if config.checkpointing != "none":
        from llmslim.memory.checkpointing import enable_checkpointing

        enable_checkpointing(model, config.checkpointing)
    return model.eval()
