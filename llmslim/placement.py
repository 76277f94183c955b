"""Where each module of a model goes: one device, or an accelerate device map within max_memory."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DevicePlan:
    """A device per module-name prefix (`""` is the whole model)."""

    device_map: dict[str, str | int]

    def device_for(self, tensor_name: str) -> torch.device:
        best, best_len = self.device_map.get(""), -1
        for prefix, device in self.device_map.items():
            if prefix and (tensor_name == prefix or tensor_name.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = device, len(prefix)
        return torch.device(f"cuda:{best}" if isinstance(best, int) else best)

    @property
    def devices(self) -> set:
        return set(self.device_map.values())

    def dispatch(self, model: torch.nn.Module) -> None:
        """Add accelerate's hooks that move activations between devices, when there are several."""
        if len(self.devices) > 1:
            from accelerate import dispatch_model

            dispatch_model(model, device_map=self.device_map)


def plan_devices(model: torch.nn.Module, device_map: str | dict | None, max_memory: dict | None) -> DevicePlan:
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

        device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=model._no_split_modules or [])
    if not isinstance(device_map, dict):
        raise ValueError(f"device_map must be 'auto', a device name or a dict, got {device_map!r}")
    if "disk" in device_map.values():
        on_disk = [k for k, v in device_map.items() if v == "disk"][:3]
        raise ValueError(
            f"the model does not fit in max_memory={max_memory}: modules {on_disk} would go to disk, which "
            "llmslim.from_pretrained does not offload to yet; raise max_memory or choose a smaller format (nf4)"
        )
    return DevicePlan(device_map)
