"""Preflight: before a load reads any weight, check that the planned peak fits the memory it may use.

The planned peak per device is exact for the weights (the quantized meta skeleton's own tensors,
tied ones once, routed through the load's device plan) plus the loader's constant: the largest
checkpoint tensor as read and its float32 working copy while it is quantized. A load that would
not fit raises `PreflightError` with these numbers and a suggestion, unless `force=True`.
"""

from __future__ import annotations

import logging
import struct
from collections import defaultdict
from pathlib import Path

import torch
from torch import nn

from llmslim.hf import compat
from llmslim.plan.hardware import GiB, available_ram, parse_size

logger = logging.getLogger(__name__)


class PreflightError(MemoryError, ValueError):
    """The planned peak of a load exceeds the memory it may use (pass `force=True` to load anyway)."""


def unique_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Name -> tensor of every parameter and buffer, tied copies left out."""
    tied = set(compat.tied_weights(model))
    seen: set[int] = set()
    out = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name in tied or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        out[name] = tensor
    return out


def largest_source_tensor(files: list[Path], fallback: int) -> int:
    """Bytes of the largest tensor in the checkpoint files (safetensors headers), else `fallback`."""
    from llmslim.offload.store import safetensors_index

    try:
        sizes = [loc.nbytes for f in files if f.suffix == ".safetensors" for loc in safetensors_index(f).values()]
    except (ValueError, OSError, KeyError, struct.error):  # a corrupt shard: the loader names it when it reads it
        return fallback
    return max(sizes, default=fallback)


def planned_bytes(skeleton: nn.Module, plan) -> dict[str, int]:
    """Bytes of weights each device ("cpu", "cuda:0", ...) will hold once loaded; the disk is not counted."""
    per_device: dict[str, int] = defaultdict(int)
    tensors = unique_tensors(skeleton)
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        device = plan.device_for(name)
        if device == "disk":
            if getattr(plan, "mode", None) == "cpu":
                per_device["cpu"] += nbytes  # the offload store lives in host RAM
            continue
        per_device[_device_key(device)] += nbytes
    if getattr(plan, "offloaded", None):
        per_device[_device_key(plan.device)] += 2 * max(_per_block(plan, tensors).values())  # the running and the prefetched block
    return dict(per_device)


def load_constant(skeleton: nn.Module, files: list[Path]) -> int:
    """Host bytes the loader needs besides the weights: one tensor as read plus its float32 working copy."""
    largest = max((t.numel() for t in unique_tensors(skeleton).values()), default=0)
    return largest_source_tensor(files, largest * 4) + largest * 4


def _per_block(plan, tensors: dict[str, torch.Tensor]) -> dict[int, int]:
    sizes: dict[int, int] = defaultdict(int)
    for name, tensor in tensors.items():
        index = compat.block_index(name, plan.blocks_name)
        if index in plan.offloaded:
            sizes[index] += tensor.numel() * tensor.element_size()
    return sizes


def _device_key(device) -> str:
    device = torch.device(device)
    return "cpu" if device.type == "cpu" else f"{device.type}:{device.index or 0}"


def limit_bytes(device: str, max_memory: dict | None) -> int | None:
    """The `max_memory` budget for weights on `device`, if one is given."""
    limits = {_limit_key(k): v for k, v in (max_memory or {}).items()}
    return parse_size(limits[device]) if device in limits else None


def available_bytes(device: str) -> int:
    """Memory free on `device` now."""
    if device == "cpu":
        return available_ram()
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return free


def _limit_key(key) -> str:
    return f"cuda:{key}" if isinstance(key, int) else str(key)


def check_fits(skeleton: nn.Module, plan, files: list[Path], max_memory: dict | None, force: bool, source: Path) -> dict[str, int]:
    """Raise `PreflightError` when a device's planned bytes exceed what it may use; returns the plan's bytes."""
    needed = planned_bytes(skeleton, plan)
    needed["cpu"] = needed.get("cpu", 0)
    over = {}
    for device, weights in needed.items():
        limit = limit_bytes(device, max_memory)  # a budget for weights, as accelerate reads it
        peak = weights + (load_constant(skeleton, files) if device == "cpu" else 0)
        if limit is not None and weights > limit:
            over[device] = (weights, limit)
        elif peak > (free := available_bytes(device)):
            over[device] = (peak, free)
    if not over:
        return needed
    message = _refusal(skeleton, over, source)
    if force:
        logger.warning("%s (loading anyway: force=True)", message)
        return needed
    raise PreflightError(message)


def human(nbytes: int) -> str:
    """`nbytes` in the largest binary unit that keeps it >= 1 (e.g. 9.8 KiB, 3.20 GiB)."""
    for unit, scale in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}" if unit != "GiB" else f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes} B"


def _refusal(skeleton: nn.Module, over: dict[str, tuple[int, int]], source: Path) -> str:
    numbers = "; ".join(f"{d}: planned peak {human(n)} > {human(a)} available" for d, (n, a) in over.items())
    return f"{source} will not fit: {numbers}. {_suggestion(skeleton, min(a for _, a in over.values()))} Or pass force=True to try anyway."


def _suggestion(skeleton: nn.Module, available: int) -> str:
    """The best-quality plan format whose weights fit `available`, else disk offload, from the planner."""
    from llmslim.plan.planner import QUALITY_ORDER
    from llmslim.plan.shapes import model_shape
    from llmslim.plan.weights import format_config, weight_bytes

    try:
        shape = model_shape(skeleton.config.to_dict())
    except ValueError as err:
        return f"(no format suggestion: {err})"
    dtype = str(skeleton.dtype).removeprefix("torch.")
    sizes = {fmt: weight_bytes(shape, format_config(fmt), "bfloat16" if fmt == "bf16" else dtype).total for fmt in QUALITY_ORDER}
    listing = ", ".join(f"{fmt} {human(size)}" for fmt, size in sizes.items())
    fitting = [fmt for fmt, size in sizes.items() if size * 1.1 < available]
    if fitting:
        return f"Planned weights per format: {listing}; {fitting[0]} fits: load with its SlimConfig (see `llmslim plan`)."
    budget = int(available * 0.8)
    return (
        f"Planned weights per format: {listing}; none fits, so stream blocks from disk: "
        f"offload='disk', offload_budget={budget} ({human(budget)}), offload_dir=FOLDER."
    )
