"""`llmslim.compile_decode`: transformers' compiled static-cache generation, switched on for CPU."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_greedy_decode

import llmslim
from llmslim import SlimConfig


def test_compile_decode_configures_generation(tiny_llama):
    model = llmslim.from_pretrained(tiny_llama, SlimConfig(weights="nf4"), dtype=torch.bfloat16, progress=False)
    assert not model.hf_quantizer.is_compileable  # transformers never compiles an llmslim model unasked
    assert llmslim.compile_decode(model, max_cache_len=64) is model
    generation = model.generation_config
    assert generation.cache_implementation == "static" and generation.max_cache_len == 64
    assert generation.compile_config is not None and generation.compile_config._compile_all_devices
    assert model.hf_quantizer.is_compileable


@pytest.mark.parametrize("bad", (0, 1, 2.5, True, "64"))
def test_compile_decode_rejects_a_bad_cache_length(tiny_llama, bad):
    model = llmslim.from_pretrained(tiny_llama, SlimConfig(weights="int8"), dtype=torch.bfloat16, progress=False)
    with pytest.raises(ValueError, match=r"max_cache_len must be a number of tokens >= 2"):
        llmslim.compile_decode(model, max_cache_len=bad)


def _kernel_sized_llama(folder, layers: int):
    """A tiny Llama whose layers fit the CPU decode kernels (N % 32 == 0, K % 64 == 0)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=96,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def kernel_sized_llama(tmp_path_factory):
    return _kernel_sized_llama(tmp_path_factory.mktemp("kernel_sized"), layers=2)


@pytest.mark.parametrize("weights", ("nf4", "int8", "int4"))
def test_compiled_decode_matches_eager(kernel_sized_llama, weights):
    # the compiled decode step runs llmslim's CPU decode operators (gemv_4bit_cpu_layout,
    # gemv_int8_rows) through their fake implementations while tracing; its logits equal the
    # eager ones up to the bf16 rounding that fusion changes
    model = llmslim.from_pretrained(kernel_sized_llama, SlimConfig(weights=weights), dtype=torch.bfloat16, progress=False)
    prompt = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(0))

    def generate():
        out = model.generate(
            prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0
        )
        return out.sequences, torch.stack(out.logits).float()

    from torch._dynamo.utils import counters

    with torch.inference_mode():
        eager_tokens, eager_logits = generate()
        llmslim.compile_decode(model, max_cache_len=16)
        torch._dynamo.reset()
        counters.clear()
        compiled_tokens, compiled_logits = generate()
    assert not counters["graph_break"], list(counters["graph_break"])  # one graph per step (a float() of the nested offset broke it)
    # nf4 and int4 decode with int8 activations on CPUs with the integer-dot kernels: fused bf16 arithmetic can move an
    # activation across a rounding step, which flips near-ties of this random model's logits
    assert_same_greedy_decode(
        (eager_tokens, eager_logits), (compiled_tokens, compiled_logits), prompt.shape[1], 0.02 * eager_logits.abs().max().item()
    )


def test_compile_decode_refuses_a_streamed_model(tmp_path):
    # offloaded blocks get new tensors every call: a compiled step would recompile each time
    folder = _kernel_sized_llama(tmp_path / "four", layers=4)
    model = llmslim.from_pretrained(
        folder, SlimConfig(weights="nf4"), dtype=torch.bfloat16, offload="cpu", offload_budget=70_000, progress=False
    )
    assert any(getattr(m, "streamed", False) for m in model.modules())
    with pytest.raises(ValueError, match="compile_decode cannot compile a model whose layers are streamed per call"):
        llmslim.compile_decode(model)
