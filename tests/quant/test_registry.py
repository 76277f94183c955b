"""The format registry: every format has a working module, and everything that lists formats reads it."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from llmslim.config import WEIGHT_FORMATS, SlimConfig
from llmslim.quant import formats, kernels, registry
from llmslim.quant.modules import SlimLinear


@pytest.mark.parametrize("name", list(registry.FORMATS))
def test_each_format_builds_its_module_and_counts_its_bits(name):
    fmt = registry.FORMATS[name]
    spec = SlimConfig(weights=name, exclude=[]).layer_spec("fc")
    layer = fmt.module_class().from_linear(nn.Linear(64, 32, device="meta"), spec, "fc")
    assert isinstance(layer, SlimLinear) and layer.fmt == name
    codes = layer.state_dict()["weight"]
    assert codes.numel() * codes.element_size() * 8 == 64 * 32 * fmt.bits  # bits per weight before scales
    assert fmt.element_size == fmt.bits / 8


def test_layer_spec_carries_the_fields_modules_read():
    config = SlimConfig(weights="int4", block_size=32, refine=True, compute_dtype="bfloat16", allow_nonfinite=True, int8_layers=["a"])
    spec = config.layer_spec("b")
    assert (spec.fmt, spec.block_size, spec.refine, spec.compute_dtype, spec.allow_nonfinite) == ("int4", 32, True, torch.bfloat16, True)
    assert config.layer_spec("a").fmt == "int8"  # mixed int4/int8: the layer's own format
    assert config.layer_spec(weights="nf4").fmt == "nf4"


def test_layer_spec_refuses_an_unknown_format_and_lists_the_known():
    with pytest.raises(ValueError, match=r"weights must be one of \['int8', 'nf4', 'fp4', 'int4'\] \(or None for float\), got 'int3'"):
        registry.LayerSpec("int3")


def test_choices_and_config_validation_come_from_the_table():
    assert registry.weight_choices() == ("none", *registry.FORMATS)
    assert registry.weight_choices(with_none=False) == tuple(registry.FORMATS)
    assert WEIGHT_FORMATS == (None, *registry.FORMATS)
    assert registry.from_choice("none") is None and registry.from_choice("nf4") == "nf4"
    assert registry.FOUR_BIT == ("nf4", "fp4", "int4")
    assert registry.BNB_FORMATS == ("int8", "nf4", "fp4")


def test_table_agrees_with_the_numerics_and_kernels():
    blockwise = tuple(n for n, f in registry.FORMATS.items() if f.blockwise_absmax)
    assert blockwise == formats.FOUR_BIT_FORMATS  # the NF4/FP4 codebooks
    for name, fmt in registry.FORMATS.items():
        expected = kernels.INT8_DECODE_MAX_TOKENS if fmt.bits == 8 else kernels.DECODE_MAX_TOKENS
        assert fmt.decode_max_tokens == expected, name
