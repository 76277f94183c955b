"""Calibrated quantization (`SlimConfig(method="gptq")`): GPTQ block by block on calibration text.

`calibrate_(model, config, input_ids)` quantizes a float model in place. The calibration sequences
run through the decoder blocks one block at a time: the block's selected linear layers collect the
Hessian of their inputs (`quant.gptq.HessianAccumulator`; layers fed the same tensor share one),
each group of layers that reads one input has its input channels balanced first (`_balance_block`: AWQ-style
scales folded into the norm or up projection before it), each is quantized by GPTQ into its format
(`quant.gptq.gptq_codes`), then the quantized block runs
again to give the next block its inputs, so each block is calibrated on what the quantized blocks
before it produce. On a CPU the blocks run in bf16 while they are calibrated where the CPU multiplies
bf16 in hardware (AVX-512 BF16 or AMX: 2.8x float32's speed for a 1.1B-shape block), in float32 elsewhere
(emulated bf16 is several times slower than float32), and are put back in their own dtypes after; the
Hessians always add up in float32. Layers outside the blocks (an int8 head) and fused MoE experts are quantized by
round-to-nearest, as `quantize_` does (the experts first, so the blocks after them see quantized experts).

With `read_block`, the blocks may start empty (on the meta device): `read_block(i)` fills block i just before it
is calibrated, so only one block is ever in float (`llmslim.from_pretrained` streams them from the checkpoint).

`calibration_ids(tokenizer, ...)`: the calibration sequences, by default from the Tiny Shakespeare
text shipped with the package (never the evaluation text), seeded.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm.auto import tqdm

from llmslim.config import SlimConfig
from llmslim.data import TINY_SHAKESPEARE
from llmslim.hf import compat
from llmslim.memory.blocks import find_blocks
from llmslim.memory.trim import release_free_memory
from llmslim.quant import formats
from llmslim.quant.experts import SlimExpertWeights, expert_parameters, expert_stores, experts_modules, quantized_experts, replace_experts
from llmslim.quant.gptq import GptqSettings, HessianAccumulator, balance_scales, clipped_absmax, gptq_codes, output_error
from llmslim.quant.mixed import choose_int8_layers, oriented
from llmslim.quant.modules import SlimLinear, SlimLinear4bit, quantization_targets
from llmslim.quant.native import cpu_half_matmul_is_native

logger = logging.getLogger(__name__)

CALIBRATION_TOKENS = 65536
CALIBRATION_SEQ_LEN = 512


def read_calibration_text(source: str | Path | None = None) -> str:
    """The text of a UTF-8 file, or of every file in a folder (sorted, joined by blank lines); None: Tiny Shakespeare.

    Raises:
        FileNotFoundError: `source` does not exist, or is a folder without files.
        ValueError: a file is not UTF-8 (its name and the byte offset are given).
    """
    path = Path(source).expanduser() if source is not None else TINY_SHAKESPEARE
    if not path.exists():
        raise FileNotFoundError(f"calibration text {str(path)!r} does not exist: pass a UTF-8 text file or a folder of them")
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"calibration folder {str(path)!r} holds no files: put UTF-8 text files in it")
    texts = []
    for file in files:
        try:
            texts.append(file.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as err:
            raise ValueError(
                f"calibration text {str(file)!r} is not UTF-8 (byte {err.start}): convert it, e.g. `iconv -t UTF-8`, or leave it out"
            ) from None
    return "\n\n".join(texts)


def calibration_ids(
    tokenizer, source: str | Path | None = None, tokens: int = CALIBRATION_TOKENS, seq_len: int = CALIBRATION_SEQ_LEN, seed: int = 0
) -> torch.Tensor:
    """`tokens // seq_len` sequences of `seq_len` token ids `(n, seq_len)`, windows of the text at seeded random starts.

    Raises:
        ValueError: `tokens` or `seq_len` is not positive, or the text is shorter than one sequence.
    """
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"calibration sequence length must be a positive integer, got {seq_len!r}")
    if not isinstance(tokens, int) or tokens < seq_len:
        raise ValueError(f"calibration tokens must be an integer of at least one sequence ({seq_len}), got {tokens!r}")
    text = read_calibration_text(source)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)
    if ids.numel() < seq_len:
        raise ValueError(
            f"the calibration text holds {ids.numel()} tokens, fewer than one sequence of {seq_len}: give a longer text "
            "(--calibration-text) or a shorter sequence"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (tokens // seq_len,), generator=generator)
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


class _BlockInputs(Exception):
    """Raised by the first block's pre-hook once it has its inputs: nothing after it needs to run."""


