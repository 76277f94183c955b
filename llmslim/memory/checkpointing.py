"""Activation checkpointing of a model's transformer blocks: per block, in ~sqrt(n) segments, or in k.

Chen et al. 2016 (*Training Deep Nets with Sublinear Memory Cost*): split the n blocks into
segments and keep only each segment's input (its boundary) during the forward pass; the backward
pass recomputes one segment at a time from its boundary. With ~sqrt(n) segments the stored
activations grow as O(sqrt(n)) for one extra forward pass.

A segment spans several calls the model's own loop makes (`for layer in self.layers: ...`), so it
cannot be one `torch.utils.checkpoint.checkpoint(fn)` call: a forward pre-hook on the segment's
first block opens a non-reentrant checkpoint region (torch's generator form of the same
function), each block call inside is recorded, and a forward hook on the last block closes it.
Inside a region autograd stores nothing; in the backward pass the region replays the recorded
block calls from the saved boundary. A block whose input is not the previous block's output (the
loop did something in between) starts a new region, so a replay never misses an operation.

`offload=True` moves every tensor autograd saves outside the regions (the boundaries included)
from the accelerator to CPU memory for the time between forward and backward; parameters stay.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils import checkpoint as torch_checkpoint

from llmslim.hf import compat
from llmslim.memory.blocks import find_blocks

logger = logging.getLogger(__name__)

POLICIES = ("none", "all", "sqrt")
CACHE_KWARGS = ("past_key_values", "past_key_value", "layer_past", "cache_params")
_ATTRIBUTE = "_llmslim_checkpointing"


def check_policy(policy: str | int) -> str | int:
    """`policy` if it is one of POLICIES or a number of segments >= 1 (a digit string is read as one).

    Raises:
        ValueError: naming the value and the choices.
    """
    if isinstance(policy, str) and policy.strip().isdigit():
        policy = int(policy)
    if isinstance(policy, bool) or not (policy in POLICIES or (isinstance(policy, int) and policy >= 1)):
        raise ValueError(f"checkpointing must be one of {list(POLICIES)} or a number of segments >= 1, got {policy!r}")
    return policy


def n_segments(policy: str | int, n_blocks: int) -> int:
    """How many segments `policy` cuts `n_blocks` blocks into (0 for "none").

    Raises:
        ValueError: a number of segments above `n_blocks`.
    """
    policy = check_policy(policy)
    if policy == "none":
        return 0
    if policy == "all":
        return n_blocks
    if policy == "sqrt":
        return max(1, round(math.sqrt(n_blocks)))
    if policy > n_blocks:
        raise ValueError(f"checkpointing={policy} segments is more than the model's {n_blocks} blocks: use 1..{n_blocks}, 'sqrt' or 'all'")
    return policy


def segment_bounds(n_blocks: int, segments: int) -> list[tuple[int, int]]:
    """(start, stop) block indices of `segments` contiguous segments whose sizes differ by at most one."""
    size, extra = divmod(n_blocks, segments)
    bounds, start = [], 0
    for i in range(segments):
        stop = start + size + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


@dataclass
class CheckpointingPlan:
    """What `enable_checkpointing` set up.

    Args:
        policy: the policy asked for.
        blocks_name: name of the block list in the model (e.g. `model.layers`).
        segments: (start, stop) block indices of each checkpointed segment; empty for "none".
        offload: whether saved tensors outside the segments go to CPU memory.
    """

    policy: str | int
    blocks_name: str
    segments: list[tuple[int, int]]
    offload: bool
    handles: list = field(default_factory=list, repr=False)

    def remove(self) -> None:
        """Remove the hooks (the model computes as before)."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def enable_checkpointing(model: nn.Module, policy: str | int = "sqrt", offload: bool = False) -> CheckpointingPlan:
    """Checkpoint the transformer blocks of `model` per `policy`; replaces an earlier setting.

    Args:
        model: a Hugging Face model (also quantized, or wrapped by PEFT).
        policy: `"sqrt"` (~sqrt(n) segments, Chen et al. 2016), `"all"` (every block, as
            transformers' `gradient_checkpointing_enable`), `"none"`, or a number of segments k.
        offload: keep the tensors saved outside the segments (the segment boundaries, the
            embeddings, the head) in CPU memory until the backward pass needs them.

    Returns:
        The plan (segments, hooks); `plan.remove()` or `disable_checkpointing(model)` undoes it.
    """
    disable_checkpointing(model)
    name, blocks = find_blocks(model)
    segments = segment_bounds(len(blocks), n_segments(policy, len(blocks))) if check_policy(policy) != "none" else []
    plan = CheckpointingPlan(policy, name, segments, offload)
    if segments or offload:
        _BlockCheckpointer(model, list(blocks), segments, offload).attach(plan)
    setattr(model, _ATTRIBUTE, plan)
    logger.info("activation checkpointing %s: %d segments of %s, offload=%s", policy, len(segments), name, offload)
    return plan


