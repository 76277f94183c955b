"""Which decoder blocks stay on the compute device within a memory budget, and the loader's side of offload.

Resident: everything outside the blocks (embeddings, final norm, output layer), room to stream two
offloaded blocks (the one running and the one being prefetched), then as many blocks as still fit,
in order. The rest is offloaded, still quantized, to CPU RAM (`offload="cpu"`) or to disk
(`offload="disk"`: mapped in place from a quantized llmslim checkpoint, or written once, quantized,
to a file of this load's own in `offload_dir` while a float checkpoint loads).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from llmslim.hf import compat
from llmslim.memory.blocks import find_blocks
from llmslim.offload.manager import OffloadManager, block_slots
from llmslim.offload.store import CpuStore, DiskStore, DiskWriter
from llmslim.placement import DevicePlan

logger = logging.getLogger(__name__)

OFFLOAD_MODES = ("cpu", "disk")
_ATTRIBUTE = "_llmslim_offload"


def split_blocks(outer_bytes: int, block_bytes: list[int], budget: int) -> list[int]:
    """Indices of the blocks to offload so that resident weights stay within `budget` bytes.

    Raises:
        ValueError: the budget cannot hold the tensors outside the blocks plus two streamed blocks.
    """
    if outer_bytes + sum(block_bytes) <= budget:
        return []
    staging = 2 * max(block_bytes)
    minimum = outer_bytes + staging
    if budget < minimum:
        raise ValueError(
            f"offload_budget={budget} bytes ({budget / 2**30:.2f} GiB) is below the minimum {minimum} bytes "
            f"({minimum / 2**30:.2f} GiB: {outer_bytes} outside the blocks + 2 streamed blocks of {max(block_bytes)}): "
            "raise offload_budget or choose a smaller format (nf4)"
        )
    room, offloaded = budget - minimum, []
    for i, nbytes in enumerate(block_bytes):
        if nbytes <= room:
            room -= nbytes
        else:
            offloaded.append(i)
    return offloaded


def module_nbytes(module: nn.Module) -> int:
    """Bytes of a module's own tensors, meta ones included (their future size)."""
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def default_budget(device: torch.device) -> int:
    """Free memory of the compute device, less a margin for activations and the runtime."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.9)
    from llmslim.plan.hardware import available_ram

    return int(available_ram() * 0.8)


def parse_budget(budget: int | str | None, device: torch.device) -> int:
    if budget is None:
        return default_budget(device)
    from llmslim.plan.hardware import parse_size

    try:
        return parse_size(budget)
    except ValueError as err:
        raise ValueError(f"offload_budget must be a size such as '2GiB' or a number of bytes, got {budget!r}") from err


def check_mode(mode: str) -> None:
    if mode not in OFFLOAD_MODES:
        raise ValueError(f"offload must be one of {list(OFFLOAD_MODES)} (or None), got {mode!r}")


class OffloadPlan(DevicePlan):
    """A `DevicePlan` for the streaming loader: offloaded blocks' tensors go to a store, not to memory.

    The loader sends every tensor of an offloaded block to `offload()` (quantized first when it
    comes from a float checkpoint); `dispatch()` builds the store and attaches the `OffloadManager`.
    """

    def __init__(
        self,
        device: torch.device,
        mode: str,
        blocks_name: str,
        offloaded: list[int],
        offload_dir: Path | None,
        source_files: list[Path] | None,
    ):
        super().__init__({"": str(device)})
        self.device, self.mode, self.blocks_name, self.offloaded = torch.device(device), mode, blocks_name, offloaded
        self.in_place = source_files is not None
        self.source_files = source_files
        self.names: set[str] = set()
        self.cpu_store = CpuStore(pin=self.device.type == "cuda") if mode == "cpu" else None
        self.writer = DiskWriter(offload_dir) if mode == "disk" and offloaded and not self.in_place else None
        self._offloaded = set(offloaded)

    def device_for(self, tensor_name: str) -> torch.device | str:
        if compat.block_index(tensor_name, self.blocks_name) in self._offloaded:
            return "disk"  # the loader's word for "not in memory": it calls offload() with the tensor
        return self.device

    def offload(self, tensor_name: str, tensor: torch.Tensor) -> None:
        self.names.add(tensor_name)
        if self.cpu_store is not None:
            self.cpu_store.add(tensor_name, tensor)
        elif self.writer is not None:
            self.writer.add(tensor_name, tensor)

    def dispatch(self, model: nn.Module) -> None:
        if not self.offloaded:
            return
        if self.cpu_store is not None:
            store = self.cpu_store
        elif self.writer is not None:
            store = self.writer.finish()
        else:
            store = DiskStore.from_safetensors(self.source_files, self.names, model.base_model_prefix)
        attach(model, self.blocks_name, self.offloaded, store, self.device)


def attach(model: nn.Module, blocks_name: str, offloaded: list[int], store, device: torch.device) -> OffloadManager:
    """Hook the `OffloadManager` onto `model`'s blocks (kept as `model._llmslim_offload`)."""
    blocks = model.get_submodule(blocks_name)
    prefixes = [f"{blocks_name}.{i}" for i in range(len(blocks))]
    manager = OffloadManager(list(blocks), prefixes, offloaded, store, device)
    setattr(model, _ATTRIBUTE, manager)
    logger.info(
        "offloading %d of %d blocks (%s); resident blocks: %d",
        len(offloaded),
        len(blocks),
        type(store).__name__,
        len(blocks) - len(offloaded),
    )
    return manager