@torch.no_grad()
def calibrate_(
    model: torch.nn.Module,
    config: SlimConfig,
    input_ids: torch.Tensor,
    progress: bool = True,
    read_block: Callable[[int], None] | None = None,
) -> list[str]:
    """Quantize the float transformers `model` in place with GPTQ on `input_ids` `(n, seq_len)`; returns the quantized names.

    Settings: `config.damp`, `config.act_order`, `config.balance` (and `config.int8_layers` already chosen when the blocks start empty).
    `read_block(i)`: fills block i of a model whose blocks start on the meta device. Memory: the model (the float
    model, or with `read_block` the quantized model and one float block), plus every sequence's hidden states at one
    block boundary and one block's Hessians.
    """
    if config.weights is None:
        return []
    compat.untie_int8_head(model, config)
    selected = quantization_targets(model, config, keep=compat.tied_module_names(model))
    if config.needs_mixed_choice:
        config = choose_int8_layers(((n, oriented(m, m.weight)) for n, m in selected), config)
    replaced = hold_float_experts_(model, config)
    training = model.training
    model.eval()  # calibration is inference: each quantized block runs as it will once loaded
    settings = GptqSettings(damp=config.damp, act_order=config.act_order, balance=config.balance)
    blocks_name, blocks = find_blocks(model)
    states = _first_block_inputs(model, blocks[0], input_ids)
    work_dtype = calibration_dtype(model.get_input_embeddings().weight.device)
    if work_dtype is not None:
        for i, (args, kwargs) in enumerate(states):  # one sequence at a time: never every sequence in both dtypes
            states[i] = (_cast_floats(args, work_dtype), _cast_floats(kwargs, work_dtype))
    targets = dict(selected)  # each float layer leaves it once quantized, and with it goes its last reference
    del selected  # (holding them here would keep every streamed block's float weights: 0.08 GiB per 1.1B block)
    for index in tqdm(range(len(blocks)), desc="GPTQ", unit="block", disable=None if progress else True):
        if read_block is not None:
            read_block(index)
        prefix = f"{blocks_name}.{index}."
        dtypes = _tensor_dtypes(blocks[index])
        if work_dtype is not None:
            _cast_float_tensors(blocks[index], work_dtype)
        in_block = {name: module for name, module in targets.items() if name.startswith(prefix)}
        local = {name[len(prefix) :]: m for name, m in in_block.items()}
        experts = {prefix + name: store for name, store in quantized_experts(blocks[index]) if store.floats is not None}
        with _observing(experts) as expert_hessians:
            hessians = _collect_hessians(blocks[index], local, states)
        for name, store in experts.items():
            _gptq_experts(name, store, config.layer_spec(name), expert_hessians[name], settings)
        if settings.balance:
            _balance_block(blocks[index], local, hessians, states[0], lambda name, prefix=prefix: config.layer_spec(prefix + name))
        for name in list(in_block):  # each float layer, and a Hessian after its last layer, is let go once quantized
            module, hessian = in_block.pop(name), hessians.pop(name[len(prefix) :])
            del local[name[len(prefix) :]], targets[name]
            model.set_submodule(name, _gptq_layer(name, module, config.layer_spec(name), hessian, settings))
            replaced.append(name)
            del module, hessian
            release_free_memory()  # GPTQ's (in, in) temporaries: keep the heap from holding them for the next layer
        del hessians, expert_hessians, in_block, local
        release_free_memory()
        for i, (args, kwargs) in enumerate(states):  # in place: a sequence's inputs go once its outputs are there
            states[i] = (_run_block(blocks[index], args, kwargs), kwargs)
        _restore_dtypes(blocks[index], dtypes, lambda name, prefix=prefix: config.layer_spec(prefix + name).compute_dtype)
    for name, store in quantized_experts(model):  # experts outside the blocks (none in the models known): round-to-nearest
        if store.floats is not None:
            store.quantize_floats(name)
    for name, module in targets.items():  # outside the blocks: round-to-nearest
        spec = config.layer_spec(name)
        layer = spec.module_class().from_linear(module, spec, name)
        layer.set_float_weight(module.weight.data)
        _keep_bias(layer, module)
        model.set_submodule(name, layer)
        replaced.append(name)
    compat.mark_quantized(model, config)
    model.train(training)
    return replaced


