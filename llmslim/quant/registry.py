"""The weight formats llmslim knows: one table, from which everything else is derived.

`SlimConfig` validation, every CLI `--weights` choice, the planner, the bitsandbytes export and
the distill / finetune / compress options all read `FORMATS`. Adding a format is one entry here
plus its module class in `quant/modules.py`.

This module imports nothing from llmslim, so the config layer below `quant/` may read it (the one
exception the import-linter contract allows). A format's module class is named, not imported, and
resolved on first use.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

NONE = "none"  # how CLIs and training configs spell "keep the float weights"


@dataclass(frozen=True)
class WeightFormat:
    """One weight format.

    Args:
        name: the value of `SlimConfig.weights` and of every `--weights` option.
        bits: bits per weight before scales (the planner adds scales from the module's buffers).
        module: the class in `llmslim.quant.modules` that holds a layer in this format.
        description: one line for `--help` and docs.
        bnb_export: whether `save_pretrained(..., format="bnb")` can write it (bitsandbytes has the format).
        blockwise_absmax: bitsandbytes' blockwise absmax (NF4/FP4): double quantization applies, and
            CPU inference repacks the codes with a bfloat16 absmax copy (`kernels.pack_4bit_for_cpu`).
        decode_max_tokens: up to this many rows a layer never builds a float weight (its packed
            kernel); beyond, the planner counts a dequantized weight as a temporary.
    """

    name: str
    bits: int
    module: str
    description: str
    bnb_export: bool
    blockwise_absmax: bool
    decode_max_tokens: int

    @property
    def element_size(self) -> float:
        """Bytes per weight (without scales), as transformers' `quantized_element_size` wants it."""
        return self.bits / 8

    def module_class(self) -> type:
        """The quantized module class of this format."""
        return getattr(importlib.import_module("llmslim.quant.modules"), self.module)


FORMATS: dict[str, WeightFormat] = {
    f.name: f
    for f in (
        WeightFormat("int8", 8, "SlimLinear8bit", "LLM.int8: int8 rows with a float32 absmax each", True, False, 8),
        WeightFormat("nf4", 4, "SlimLinear4bit", "4-bit NormalFloat, blockwise absmax (bitsandbytes layout)", True, True, 32),
        WeightFormat("fp4", 4, "SlimLinear4bit", "4-bit float, blockwise absmax (bitsandbytes layout)", True, True, 32),
        WeightFormat("int4", 4, "SlimLinearInt4", "groupwise asymmetric int4, float16 scale and zero per group", False, False, 32),
    )
}
FOUR_BIT = tuple(name for name, f in FORMATS.items() if f.bits == 4)
BNB_FORMATS = tuple(name for name, f in FORMATS.items() if f.bnb_export)


def weight_choices(with_none: bool = True) -> tuple[str, ...]:
    """The values of a `--weights` option: `"none"` (float) first when `with_none`, then every format."""
    return ((NONE,) if with_none else ()) + tuple(FORMATS)


def get_format(name: str) -> WeightFormat:
    """The format called `name`; a ValueError lists the known ones."""
    if name not in FORMATS:
        raise ValueError(f"weights must be one of {list(FORMATS)} (or None for float), got {name!r}")
    return FORMATS[name]


def from_choice(choice: str | None) -> str | None:
    """A `--weights` value as `SlimConfig.weights` takes it: `"none"` (or None) is None."""
    return None if choice in (None, NONE) else choice


@dataclass(frozen=True)
class LayerSpec:
    """What one quantized layer needs to know: the fields of `SlimConfig` its module reads.

    Build it with `SlimConfig.layer_spec(name)`; modules never see the whole config.
    """

    fmt: str
    block_size: int = 64
    double_quant: bool = True
    int8_threshold: float = 6.0
    refine: bool = False
    compute_dtype: torch.dtype | None = None
    allow_nonfinite: bool = False

    def __post_init__(self) -> None:
        get_format(self.fmt)

    @property
    def format(self) -> WeightFormat:
        return FORMATS[self.fmt]

    def module_class(self) -> type:
        return self.format.module_class()
