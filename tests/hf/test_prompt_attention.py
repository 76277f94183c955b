"""A prompt's attention on llmslim's CPU kernel (`llmslim.hf.attention`): taken by default where built, SDPA elsewhere."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_same_greedy_decode
from transformers import AutoModelForCausalLM, LlamaConfig

import llmslim
from llmslim import SlimConfig
from llmslim.hf import attention
from llmslim.hf.attention import PROMPT_ATTENTION, use_prompt_attention
from llmslim.quant import kernels

from .test_decode import _SHAPE  # head size 16 (the kernel's smallest), grouped queries

needs_kernel = pytest.mark.skipif(not kernels.prompt_attention_kernel(), reason="attend_prompt_rows is built for AVX-512 BF16")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prompt_attention") / "llama"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(LlamaConfig(**_SHAPE)).to(torch.bfloat16).save_pretrained(folder)
    return folder


def _prompt(length: int, batch: int = 1) -> torch.Tensor:
    return torch.randint(0, 160, (batch, length), generator=torch.Generator().manual_seed(length))


def _kernel_calls(monkeypatch) -> list:
    """Count the attention calls the kernel took."""
    taken = []
    causal_prompt = attention.causal_prompt

    def counted(*args):
        out = causal_prompt(*args)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(attention, "causal_prompt", counted)
    return taken


def _greedy(model, prompt: torch.Tensor, steps: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode():
        out = model.generate(prompt, max_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits)


@needs_kernel
@pytest.mark.parametrize("weights", ("nf4", "int8", None))
def test_a_loaded_model_attends_its_prompt_through_the_kernel(llama, weights, monkeypatch):
    model = llmslim.from_pretrained(llama, SlimConfig(weights=weights), dtype=torch.bfloat16, progress=False)
    assert model.config._attn_implementation == PROMPT_ATTENTION
    taken = _kernel_calls(monkeypatch)
    prompt = _prompt(70)
    ours = _greedy(model, prompt)
    assert taken and all(taken[:2])  # both layers' prompt attention; decoded tokens take the lean step or SDPA
    model.set_attn_implementation("sdpa")  # the documented opt-out
    taken.clear()
    sdpa = _greedy(model, prompt)
    assert not taken
    # the kernel's outputs are at most a bf16 step off SDPA's: the logits stay within rounding, the tokens those of SDPA
    assert_same_greedy_decode(sdpa, ours, prompt.shape[1], tolerance=0.05)


@needs_kernel
def test_calls_the_kernel_does_not_take_run_sdpa_unchanged(llama, monkeypatch):
    model = llmslim.from_pretrained(llama, SlimConfig(weights="nf4"), dtype=torch.bfloat16, progress=False)
    taken = _kernel_calls(monkeypatch)
    ids = _prompt(20, batch=2)
    padded = torch.ones_like(ids)
    padded[1, :5] = 0  # a left-padded row: a mask, which the kernel does not take

    def logits(implementation: str, grad: bool) -> torch.Tensor:
        model.set_attn_implementation(implementation)
        with torch.set_grad_enabled(grad):
            return model(ids, attention_mask=padded).logits

    assert torch.equal(logits(PROMPT_ATTENTION, grad=False), logits("sdpa", grad=False))
    assert taken == []
    # gradients: the kernel has no backward, so a call that needs one runs SDPA
    model.set_attn_implementation(PROMPT_ATTENTION)
    embeds = model.get_input_embeddings()(ids[:1]).detach().requires_grad_()
    out = model(inputs_embeds=embeds).logits
    out.float().sum().backward()
    assert embeds.grad is not None and taken == [False, False]


def test_without_the_kernel_a_model_keeps_its_attention(llama, monkeypatch):
    monkeypatch.setattr(kernels, "prompt_attention_kernel", lambda: False)
    model = llmslim.from_pretrained(llama, SlimConfig(weights="nf4"), dtype=torch.bfloat16, progress=False)
    assert model.config._attn_implementation == "sdpa"
    monkeypatch.undo()
    model.set_attn_implementation("eager")  # a user's choice other than SDPA is kept
    assert not use_prompt_attention(model) and model.config._attn_implementation == "eager"


@needs_kernel
def test_the_transformers_door_and_quantize_in_place_give_the_kernel(llama):
    door = AutoModelForCausalLM.from_pretrained(llama, quantization_config=SlimConfig(weights="nf4"))
    assert door.config._attn_implementation == PROMPT_ATTENTION
    plain = AutoModelForCausalLM.from_pretrained(llama, dtype=torch.bfloat16)
    llmslim.quantize_(plain, SlimConfig(weights="nf4"))
    assert plain.config._attn_implementation == PROMPT_ATTENTION


@needs_kernel
def test_a_saved_model_names_no_llmslim_attention(llama, tmp_path):
    model = llmslim.from_pretrained(llama, SlimConfig(weights="nf4"), dtype=torch.bfloat16, progress=False)
    llmslim.save_pretrained(model, tmp_path / "saved")
    assert PROMPT_ATTENTION not in (tmp_path / "saved" / "config.json").read_text()
    assert "_attn_implementation" not in json.loads((tmp_path / "saved" / "config.json").read_text())
    # the folder loads through transformers' door (its quantizer is llmslim's), which chooses the attention again
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "saved").config._attn_implementation == PROMPT_ATTENTION


@needs_kernel
def test_the_servers_rows_take_the_kernel_for_prompts_after_cached_tokens(monkeypatch):
    from types import SimpleNamespace

    from llmslim.serve.kvcache import _suffix_mask, row_attention

    taken = _kernel_calls(monkeypatch)
    module = SimpleNamespace(num_key_value_groups=2, is_causal=True)
    g = torch.Generator().manual_seed(0)
    query = torch.randn(2, 4, 6, 16, generator=g).to(torch.bfloat16)
    # row 0: a whole prompt of 6 tokens; row 1: 6 new tokens after 9 cached ones (a prefix cache hit, a later chunk)
    keys = [torch.randn(1, 2, n, 16, generator=g).to(torch.bfloat16) for n in (6, 15)]
    values = [torch.randn(1, 2, n, 16, generator=g).to(torch.bfloat16) for n in (6, 15)]
    got, _ = row_attention(module, query, keys, values, None, dropout=0.0, scaling=0.25)
    assert taken == [True, True]
    for row, (k, v) in enumerate(zip(keys, values, strict=True)):
        mask = _suffix_mask(6, k.shape[2], "cpu")
        exact = torch.nn.functional.scaled_dot_product_attention(
            query[row : row + 1].double(), k.double(), v.double(), attn_mask=mask, is_causal=mask is None, scale=0.25, enable_gqa=True
        ).transpose(1, 2)
        assert float((got[row : row + 1].double() - exact).abs().max()) <= 2**-7
    # one token each (decode): SDPA, as before, without asking the kernel
    taken.clear()
    row_attention(module, query[:, :, :1], keys, values, None, dropout=0.0, scaling=0.25)
    assert taken == []
