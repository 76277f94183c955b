"""Non-finite float weights (NaN, Inf) are refused by name in every format and door, unless `allow_nonfinite`."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import write_tiny_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import llmslim
from llmslim import SlimConfig
from llmslim.quant.registry import FORMATS

LAYER = "model.layers.1.mlp.up_proj"
CONFIGS = {
    "int8": SlimConfig(weights="int8"),
    "nf4": SlimConfig(weights="nf4"),
    "fp4": SlimConfig(weights="fp4"),
    "nf4-no-dq": SlimConfig(weights="nf4", double_quant=False),
    "int4": SlimConfig(weights="int4"),
    "int4-refine": SlimConfig(weights="int4", refine=True),
    "int4-mixed": SlimConfig(weights="int4", bits_per_param=6.0),
}
BAD = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def _refusal(name: str, n_nan: int, n_inf: int) -> str:
    return rf"layer '{name}': its float weight holds {n_nan} NaN and {n_inf} infinite value\(s\) of \d+, .*allow_nonfinite=True"


def _counts(bad: str) -> tuple[int, int]:
    return (1, 0) if bad == "nan" else (0, 1)


@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("config", list(CONFIGS.values()), ids=list(CONFIGS))
def test_quantize_refuses_a_nonfinite_weight_naming_the_layer(config, bad):
    model = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.Linear(64, 32))
    with torch.no_grad():
        model[1].weight[3, 5] = BAD[bad]
    with pytest.raises(ValueError, match=_refusal("1", *_counts(bad))):
        llmslim.quantize_(model, config)


@pytest.mark.parametrize("weights", ["int8", "nf4", "fp4", "int4"])
def test_from_linear_names_the_layer_and_an_unnamed_layer_gives_its_shape(weights):
    config = SlimConfig(weights=weights)
    linear = torch.nn.Linear(64, 32)
    weight = linear.weight.detach().clone()
    weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match=_refusal("blocks.0.fc", 0, 1)):
        FORMATS[weights].module_class().from_linear(linear, config.layer_spec(), "blocks.0.fc").set_float_weight(weight)
    with pytest.raises(ValueError, match=r"^a layer of shape \(32, 64\): its float weight holds 0 NaN and 1 infinite"):
        FORMATS[weights].module_class().from_linear(linear, config.layer_spec()).set_float_weight(weight)


@pytest.mark.parametrize("weights", ["int8", "nf4", "fp4", "int4"])
def test_allow_nonfinite_quantizes_anyway_and_warns(weights, caplog):
    model = torch.nn.Sequential(torch.nn.Linear(64, 32))
    with torch.no_grad():
        model[0].weight[1, 1] = float("nan")
    with caplog.at_level(logging.WARNING, logger="llmslim.quant.modules"):
        assert llmslim.quantize_(model, SlimConfig(weights=weights, allow_nonfinite=True)) == ["0"]
    assert "layer '0': its float weight holds 1 NaN" in caplog.text and "allow_nonfinite=True" in caplog.text


def test_finite_weights_quantize_as_before():
    model = torch.nn.Sequential(torch.nn.Linear(64, 32))
    expected = model[0].weight.detach().clone()
    llmslim.quantize_(model, SlimConfig(weights="int8"))
    assert torch.allclose(model[0].dequantized_weight(torch.float32), expected, atol=2e-2)


def test_quantize_works_on_a_module_without_embeddings():
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32))
    x = torch.randn(3, 64)
    expected = model(x)
    assert llmslim.quantize_(model, SlimConfig(weights="int4", bits_per_param=6.0)) == ["0", "2"]
    assert torch.allclose(model(x), expected, atol=0.1)


@pytest.fixture(scope="module")
def corrupt_checkpoints(tmp_path_factory):
    """Tiny Llama checkpoints with one NaN or one Inf in a linear layer's weight."""
    out = {}
    for bad, value in BAD.items():
        path = write_tiny_model(tmp_path_factory.mktemp(bad) / "llama", "llama")
        tensors = load_file(path / "model.safetensors")
        tensors[f"{LAYER}.weight"][3, 5] = value
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
        out[bad] = path
    return out


@pytest.mark.parametrize("bad", list(BAD))
@pytest.mark.parametrize("weights", ["int8", "nf4", "int4"])
def test_llmslim_door_refuses_a_nonfinite_checkpoint(corrupt_checkpoints, weights, bad):
    with pytest.raises(ValueError, match=_refusal(LAYER, *_counts(bad))):
        llmslim.from_pretrained(corrupt_checkpoints[bad], SlimConfig(weights=weights), progress=False)


def test_llmslim_door_mixed_choice_refuses_before_measuring(corrupt_checkpoints):
    with pytest.raises(ValueError, match=_refusal(LAYER, 1, 0)):
        llmslim.from_pretrained(corrupt_checkpoints["nan"], SlimConfig(weights="int4", bits_per_param=6.0), progress=False)


def test_llmslim_door_loads_with_allow_nonfinite(corrupt_checkpoints):
    model = llmslim.from_pretrained(corrupt_checkpoints["nan"], SlimConfig(weights="int8", allow_nonfinite=True), progress=False)
    assert model.config.quantization_config.allow_nonfinite is True


@pytest.mark.parametrize("weights", ["int8", "nf4", "int4"])
def test_transformers_door_refuses_a_nonfinite_checkpoint(corrupt_checkpoints, weights, caplog):
    # transformers catches the quantizer's ValueError, reports it (with the layer) and raises its own RuntimeError
    with pytest.raises(RuntimeError, match="conversion"):
        AutoModelForCausalLM.from_pretrained(corrupt_checkpoints["inf"], quantization_config=SlimConfig(weights=weights))
    assert f"layer '{LAYER}': its float weight holds 0 NaN and 1 infinite" in caplog.text


def test_transformers_door_loads_with_allow_nonfinite(corrupt_checkpoints):
    config = SlimConfig(weights="nf4", allow_nonfinite=True)
    model = AutoModelForCausalLM.from_pretrained(corrupt_checkpoints["nan"], quantization_config=config)
    assert type(model.get_submodule(LAYER)).__name__ == "SlimLinear4bit"
