"""Mixed 4-bit/int8 under a bits-per-parameter budget: the choice, its bytes, and both load paths."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import llmslim
from llmslim import SlimConfig
from llmslim.quant import mixed
from llmslim.quant.modules import SlimLinear4bit, SlimLinear8bit, SlimLinearInt4
from llmslim.stats import model_nbytes


def _cost(name: str, error: float, out_features: int = 16, in_features: int = 64) -> mixed.LayerCost:
    return mixed.LayerCost(
        name,
        out_features * in_features,
        error,
        mixed.int4_bytes(out_features, in_features, 64),
        mixed.int8_bytes(out_features, in_features),
    )


def test_bytes_count_every_scale_and_zero():
    layer = SlimLinearInt4.from_linear(torch.nn.Linear(100, 24, bias=False), SlimConfig(weights="int4", block_size=32).layer_spec())
    assert mixed.int4_bytes(24, 100, 32) == sum(t.numel() * t.element_size() for t in layer.state_dict().values())
    int8 = SlimLinear8bit.from_linear(torch.nn.Linear(100, 24, bias=False), SlimConfig(weights="int8").layer_spec())
    assert mixed.int8_bytes(24, 100) == sum(t.numel() * t.element_size() for t in int8.state_dict().values())


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", [(24, 100), (600, 64)])  # one nested block; three (600 * 64 / 64 = 600 absmax)
def test_blockwise_4bit_bytes_count_the_absmax_and_its_nested_state(shape, double_quant):
    out_features, in_features = shape
    spec = SlimConfig(weights="nf4", double_quant=double_quant).layer_spec()
    layer = SlimLinear4bit.from_linear(torch.nn.Linear(in_features, out_features, bias=False), spec)
    expected = sum(t.numel() * t.element_size() for t in layer.state_dict().values())
    assert mixed.blockwise_4bit_bytes(out_features * in_features, 64, double_quant) == expected


def test_choice_takes_the_worst_layers_that_fit():
    costs = [_cost("a", 0.10), _cost("b", 0.30), _cost("c", 0.20)]
    per_layer = costs[0].int8_bytes - costs[0].four_bit_bytes
    base = sum(c.four_bit_bytes for c in costs)
    bits = 8 * (base + 2 * per_layer) / sum(c.numel for c in costs)  # room for exactly two upgrades
    assert mixed.choose(costs, bits) == ["b", "c"]
    assert mixed.choose(costs, bits - 0.01) == ["b"]


def test_choice_weighs_error_against_extra_bytes():
    # same relative error, but the big layer costs 4x the bytes to upgrade: the small one first
    costs = [_cost("big", 0.2, out_features=64), _cost("small", 0.2, out_features=16)]
    small_extra = costs[1].int8_bytes - costs[1].four_bit_bytes
    bits = 8 * (sum(c.four_bit_bytes for c in costs) + small_extra) / sum(c.numel for c in costs)
    assert mixed.choose(costs, bits) == ["small"]


def test_budget_below_int4_is_refused_with_the_minimum():
    with pytest.raises(ValueError, match=r"bits_per_param=4.1 is below what 4 bits alone take here \(4\.500 bits"):
        mixed.choose([_cost("a", 0.1)], 4.1)


@pytest.mark.parametrize("weights", ["int4", "nf4"])
def test_outlier_layer_is_the_one_kept_in_int8(weights):
    torch.manual_seed(0)
    smooth = torch.randn(32, 128)
    spiky = torch.randn(32, 128)
    spiky[::4, ::16] *= 40  # a few huge weights stretch every affected 4-bit block
    config = SlimConfig(weights=weights, bits_per_param=6.5)  # room for one of the two in int8
    chosen = mixed.choose_int8_layers([("smooth", smooth), ("spiky", spiky)], config)
    assert chosen.int8_layers == ["spiky"]


def _bits(model) -> float:
    layers = [m for m in model.modules() if isinstance(m, (SlimLinearInt4, SlimLinear4bit, SlimLinear8bit))]
    nbytes = sum(t.numel() * t.element_size() for m in layers for t in m.state_dict().values())
    return 8 * nbytes / sum(m.in_features * m.out_features for m in layers)


@pytest.mark.parametrize("weights, block_size, four_bit", [("int4", 32, SlimLinearInt4), ("nf4", 64, SlimLinear4bit)])
def test_from_pretrained_stays_within_budget_and_reloads_identically(tiny_llama, input_ids, tmp_path, weights, block_size, four_bit):
    config = SlimConfig(weights=weights, block_size=block_size, bits_per_param=6.0)
    model = llmslim.from_pretrained(tiny_llama, config, progress=False)
    int8 = [n for n, m in model.named_modules() if isinstance(m, SlimLinear8bit)]
    assert int8 and _bits(model) <= 6.0
    assert sorted(int8) == model.config.quantization_config.int8_layers
    assert any(isinstance(m, four_bit) for m in model.modules())
    llmslim.save_pretrained(model, tmp_path / "mixed")
    again = llmslim.from_pretrained(tmp_path / "mixed", progress=False)
    assert model_nbytes(again) == model_nbytes(model)
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids).logits, model(input_ids).logits, rtol=0, atol=0)
    # stock transformers loads the saved mixed model too (its config lists the int8 layers)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "mixed")
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids).logits, model(input_ids).logits, rtol=0, atol=0)


def test_quantize_in_place_chooses_the_same_layers(tiny_llama):
    config = SlimConfig(weights="int4", block_size=32, bits_per_param=6.0)
    loaded = llmslim.from_pretrained(tiny_llama, config, progress=False)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    llmslim.quantize_(model, config)
    assert model.config.quantization_config.int8_layers == loaded.config.quantization_config.int8_layers


def test_transformers_door_explains_it_cannot_choose(tiny_llama):
    with pytest.raises(ValueError, match=r"load with llmslim.from_pretrained\(path, config\)"):
        AutoModelForCausalLM.from_pretrained(tiny_llama, quantization_config=SlimConfig(weights="int4", bits_per_param=6.0))


def test_nf4_model_with_an_int8_head_reloads_identically(tiny_llama, input_ids, tmp_path):
    # int8_layers also names layers of an NF4 model kept in int8, such as the output head
    config = SlimConfig(weights="nf4", exclude=[], int8_layers=["lm_head"])
    model = llmslim.from_pretrained(tiny_llama, config, progress=False)
    assert isinstance(model.lm_head, SlimLinear8bit)
    assert not any(isinstance(m, SlimLinear8bit) for n, m in model.named_modules() if n != "lm_head")
    llmslim.save_pretrained(model, tmp_path / "head8")
    again = llmslim.from_pretrained(tmp_path / "head8", progress=False)
    assert isinstance(again.lm_head, SlimLinear8bit)
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids).logits, model(input_ids).logits, rtol=0, atol=0)


@pytest.fixture
def tied_llama(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=96,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp_path / "tied")
    return tmp_path / "tied"


def test_tied_head_named_in_int8_layers_becomes_an_int8_copy(tied_llama, input_ids, tmp_path):
    # SmolLM2-style tied head: the head gets its own int8 copy of the embedding; the embedding stays
    config = SlimConfig(weights="nf4", exclude=[], int8_layers=["lm_head"])
    model = llmslim.from_pretrained(tied_llama, config, progress=False)
    float_model = AutoModelForCausalLM.from_pretrained(tied_llama)
    embedding = float_model.get_input_embeddings().weight
    assert isinstance(model.lm_head, SlimLinear8bit) and not model.config.tie_word_embeddings
    assert torch.equal(model.get_input_embeddings().weight, embedding.to(model.get_input_embeddings().weight.dtype))
    torch.testing.assert_close(
        model.lm_head.dequantized_weight(torch.float32), embedding.float(), rtol=0, atol=embedding.abs().max().item() / 127
    )
    llmslim.save_pretrained(model, tmp_path / "saved")
    again = llmslim.from_pretrained(tmp_path / "saved", progress=False)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")  # stock transformers too
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids).logits, model(input_ids).logits, rtol=0, atol=0)
        torch.testing.assert_close(hf(input_ids).logits.to(model.dtype), model(input_ids).logits, rtol=0, atol=0)
    # the in-place door does the same
    llmslim.quantize_(float_model, config)
    assert isinstance(float_model.lm_head, SlimLinear8bit) and isinstance(float_model.get_input_embeddings(), torch.nn.Embedding)


def test_int8_layers_must_be_selected():
    with pytest.raises(ValueError, match=r"int8_layers names \['lm_head'\], which include/exclude leave in float"):
        SlimConfig(weights="nf4", int8_layers=["lm_head"])
