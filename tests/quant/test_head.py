"""The int8 decode head (`SlimConfig.decode_head`, `llmslim.quant.head`): on by default, exact for prompts, int8 rows for
decoded tokens, never in the saved model."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_greedy_decode
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import llmslim
from llmslim import SlimConfig
from llmslim.quant import formats, kernels
from llmslim.quant.head import Int8DecodeHead, use_int8_decode_head


@pytest.fixture(scope="module")
def decode_llama(tmp_path_factory):
    """A tiny untied Llama whose head fits the int8 decode kernel (K % 32 == 0), with a larger vocabulary."""
    folder = tmp_path_factory.mktemp("decode_llama")
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=160,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    return folder


def _reference_int8_logits(head: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The int8 head's math in float32 (formats' reference), 16-bit activations: the int8 weight with one absmax per
    row and block of 128 columns where llmslim's decode kernel runs, else one per row."""
    weight = head.weight.detach()
    if kernels.int8_blocks_usable(weight):
        return x.float() @ formats.dequantize_int8_blocks(*formats.quantize_int8_blocks(weight)).T
    return x.float() @ formats.dequantize_int8_rows(*formats.quantize_int8_rows(weight)).T


@pytest.mark.parametrize("weights", ("nf4", "int8", "int4"))
def test_the_defaults_decode_through_an_int8_head(decode_llama, weights):
    model = llmslim.from_pretrained(decode_llama, SlimConfig(weights=weights), progress=False)
    assert SlimConfig().decode_head == "int8"
    assert type(model.lm_head) is Int8DecodeHead
    x = torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with torch.no_grad():
        got = model.lm_head(x).float()
    buffers = dict(model.lm_head.named_buffers())
    assert "decode_weight" in buffers
    assert buffers["decode_absmax"].dim() == (2 if kernels.int8_blocks_usable(model.lm_head.weight) else 1)
    want = _reference_int8_logits(model.lm_head, x)
    torch.testing.assert_close(got, want, rtol=0, atol=0.02 * want.abs().max().item())  # bf16 output rounding
    exact = torch.nn.functional.linear(x, model.lm_head.weight).float()
    assert not torch.equal(got, exact)  # the int8 copy computed it, not the float weight


def test_prompts_and_training_use_the_float_weight(decode_llama):
    model = llmslim.from_pretrained(decode_llama, SlimConfig(weights="nf4"), progress=False)
    head = model.lm_head
    prompt = torch.randn(1, kernels.INT8_DECODE_MAX_TOKENS + 1, 64).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(head(prompt), torch.nn.functional.linear(prompt, head.weight))
    assert "decode_weight" not in dict(head.named_buffers())  # only a decoded token builds the copy
    token = torch.randn(1, 1, 64, dtype=torch.bfloat16, requires_grad=True)
    out = head(token)  # grad wanted: the float path, differentiable
    assert torch.equal(out, torch.nn.functional.linear(token, head.weight))
    out.sum().backward()
    assert token.grad is not None


def test_the_copy_follows_the_weight_and_never_enters_the_state_dict(decode_llama, tmp_path):
    model = llmslim.from_pretrained(decode_llama, SlimConfig(weights="nf4"), progress=False)
    head = model.lm_head
    x = torch.randn(1, 1, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        head(x)
        assert not any("decode" in key for key in model.state_dict())
        head.weight.mul_(2)  # an in-place update (an optimizer step, load_state_dict) makes the copy stale
        got = head(x).float()
    torch.testing.assert_close(got, _reference_int8_logits(head, x), rtol=0, atol=0.02 * got.abs().max().item())
    llmslim.save_pretrained(model, tmp_path / "saved")
    reloaded = llmslim.from_pretrained(tmp_path / "saved", progress=False)
    assert type(reloaded.lm_head) is Int8DecodeHead
    assert torch.equal(reloaded.lm_head.weight, head.weight)  # the float head was saved, not the int8 copy


def test_float_opts_out_and_a_quantized_head_is_left_alone(decode_llama):
    model = llmslim.from_pretrained(decode_llama, SlimConfig(weights="nf4", decode_head="float"), progress=False)
    assert type(model.lm_head) is nn.Linear
    assert model.config.quantization_config.decode_head == "float"
    int8_head = llmslim.from_pretrained(decode_llama, SlimConfig(weights="nf4", exclude=[], int8_layers=["lm_head"]), progress=False)
    assert not isinstance(int8_head.lm_head, Int8DecodeHead)
    with pytest.raises(ValueError, match=r"decode_head must be one of \['int8', 'float'\], got 'fast'"):
        SlimConfig(decode_head="fast")


def test_every_door_gives_the_int8_head(decode_llama):
    from_transformers = AutoModelForCausalLM.from_pretrained(decode_llama, quantization_config=SlimConfig(weights="nf4"))
    assert type(from_transformers.lm_head) is Int8DecodeHead
    in_memory = AutoModelForCausalLM.from_pretrained(decode_llama, dtype=torch.bfloat16)
    llmslim.quantize_(in_memory, SlimConfig(weights="int8"))
    assert type(in_memory.lm_head) is Int8DecodeHead
    plain = nn.Linear(4, 4)
    assert not use_int8_decode_head(plain)  # no output head to find: nothing changes


def test_tied_head_stays_tied(tiny_models):
    model = llmslim.from_pretrained(tiny_models["gpt2"], SlimConfig(weights="nf4"), progress=False)  # ties its embeddings
    assert type(model.lm_head) is Int8DecodeHead
    assert model.lm_head.weight is model.transformer.wte.weight
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
        model.lm_head(torch.randn(1, 1, 32, dtype=model.lm_head.weight.dtype))
    assert model.lm_head.weight is model.transformer.wte.weight


def test_greedy_tokens_match_the_float_head(decode_llama):
    # 64 greedy tokens with the int8 head against the float head: equal, or differing only where the float head's top
    # two logits tie within the int8 rounding (the random model's logits are nearly flat)
    prompt = torch.randint(0, 160, (1, 8), generator=torch.Generator().manual_seed(3))

    def run(decode_head):
        model = llmslim.from_pretrained(decode_llama, SlimConfig(weights="nf4", decode_head=decode_head), progress=False)
        out = model.generate(
            prompt, max_new_tokens=64, min_new_tokens=64, do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0
        )
        return out.sequences, torch.stack(out.logits).float()

    reference, fast = run("float"), run("int8")
    assert_same_greedy_decode(reference, fast, prompt.shape[1], 0.02 * reference[1].abs().max().item())