def hold_float_experts_(model: torch.nn.Module, config: SlimConfig) -> list[str]:
    """Replace the float expert weights `config` quantizes with quantized stores that hold each expert's float weight
    (`SlimExpertWeights.floats`) until its block is calibrated; stores already in place (streamed in by
    `llmslim.from_pretrained`) are kept as they are. Returns the names of every quantized experts projection."""
    floats = {
        f"{name}.{proj}": module._parameters[proj].data
        for name, module in experts_modules(model)
        for proj in expert_parameters(module)
        if proj in module._parameters
    }
    replace_experts(model, config)
    names = []
    for name, store in quantized_experts(model):
        if name in floats:
            store.floats = dict(enumerate(floats[name].unbind(0)))
        names.append(name)
    return names


@contextmanager
def _observing(experts: dict[str, SlimExpertWeights]):
    """While in the block: for each experts projection of `experts`, a Hessian per expert of the inputs routed to it
    ({name: {expert: HessianAccumulator}}; an expert no calibration token chose has none)."""
    hessians: dict[str, dict[int, HessianAccumulator]] = {name: {} for name in experts}

    def observer(found: dict[int, HessianAccumulator]):
        def add(expert: int, x: torch.Tensor) -> None:
            accumulator = found.get(expert)
            if accumulator is None:
                accumulator = found[expert] = HessianAccumulator(x.shape[-1], x.device)
            accumulator.add(x)

        return add

    for name, store in experts.items():
        store.observer = observer(hessians[name])
    try:
        yield hessians
    finally:
        for store in experts.values():
            store.observer = None


def _gptq_experts(name: str, store: SlimExpertWeights, spec, hessians: dict[int, HessianAccumulator], settings: GptqSettings) -> None:
    """Quantize every expert `store` holds in float: by GPTQ on the Hessian of the tokens routed to it (each expert a
    dense layer of the format), by round-to-nearest where no calibration token chose it."""
    for index in sorted(store.floats):
        weight = store.floats.pop(index)
        hessian = hessians.get(index)
        if hessian is None:
            store.set_expert_tensors(index, store.expert_tensors(index, weight, name))
            continue
        linear = torch.nn.Linear(store.in_features, store.out_features, bias=False, device="meta", dtype=weight.dtype)
        linear.weight = torch.nn.Parameter(weight.t() if store.transposed else weight, requires_grad=False)
        layer = _gptq_layer(f"{name}[expert {index}]", linear, spec, hessian, settings)
        store.set_expert_tensors(index, layer.state_dict())
    store.floats = None
    logger.info("GPTQ: %s: %d of %d experts calibrated (the others saw no calibration token)", name, len(hessians), store.num_experts)


def _cast_float_tensors(block: torch.nn.Module, dtype: torch.dtype) -> None:
    """Cast `block`'s float parameters and buffers to `dtype`, leaving quantized tensors (quantized layers, quantized
    experts' stacked codes and scales) as they are."""
    for module in block.modules():
        if isinstance(module, SlimLinear):
            continue
        quantized = {stored for store in expert_stores(module).values() for stored in store.names.values()}
        for table in (module._parameters, module._buffers):
            for key, tensor in table.items():
                if tensor is not None and key not in quantized and tensor.is_floating_point() and tensor.dtype != dtype:
                    converted = tensor.data.to(dtype)
                    table[key] = (
                        torch.nn.Parameter(converted, requires_grad=tensor.requires_grad) if table is module._parameters else converted
                    )