def disable_checkpointing(model: nn.Module) -> None:
    """Remove llmslim's checkpointing from `model`, and transformers' own per-block checkpointing."""
    plan = getattr(model, _ATTRIBUTE, None)
    if plan is not None:
        plan.remove()
        delattr(model, _ATTRIBUTE)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # under a PEFT wrapper
    if compat.transformers_checkpointing_active(base):
        base.gradient_checkpointing_disable()


def checkpointing_plan(model: nn.Module) -> CheckpointingPlan | None:
    """The plan `enable_checkpointing` set on `model`, if any."""
    return getattr(model, _ATTRIBUTE, None)


@dataclass
class _Region:
    """One open checkpoint region: its generator and the block calls it will replay."""

    generator: object
    calls: list = field(default_factory=list)  # (block, args, kwargs, where the hidden state goes)
    last_output: torch.Tensor | None = None


class _BlockCheckpointer:
    """The hooks that open, record and close checkpoint regions over a model's blocks."""

    def __init__(self, model: nn.Module, blocks: list[nn.Module], segments: list[tuple[int, int]], offload: bool) -> None:
        self.model, self.blocks, self.offload = model, blocks, offload
        self.index = {id(block): i for i, block in enumerate(blocks)}
        self.ends = {stop - 1 for _, stop in segments}
        self.region: _Region | None = None
        self.replaying = False
        self.offload_context: AbstractContextManager | None = None
        self.kept = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
        self.use_cache = getattr(getattr(model, "config", None), "use_cache", None) is not None

    def attach(self, plan: CheckpointingPlan) -> None:
        plan.handles.append(self.model.register_forward_pre_hook(self._model_pre_hook, with_kwargs=True))
        plan.handles.append(self.model.register_forward_hook(self._model_hook, always_call=True))
        if not plan.segments:
            return
        for block in self.blocks:
            plan.handles.append(block.register_forward_pre_hook(self._block_pre_hook, with_kwargs=True))
            plan.handles.append(block.register_forward_hook(self._block_hook, always_call=True))

    def _model_pre_hook(self, module, args, kwargs):
        if not torch.is_grad_enabled() or self.replaying:
            return None
        if self.offload and self.offload_context is None:
            self.offload_context = torch.autograd.graph.saved_tensors_hooks(self._pack_offload, _unpack_offload)
            self.offload_context.__enter__()
        if self.use_cache and "use_cache" not in kwargs:
            kwargs["use_cache"] = False  # a cache filled during the forward pass would be filled again by the replay
            return args, kwargs
        return None

    def _model_hook(self, module, args, output):
        self._close()
        if self.offload_context is not None:
            context, self.offload_context = self.offload_context, None
            context.__exit__(None, None, None)

    def _block_pre_hook(self, block, args, kwargs):
        if self.replaying or not torch.is_grad_enabled():
            return None
        hidden, where = _hidden_state(args, kwargs)
        if hidden is None or any(kwargs.get(name) is not None for name in CACHE_KWARGS):
            self._close()  # no tensor to start from, or a KV cache the replay would update twice
            return None
        if self.region is not None and hidden is not self.region.last_output:
            self._close()  # the loop changed the hidden state between blocks: that op stays outside
        if self.region is None:
            calls: list = []
            self.region = _Region(_open_region(self._replay(calls), hidden), calls)
            next(self.region.generator)
        self.region.calls.append((block, _without(args, where), _without(kwargs, where), where))
        return None

    def _block_hook(self, block, args, output):
        if self.replaying or self.region is None:
            return
        if output is None:  # the block raised: leave the region without completing it
            self._close(failed=True)
            return
        self.region.last_output = _main_tensor(output)
        if self.index[id(block)] in self.ends:
            self._close()

    def _close(self, failed: bool = False) -> None:
        region, self.region = self.region, None
        if region is None:
            return
        if failed:
            region.generator.close()
        else:
            next(region.generator, None)

    def _replay(self, calls: list) -> Callable[[torch.Tensor], None]:
        """The recompute function of a region: its recorded block calls, run again from `hidden`."""

        def replay(hidden: torch.Tensor) -> None:
            self.replaying = True
            try:
                for block, args, kwargs, where in calls:
                    args, kwargs = _with(args, kwargs, where, hidden)
                    hidden = _main_tensor(block(*args, **kwargs))
            finally:
                self.replaying = False

        return replay

    def _pack_offload(self, tensor: torch.Tensor):
        if tensor.device.type == "cpu" or tensor.untyped_storage().data_ptr() in self.kept:
            return tensor
        host = torch.empty(tensor.size(), dtype=tensor.dtype, layout=tensor.layout, pin_memory=torch.cuda.is_available())
        host.copy_(tensor, non_blocking=True)
        return tensor.device, host


