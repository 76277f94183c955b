"""CUDA paths (bitsandbytes kernels); skipped without a GPU."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import assert_same_greedy_decode

import llmslim
from llmslim import SlimConfig
from llmslim.quant import formats, kernels

pytestmark = pytest.mark.gpu


def test_cuda_nf4_quantization_equals_cpu_codes():
    weight = torch.randn(256, 320, dtype=torch.bfloat16)
    on_gpu = kernels.quantize_4bit(weight.cuda(), "nf4", 64, double_quant=False)
    reference = formats.quantize_4bit(weight, "nf4", 64, double_quant=False)
    assert torch.equal(on_gpu.codes.cpu(), reference.codes)
    assert torch.equal(on_gpu.absmax.cpu(), reference.absmax)


def test_cuda_fp4_quantization_is_as_accurate_as_cpu():
    # bitsandbytes' CUDA FP4 quantizer rounds by a threshold tree that differs from its CPU
    # quantizer (nearest code) on some values (seen on an H200: the codes were not all equal), so
    # the two are checked on their error: same absmax, and GPU codes within 2% of the CPU's error
    weight = torch.randn(256, 320, dtype=torch.bfloat16)
    on_gpu = kernels.quantize_4bit(weight.cuda(), "fp4", 64, double_quant=False)
    reference = formats.quantize_4bit(weight, "fp4", 64, double_quant=False)
    assert torch.equal(on_gpu.absmax.cpu(), reference.absmax)
    on_cpu = dataclasses.replace(on_gpu, codes=on_gpu.codes.cpu(), absmax=on_gpu.absmax.cpu())
    gpu_error = (formats.dequantize_4bit(on_cpu, torch.float32) - weight.float()).abs().mean()
    cpu_error = (formats.dequantize_4bit(reference, torch.float32) - weight.float()).abs().mean()
    assert gpu_error <= 1.02 * cpu_error


@pytest.mark.parametrize("device_map", [None, "auto"])
def test_a_visible_gpu_is_the_default_device(tiny_llama, device_map, input_ids):
    model = llmslim.from_pretrained(tiny_llama, SlimConfig(weights="nf4"), device_map=device_map, progress=False)
    assert {t.device.type for t in model.state_dict().values()} == {"cuda"}
    with torch.no_grad():
        assert model(input_ids.cuda()).logits.isfinite().all()


@pytest.mark.parametrize("weights", ["int8", "nf4", "fp4"])
def test_load_on_cuda_matches_cpu(tiny_llama, weights, input_ids):
    cpu = llmslim.from_pretrained(tiny_llama, SlimConfig(weights=weights), device_map="cpu", progress=False)
    gpu = llmslim.from_pretrained(tiny_llama, SlimConfig(weights=weights), device_map="cuda", progress=False)
    assert all(t.device.type == "cuda" for t in gpu.state_dict().values())
    with torch.no_grad():
        expected = cpu(input_ids).logits.float()
        got = gpu(input_ids.cuda()).logits.float().cpu()
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()


def test_int8_outlier_decomposition_on_cuda():
    layer = torch.nn.Linear(128, 64).half()
    from llmslim.quant.modules import SlimLinear8bit

    slim = SlimLinear8bit.from_linear(layer, SlimConfig(weights="int8").layer_spec())
    slim.set_float_weight(layer.weight.data)
    slim.bias = torch.nn.Parameter(layer.bias.data, requires_grad=False)
    slim, layer = slim.cuda(), layer.cuda()
    x = torch.randn(16, 128, dtype=torch.float16, device="cuda")
    x[:, 7] = 40.0  # an outlier feature column
    rel = (slim(x) - layer(x)).abs().max() / layer(x).abs().max()
    assert rel < 0.02


# ---- the CUDA decode paths: direct operators, PyTorch's int4 kernel, compiled decode (issue 22) ----


def _layer(weights: str, in_features: int = 256, out_features: int = 128):
    from llmslim.quant.modules import replace_linear_modules

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(in_features, out_features, bias=False)).to(torch.bfloat16)
    reference = model[0].weight.detach().clone()
    replace_linear_modules(model, SlimConfig(weights=weights, exclude=[]))
    layer = model[0]
    layer.set_float_weight(reference)
    return layer.cuda().eval()


@pytest.mark.parametrize("weights", ["nf4", "fp4", "int8", "int4"])
@pytest.mark.parametrize("tokens", [1, 16])
def test_cuda_layer_equals_its_dequantized_weight(weights, tokens):
    layer = _layer(weights)
    x = torch.randn(1, tokens, 256, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        out = layer(x).float()
        state = layer.state_dict()  # the stored layout, even with int4's codes repacked for the kernel
        expected = x.float() @ layer.dequantized_weight(torch.float32).t()
    assert (out - expected).abs().max() <= 0.02 * expected.abs().max()
    assert state["weight"].dtype != torch.int32


def test_int4_cuda_layout_saves_the_stored_codes(tmp_path):
    layer = _layer("int4")
    stored = layer.weight.detach().clone()
    with torch.no_grad():
        layer(torch.randn(1, 1, 256, dtype=torch.bfloat16, device="cuda"))
    assert layer.cuda_layout  # repacked for PyTorch's CUDA int4 kernel at the first call
    assert torch.equal(layer.state_dict()["weight"], stored)
    assert torch.equal(layer.int4_weight().codes, stored)


def test_cuda_calls_build_no_bitsandbytes_state(monkeypatch):
    import bitsandbytes.functional as bnb_f

    layers = [_layer(w) for w in ("nf4", "int8")]

    def refuse(*args, **kwargs):
        raise AssertionError("a QuantState was built per call")

    monkeypatch.setattr(bnb_f.QuantState, "__init__", refuse)
    with torch.no_grad():
        for layer in layers:
            for tokens in (1, 16):
                layer(torch.randn(1, tokens, 256, dtype=torch.bfloat16, device="cuda"))


@pytest.fixture(scope="module")
def kernel_sized_llama_cuda(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=96
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("cuda_llama")
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("weights", ["nf4", "fp4", "int8", "int4"])
def test_compiled_decode_on_cuda_equals_eager_without_graph_breaks(kernel_sized_llama_cuda, weights):
    from torch._dynamo.utils import counters

    model = llmslim.from_pretrained(
        kernel_sized_llama_cuda, SlimConfig(weights=weights), dtype=torch.bfloat16, device_map="cuda", progress=False
    )
    prompt = torch.randint(0, 96, (1, 6), generator=torch.Generator().manual_seed(0)).cuda()

    def generate():
        out = model.generate(
            prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0
        )
        return out.sequences, torch.stack(out.logits).float()

    torch._dynamo.reset()
    counters.clear()
    with torch.inference_mode():
        eager_tokens, eager_logits = generate()
        llmslim.compile_decode(model, max_cache_len=16)
        generate()
        compiled_tokens, compiled_logits = generate()  # the second call replays the captured graphs
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert_same_greedy_decode(
        (eager_tokens, eager_logits), (compiled_tokens, compiled_logits), prompt.shape[1], 0.02 * eager_logits.abs().max().item()
    )