def calibration_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype blocks compute in while calibrated on `device`: None (their own) off the CPU; on a CPU bf16 where it
    multiplies bf16 in hardware, float32 where bf16 is emulated."""
    if device.type != "cpu":
        return None
    return torch.bfloat16 if cpu_half_matmul_is_native() else torch.float32


def _first_block_inputs(model: torch.nn.Module, first: torch.nn.Module, input_ids: torch.Tensor) -> list[tuple[tuple, dict]]:
    """Per sequence, the (args, kwargs) the first block is called with (hidden states, mask, positions, rotary tables)."""
    captured: list[tuple[tuple, dict]] = []

    def grab(module, args, kwargs):
        captured.append((args, {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value")}))
        raise _BlockInputs

    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for ids in input_ids.split(1):
            try:
                model(input_ids=ids.to(model.device), use_cache=False)
            except _BlockInputs:
                pass
    finally:
        handle.remove()
    return captured


def _cast_floats(value, dtype: torch.dtype):
    """`value` (a tensor, or a tuple/list/dict of them, nested) with its floating-point tensors cast to `dtype`."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_cast_floats(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _cast_floats(v, dtype) for k, v in value.items()}
    return value


def _tensor_dtypes(block: torch.nn.Module) -> dict[str, torch.dtype]:
    """The dtype of each of `block`'s parameters and buffers, by name."""
    named = [*block.named_parameters(remove_duplicate=False), *block.named_buffers(remove_duplicate=False)]
    return {name: tensor.dtype for name, tensor in named}


@torch.no_grad()
def _restore_dtypes(block: torch.nn.Module, dtypes: dict[str, torch.dtype], spec_dtype) -> None:
    """Put `block`'s float tensors back in the dtypes they had (`_tensor_dtypes`); its new quantized layers compute in
    their float weight's dtype, unless their spec sets one (`spec_dtype(name)`), and keep their quantized tensors."""
    for name, module in block.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, SlimLinear):
            module.compute_dtype = spec_dtype(name) or dtypes.get(f"{prefix}weight", module.compute_dtype)
            if module.bias is not None:
                module.bias = torch.nn.Parameter(module.bias.data.to(dtypes.get(f"{prefix}bias", module.bias.dtype)), requires_grad=False)
            continue
        for key, tensor in module._parameters.items():
            if tensor is not None and dtypes.get(prefix + key, tensor.dtype) != tensor.dtype:
                module._parameters[key] = torch.nn.Parameter(tensor.data.to(dtypes[prefix + key]), requires_grad=tensor.requires_grad)
        for key, tensor in module._buffers.items():
            if tensor is not None and dtypes.get(prefix + key, tensor.dtype) != tensor.dtype:
                module._buffers[key] = tensor.to(dtypes[prefix + key])


def _run_block(block: torch.nn.Module, args: tuple, kwargs: dict) -> tuple:
    out = block(*args, **kwargs)
    hidden = out[0] if isinstance(out, tuple) else out
    return (hidden, *args[1:])


def _collect_hessians(block: torch.nn.Module, layers: dict[str, torch.nn.Module], states: list) -> dict[str, HessianAccumulator]:
    """Run the float block over every sequence, adding each selected layer's inputs to its Hessian; layers fed the same
    tensor (q, k and v; gate and up) share one accumulator, computed once."""
    hessians: dict[str, HessianAccumulator] = {}
    seen: list[tuple[str, torch.Tensor]] = []

    def record(name):
        def hook(module, args):
            seen.append((name, args[0]))

        return hook

    handles = [module.register_forward_pre_hook(record(name)) for name, module in layers.items()]
    try:
        for args, kwargs in states:
            block(*args, **kwargs)
            by_tensor: dict[int, HessianAccumulator] = {}
            for name, x in seen:
                if name not in hessians:
                    shared = next((hessians[n] for n, y in seen if y is x and n in hessians), None)
                    hessians[name] = shared or HessianAccumulator(x.shape[-1], x.device)
                accumulator = hessians[name]
                if id(accumulator) not in by_tensor:
                    by_tensor[id(accumulator)] = accumulator
                    accumulator.add(x)
            seen.clear()
    finally:
        for handle in handles:
            handle.remove()
    missing = sorted(set(layers) - set(hessians))
    if missing:
        raise ValueError(f"GPTQ: layers {missing} were never called in their block's forward: they cannot be calibrated")
    return hessians