def _unpack_offload(packed):
    if isinstance(packed, torch.Tensor):
        return packed
    device, host = packed
    return host.to(device, non_blocking=True)


def _open_region(replay: Callable[[torch.Tensor], None], hidden: torch.Tensor):
    """torch's non-reentrant checkpoint as a generator: entered by the first `next`, left by the second.

    Its leading parameters (fn, preserve_rng_state, context_fn, determinism_check, debug and,
    in newer torch, early_stop) are passed by position from their defaults, so the call works
    across torch versions.
    """
    generator_fn = torch_checkpoint._checkpoint_without_reentrant_generator
    leading = []
    for param in inspect.signature(generator_fn).parameters.values():
        if param.kind is not inspect.Parameter.POSITIONAL_OR_KEYWORD:
            break
        leading.append(replay if param.name == "fn" else param.default)
    return generator_fn(*leading, hidden)


def _hidden_state(args: tuple, kwargs: dict) -> tuple[torch.Tensor | None, tuple[str, object] | None]:
    """The hidden-state tensor a block is called with, and where it is: ("arg", i) or ("kw", name)."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0], ("arg", 0)
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return kwargs["hidden_states"], ("kw", "hidden_states")
    return None, None


def _without(container, where):
    """`args` or `kwargs` with the hidden state left out (so a region never holds on to it)."""
    kind, key = where
    if isinstance(container, tuple):
        return container[1:] if kind == "arg" else container
    return {k: v for k, v in container.items() if not (kind == "kw" and k == key)}


def _with(args: tuple, kwargs: dict, where, hidden: torch.Tensor) -> tuple[tuple, dict]:
    kind, key = where
    if kind == "arg":
        return (hidden, *args), kwargs
    return args, {**kwargs, key: hidden}


def _main_tensor(output) -> torch.Tensor:
    """A block's hidden-state output: the tensor itself, or the first element of a tuple/ModelOutput."""
    if isinstance(output, torch.Tensor):
        return output
    return output[0]
