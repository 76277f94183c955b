"""Where each module of a model goes: one device, or an accelerate device map within max_memory."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmslim.hf import compat


@dataclass
class DevicePlan:
    """A device per module-name prefix (`""` is the whole model); `"disk"` goes to a subfolder of `offload_dir`
    of this load's own (other loads may share `offload_dir`), removed with the model."""

    device_map: dict[str, str | int]
    offload_dir: Path | None = None
    offload_index: dict = field(default_factory=dict)
    _files: object = field(default=None, repr=False)  # llmslim.offload.folder.OffloadFiles, once something is offloaded

    def device_for(self, tensor_name: str) -> torch.device | str:
        best, best_len = self.device_map.get(""), -1
        for prefix, device in self.device_map.items():
            if prefix and (tensor_name == prefix or tensor_name.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = device, len(prefix)
        if best == "disk":
            return "disk"
        return torch.device(f"cuda:{best}" if isinstance(best, int) else best)

    @property
    def devices(self) -> set:
        return set(self.device_map.values())

    def offload(self, tensor_name: str, tensor: torch.Tensor) -> None:
        """Write a (quantized or float) tensor to the offload folder instead of keeping it in memory."""
        from accelerate.utils import offload_weight

        self.offload_index = offload_weight(tensor.contiguous(), tensor_name, str(self.load_folder()), self.offload_index)

    def load_folder(self) -> Path:
        """This load's subfolder of `offload_dir`, created on first use."""
        if self._files is None:
            from llmslim.offload.folder import OffloadFiles

            self._files = OffloadFiles(self.offload_dir)
            self._files.path("").mkdir()
        return self._files.path("")

    def dispatch(self, model: torch.nn.Module) -> None:
        """Add accelerate's hooks that move weights and activations between devices and the disk."""
        if len(self.devices) == 1 and "disk" not in self.devices:
            return
        from accelerate import dispatch_model
        from accelerate.utils import save_offload_index

        folder = None
        if "disk" in self.devices:
            folder = self.load_folder()
            save_offload_index(self.offload_index, str(folder))
            model._llmslim_offload_files = self._files  # the model's accelerate hooks read them: they live as long as it
        # our quantized state (absmax, SCB) lives in buffers: they are offloaded with the weights
        dispatch_model(model, device_map=self.device_map, offload_dir=folder, offload_buffers=True)


def plan_devices(
    model: torch.nn.Module, device_map: str | dict | None, max_memory: dict | None, offload_dir: str | os.PathLike | None = None
) -> DevicePlan:
    """Resolve `device_map` for a meta skeleton whose quantized layers are already in place.

    Sizes come from the skeleton's own tensors, so a 4-bit layer counts as its codes and absmax.
    """
    if device_map is None:
        device_map = "cuda" if torch.cuda.is_available() else "cpu"
    if isinstance(device_map, str) and device_map != "auto":
        try:
            torch.device(device_map)
        except RuntimeError as err:
            raise ValueError(f"device_map must be 'auto', a device such as 'cpu' or 'cuda:0', or a dict, got {device_map!r}") from err
        return DevicePlan({"": device_map})
    if device_map == "auto":
        from accelerate import infer_auto_device_map

        device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=compat.no_split_modules(model))
    if not isinstance(device_map, dict):
        raise ValueError(f"device_map must be 'auto', a device name or a dict, got {device_map!r}")
    if "disk" not in device_map.values():
        return DevicePlan(device_map)
    if offload_dir is None:
        on_disk = [k for k, v in device_map.items() if v == "disk"][:3]
        raise ValueError(
            f"the model does not fit in max_memory={max_memory}: modules {on_disk} go to disk, so pass "
            "offload_dir= (a folder for their quantized weights), raise max_memory, or choose a smaller format (nf4)"
        )
    Path(offload_dir).mkdir(parents=True, exist_ok=True)
    return DevicePlan(device_map, Path(offload_dir))
