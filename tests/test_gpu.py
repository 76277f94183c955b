"""CUDA paths (bitsandbytes kernels); skipped without a GPU."""

from __future__ import annotations

import dataclasses

import pytest
import torch

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
