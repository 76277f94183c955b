"""ALBERT's cross-layer sharing for pretrained models: groups of blocks share one set of weights.

Sharing is done leaf by leaf: in every block of a group, each weight-holding leaf module (linear
layers, quantized or not, and norms unless they are kept per layer) is replaced by the group's
first block's module. Blocks stay distinct objects, so per-layer state such as an attention
layer's index into the KV cache is untouched, and a shared module's tensors exist once in memory
(and once on disk, see `llmslim.hf.declare_shared`).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from llmslim.memory.blocks import find_blocks
from llmslim.quant.modules import SlimLinear

ShareSpec = int | str | list[list[int]]


def sharing_groups(spec: ShareSpec, n_layers: int) -> list[list[int]]:
    """Groups of layer indices that share weights; groups of one (unshared layers) are left out.

    Args:
        spec: `"all"` (ALBERT: one group), an integer k >= 2 (consecutive groups of k, the last
            one shorter when k does not divide the depth), or explicit groups such as [[0, 1], [4, 5, 6]].
        n_layers: the model's depth.
    """
    if spec == "all":
        return [list(range(n_layers))] if n_layers > 1 else []
    if isinstance(spec, int) and not isinstance(spec, bool):
        if not 2 <= spec <= n_layers:
            raise ValueError(f"share_layers={spec} groups must be between 2 and the model's {n_layers} layers: choose k in [2, {n_layers}]")
        return [g for g in (list(range(i, min(i + spec, n_layers))) for i in range(0, n_layers, spec)) if len(g) > 1]
    return _check_explicit(spec, n_layers)


def _check_explicit(groups: list[list[int]], n_layers: int) -> list[list[int]]:
    seen: set[int] = set()
    for group in groups:
        bad = [i for i in group if not 0 <= i < n_layers]
        if bad:
            raise ValueError(f"sharing group {group} has layer {bad[0]} beyond the model's depth: layers are 0..{n_layers - 1}")
        if seen & set(group):
            raise ValueError(f"layer {sorted(seen & set(group))[0]} is in two sharing groups {groups}: make the groups disjoint")
        seen |= set(group)
    return [sorted(g) for g in groups if len(g) > 1]


def shared_leaves(block: nn.Module, share_norms: bool) -> list[str]:
    """Names (within a block) of the leaf modules a group shares: those holding tensors, norms only if asked."""
    names = []
    for name, module in block.named_modules():
        if not name or any(True for _ in module.children()):
            continue
        if not list(module.parameters(recurse=False)) and not list(module.buffers(recurse=False)):
            continue
        if not share_norms and _is_norm(module):
            continue
        names.append(name)
    return names


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or "norm" in type(module).__name__.lower()


def check_shareable(blocks: nn.ModuleList, groups: list[list[int]], leaves: list[str]) -> None:
    """Raise before anything changes if the blocks of a group differ in a shared leaf's type or tensor shapes."""
    for group in groups:
        first = _leaf_signature(blocks[group[0]], leaves)
        for i in group[1:]:
            other = _leaf_signature(blocks[i], leaves)
            if other != first:
                name = next(n for n in leaves if first.get(n) != other.get(n))
                raise ValueError(
                    f"layers {group[0]} and {i} cannot share weights: {name} is {first.get(name)} in one and "
                    f"{other.get(name)} in the other; share only layers of the same shape"
                )


def _leaf_signature(block: nn.Module, leaves: list[str]) -> dict[str, tuple]:
    signature = {}
    for name in leaves:
        try:
            module = block.get_submodule(name)
        except AttributeError:
            signature[name] = ("missing",)
            continue
        tensors = tuple((k, tuple(v.shape), v.dtype) for k, v in module.state_dict().items())
        signature[name] = (type(module).__name__, *tensors)
    return signature


def tie_leaf_(blocks: nn.ModuleList, group: list[int], name: str) -> dict[str, str]:
    """Point leaf `name` of every block of `group` at the first block's module, in place.

    Returns:
        {member tensor name: source tensor name}, relative to the block list (e.g. "3.mlp.up_proj.weight").
    """
    module = blocks[group[0]].get_submodule(name)
    for i in group[1:]:
        blocks[i].set_submodule(name, module)
    return {f"{i}.{name}.{t}": f"{group[0]}.{name}.{t}" for i in group[1:] for t in module.state_dict()}


def group_init_weights(blocks: nn.ModuleList, group: list[int], name: str, init: str | int) -> dict[str, torch.Tensor]:
    """The float tensors (source layout) the shared leaf `name` of `group` starts from: the members' mean or one member's."""
    members = [group[init]] if isinstance(init, int) else group
    tensors = [source_tensors(blocks[i].get_submodule(name)) for i in members]
    return {key: torch.stack([t[key].float() for t in tensors]).mean(0) for key in tensors[0]}


def source_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """A leaf's tensors in float checkpoint layout (a quantized layer's weight dequantized)."""
    if isinstance(module, SlimLinear):
        weight = module.dequantized_weight(torch.float32)
        if getattr(module, "source_transposed", False):
            weight = weight.t()
        return {"weight": weight} | ({} if module.bias is None else {"bias": module.bias.data})
    return {k: v for k, v in module.state_dict().items() if v.is_floating_point()}


@torch.no_grad()
def set_source_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Write a float tensor in checkpoint layout into a leaf (quantizing a quantized layer's weight)."""
    if isinstance(module, SlimLinear) and name == "weight":
        module.set_float_weight(value)
        return
    old = getattr(module, name)
    value = value.to(device=old.device if not old.is_meta else value.device, dtype=old.dtype)
    if name in module._parameters:
        module._parameters[name] = nn.Parameter(value, requires_grad=old.requires_grad)
    else:
        module._buffers[name] = value


def block_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, list) of the model's decoder blocks, with an error that names layer sharing."""
    try:
        return find_blocks(model)
    except ValueError as err:
        raise ValueError(f"cannot share layers: {err}") from err


def iter_group_leaves(groups: list[list[int]], leaves: list[str]) -> Iterator[tuple[int, list[int], str]]:
    """(group index, group, leaf name) for every shared leaf."""
    for g, group in enumerate(groups):
        for name in leaves:
            yield g, group, name