def offload_manager(model: nn.Module) -> OffloadManager | None:
    """The `OffloadManager` streaming `model`'s blocks, if any."""
    return getattr(model, _ATTRIBUTE, None)


def offload_plan(
    skeleton: nn.Module,
    base: DevicePlan,
    mode: str,
    budget: int | str | None,
    offload_dir: str | os.PathLike | None,
    files: list[Path],
    pre_quantized: bool,
) -> OffloadPlan:
    """The loader's plan for `offload=mode` on a quantized meta skeleton (sizes are exact)."""
    check_mode(mode)
    device = _single_device(base)
    if mode == "cpu" and device.type == "cpu":
        logger.info("offload='cpu' with a CPU compute device copies blocks within RAM: use offload='disk' to bound RAM")
    blocks_name, blocks = find_blocks(skeleton)
    block_bytes = [module_nbytes(b) for b in blocks]
    outer = module_nbytes(skeleton) - sum(block_bytes)
    offloaded = split_blocks(outer, block_bytes, parse_budget(budget, device))
    in_place = mode == "disk" and pre_quantized and all(f.suffix == ".safetensors" for f in files)
    if mode == "disk" and offloaded and not in_place and offload_dir is None:
        raise ValueError("offload='disk' from a float checkpoint writes the quantized blocks once: pass offload_dir= (a folder)")
    return OffloadPlan(device, mode, blocks_name, offloaded, Path(offload_dir) if offload_dir else None, files if in_place else None)


def _single_device(base: DevicePlan) -> torch.device:
    if set(base.device_map) != {""} or base.device_map[""] == "disk":
        raise ValueError(f"offload= streams blocks to one compute device: pass device_map='cuda:0' or 'cpu', not {base.device_map!r}")
    device = base.device_map[""]
    return torch.device(f"cuda:{device}" if isinstance(device, int) else device)


def offload_(model: nn.Module, budget: int | str, mode: str = "cpu", offload_dir: str | os.PathLike | None = None) -> OffloadManager | None:
    """Offload the blocks of an already loaded model that do not fit `budget`, in place.

    Args:
        model: a loaded (quantized) model on its compute device.
        budget: bytes (or a size such as "2GiB") of weights allowed on the compute device.
        mode: `"cpu"` keeps offloaded blocks in host RAM; `"disk"` writes them to `offload_dir`
            and maps them from there.
        offload_dir: folder for `mode="disk"`.

    Returns:
        The `OffloadManager`, or None when everything fits the budget.
    """
    check_mode(mode)
    device = next(model.parameters()).device
    blocks_name, blocks = find_blocks(model)
    block_bytes = [module_nbytes(b) for b in blocks]
    from llmslim.stats import model_nbytes

    offloaded = split_blocks(model_nbytes(model) - sum(block_bytes), block_bytes, parse_budget(budget, device))
    if not offloaded:
        return None
    if mode == "disk" and offload_dir is None:
        raise ValueError("offload_(mode='disk') needs offload_dir= (a folder for the offloaded blocks)")
    store = CpuStore(pin=device.type == "cuda") if mode == "cpu" else DiskWriter(offload_dir)
    for i in offloaded:
        for slot in block_slots(blocks[i], f"{blocks_name}.{i}"):
            store.add(slot.name, getattr(slot.module, slot.attr))
    return attach(model, blocks_name, offloaded, store if mode == "cpu" else store.finish(), device)