def _gptq_layer(name: str, module: torch.nn.Module, spec, hessian: HessianAccumulator, settings: GptqSettings) -> SlimLinear:
    """`module` quantized as `spec` says with GPTQ's codes, or round-to-nearest's where GPTQ's are not better."""
    layer = spec.module_class().from_linear(module, spec, name)
    weight = oriented(module, module.weight.data).float()  # (out, in)
    layer.set_float_weight(_clipped_weight(layer, weight, hessian, settings))  # fixes the scales GPTQ rounds against
    rtn_error = output_error(weight, layer.dequantized_weight(torch.float32), hessian.hessian)  # a number: no (out, in) copy kept
    rtn_codes = layer.state_dict()["weight"].clone()
    layer.set_codes(gptq_codes(weight, hessian.hessian, layer.grid(), settings, name))
    if output_error(weight, layer.dequantized_weight(torch.float32), hessian.hessian) > rtn_error:
        logger.info("GPTQ: %s keeps its round-to-nearest codes (lower output error on the calibration inputs)", name)
        layer._set_tensor("weight", rtn_codes)
    _keep_bias(layer, module)
    return layer


def _clipped_weight(layer: SlimLinear, weight: torch.Tensor, hessian: HessianAccumulator, settings: GptqSettings) -> torch.Tensor:
    """The weight whose round-to-nearest quantization sets the scales: for a blockwise 4-bit layer, each block clipped to
    its searched absmax (`clipped_absmax`; the format then stores that absmax, double-quantized as it would be),
    unless the block's inputs were balanced; the weight itself otherwise. Returned in the layout `set_float_weight` takes."""
    block = getattr(layer, "block_size", 0)
    if not isinstance(layer, SlimLinear4bit) or not settings.clip or settings.balance or weight.shape[1] % block:
        return weight.t() if getattr(layer, "source_transposed", False) else weight
    levels = formats.code_4bit(layer.fmt).float().sort().values
    absmax = clipped_absmax(weight, torch.diag(hessian.hessian), levels, block, settings.clip)  # (out, groups)
    bound = absmax.repeat_interleave(block, dim=1)  # (out, in)
    clipped = torch.maximum(torch.minimum(weight, bound), -bound)
    return clipped.t() if getattr(layer, "source_transposed", False) else clipped


def _keep_bias(layer: SlimLinear, module: torch.nn.Module) -> None:
    if module.bias is not None:
        layer.bias = torch.nn.Parameter(module.bias.data, requires_grad=False)


@torch.no_grad()
def _balance_block(
    block: torch.nn.Module, layers: dict[str, torch.nn.Module], hessians: dict[str, HessianAccumulator], state, spec_of
) -> None:
    """Rescale the input channels of each group of layers that read one input (`quant.gptq.balance_scales`), folding
    the inverse scales into what produces that input: a norm's weight (and bias), or for a gated MLP's down projection
    the rows of its up projection. The Hessians follow the scaling. The block must compute the same in float: its
    output on the first sequence is checked after each group (to within twice its dtype's rounding), and a group that
    would change it (a norm that does not scale linearly with its weight, an input read by something else too) is
    left as it was. The fold is tried out with hooks first (`_folded_output`), so no weight is copied to be put back."""
    producers, reference = _input_producers(block, layers, state)
    tolerance = max(1e-4, 2 * torch.finfo(reference.dtype).eps)  # rounding alone moves a bf16 block's output ~0.5%
    args, kwargs = state
    groups: dict[int, list[str]] = {}
    for name in layers:
        groups.setdefault(id(hessians[name]), []).append(name)
    for names in groups.values():
        found = [producers.get(name) for name in names]
        if any(p is None or p[1] is not found[0][1] for p in found):
            continue  # some layer's input comes from elsewhere: its scales could not be folded
        kind, producer = found[0]
        accumulator = hessians[names[0]]
        weights = [oriented(layers[n], layers[n].weight.data) for n in names]

        def round_trip(i, w, names=names):
            layer = spec_of(names[i]).module_class().from_linear(layers[names[i]], spec_of(names[i]), names[i])
            layer.set_float_weight(w.t() if getattr(layer, "source_transposed", False) else w)
            return layer.dequantized_weight(torch.float32)

        scales = balance_scales(weights, accumulator.hessian, round_trip)
        if scales is None:
            continue
        output = _folded_output(block, kind, producer, [layers[n] for n in names], scales, args, kwargs)
        if float((output - reference).float().norm()) > tolerance * float(reference.float().norm()):
            logger.debug("balance: %s left as they were (the block's output changed)", names)
            continue
        del output
        _fold_inverse(kind, producer, scales)
        for w in weights:
            w.mul_(scales.to(w.dtype))
        accumulator.hessian.div_(torch.outer(scales, scales))