class ExpertOffloadPlan(OffloadPlan):
    """`offload=` for a mixture-of-experts model: the quantized experts (the bulk of its bytes) stay in CPU RAM
    (`"cpu"`) or on disk (`"disk"`: memory-mapped in place from a quantized llmslim checkpoint, else written once,
    quantized, to `offload_dir`), everything else (attention, routers, shared experts, embeddings) on the compute
    device. Each routed expert runs where its weights are (`quant.experts`), as llama.cpp's `--n-cpu-moe` does;
    on a CPU-only machine the page cache keeps the hot experts of a disk-mapped checkpoint in memory.
    """

    def __init__(
        self, device: torch.device, mode: str, expert_tensors: set[str], offload_dir: Path | None, source_files: list[Path] | None
    ):
        super().__init__(device, mode, "", [], offload_dir, source_files)
        self.expert_tensors = expert_tensors
        self.writer = DiskWriter(offload_dir) if mode == "disk" and source_files is None else None

    def device_for(self, tensor_name: str) -> torch.device | str:
        return "disk" if tensor_name in self.expert_tensors else self.device

    def dispatch(self, model: nn.Module) -> None:
        if self.cpu_store is not None:
            store = self.cpu_store
        elif self.writer is not None:
            store = self.writer.finish()
        else:
            store = DiskStore.from_safetensors(self.source_files, self.names, model.base_model_prefix)
        for name in sorted(self.names):
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name)
            tensor = store.get(name)
            if attr in module._parameters:
                module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
            else:
                module._buffers[attr] = tensor
        model.__dict__[_ATTRIBUTE + "_experts"] = store  # keeps the mapping (and a written file) alive with the model
        logger.info("experts offloaded (%s): %d tensors, %.2f GiB", type(store).__name__, len(self.names), store.nbytes / 2**30)


def expert_offload_plan(
    skeleton: nn.Module, base: DevicePlan, mode: str, offload_dir: str | os.PathLike | None, files: list[Path], pre_quantized: bool
) -> ExpertOffloadPlan:
    """The loader's plan for `offload=mode` on a skeleton with quantized experts (see `ExpertOffloadPlan`)."""
    from llmslim.quant.experts import quantized_experts

    check_mode(mode)
    device = _single_device(base)
    names = set()
    for name, store in quantized_experts(skeleton):
        names |= {f"{name.rpartition('.')[0]}.{stored}" for stored in store.names.values()}
    in_place = mode == "disk" and pre_quantized and all(f.suffix == ".safetensors" for f in files)
    if mode == "disk" and not in_place and offload_dir is None:
        raise ValueError("offload='disk' from a float checkpoint writes the quantized experts once: pass offload_dir= (a folder)")
    if mode == "disk" and not in_place:
        check_writable(Path(offload_dir))
    return ExpertOffloadPlan(device, mode, names, Path(offload_dir) if offload_dir else None, files if in_place else None)


def check_writable(folder: Path) -> None:
    """Refuse an offload folder that cannot take a file, before any weight is read."""
    probe = folder / f".llmslim-probe-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as handle:
            handle.write(b"\0" * 4096)
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as err:
        raise ValueError(
            f"offload_dir {str(folder)!r} cannot take the offloaded weights ({err.strerror}): give a writable folder with space"
        ) from err
    finally:
        if folder.is_dir():
            probe.unlink(missing_ok=True)