def _folded_output(block: torch.nn.Module, kind: str, producer: torch.nn.Module, consumers: list, scales: torch.Tensor, args, kwargs):
    """The block's output with the fold tried out but no `(out, in)` weight changed or copied (a copy to put back is
    0.09 GiB for a 1.1B MLP): a norm's 1-D parameters divided and put back afterwards, a projection's rows divided by
    a hook on its output, and each consumer's input multiplied by `scales` (as `W diag(s)` would) by a pre-hook."""

    def times_scales(module, inputs):
        return (inputs[0] * scales.to(inputs[0].dtype), *inputs[1:])

    handles = [m.register_forward_pre_hook(times_scales) for m in consumers]
    saved = []
    if kind == "rows":
        handles.append(producer.register_forward_hook(lambda m, inputs, out: out / scales.to(out.dtype)))
    else:
        saved = [(p, p.data.clone()) for p in producer.parameters(recurse=False) if p.dim() >= 1]
        _fold_inverse(kind, producer, scales)
    try:
        return _run_block(block, args, kwargs)[0]
    finally:
        for handle in handles:
            handle.remove()
        for p, value in saved:
            p.data.copy_(value)


@torch.no_grad()
def _fold_inverse(kind: str, module: torch.nn.Module, scales: torch.Tensor) -> None:
    """Divide `module`'s output channels by `scales`: a norm's weight and bias, or a linear layer's rows."""
    if kind == "rows":
        oriented(module, module.weight.data).div_(scales.unsqueeze(1).to(module.weight.dtype))
        if module.bias is not None:
            module.bias.data.div_(scales.to(module.bias.dtype))
        return
    for key in ("weight", "bias"):
        p = getattr(module, key, None)
        if isinstance(p, torch.Tensor) and p.shape == scales.shape:
            p.data.div_(scales.to(p.dtype))


def _input_producers(block: torch.nn.Module, layers: dict[str, torch.nn.Module], state) -> tuple[dict[str, tuple], torch.Tensor]:
    """For each layer of `layers` whose input can take per-channel scales upstream: ("norm", module) when the input is
    the output of a norm-like module of the block (a leaf with a 1-D weight, not one of `layers`), or ("rows", up
    projection) for the down projection of a gated MLP (`gate_proj`, `up_proj`, `down_proj`); and the block's output
    on `state` (the hidden states), from the same run."""
    inputs: dict[str, torch.Tensor] = {}
    outputs: list[tuple[torch.Tensor, torch.nn.Module]] = []
    handles = []
    targets = set(map(id, layers.values()))
    for module in block.modules():
        if id(module) in targets:
            continue
        weight = getattr(module, "weight", None)
        if not list(module.children()) and isinstance(weight, torch.Tensor) and weight.dim() == 1:
            handles.append(module.register_forward_hook(lambda m, args, out: outputs.append((out, m))))
    for name, module in layers.items():
        handles.append(module.register_forward_pre_hook(lambda m, args, name=name: inputs.__setitem__(name, args[0])))
    try:
        output = _run_block(block, *state)[0]
    finally:
        for handle in handles:
            handle.remove()
    found: dict[str, tuple] = {}
    for name, x in inputs.items():
        norm = next((m for out, m in outputs if out is x), None)
        if norm is not None:
            found[name] = ("norm", norm)
            continue
        parent_name, _, leaf = name.rpartition(".")
        parent = block.get_submodule(parent_name) if parent_name else block
        up = getattr(parent, "up_proj", None)
        if leaf == "down_proj" and hasattr(parent, "gate_proj") and up is not None and id(up) in targets:
            found[name] = ("rows", up)
    return found, output
