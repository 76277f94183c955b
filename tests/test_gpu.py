"""CUDA paths (bitsandbytes kernels); skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

import llmslim
from llmslim import SlimConfig
from llmslim.quant import formats, kernels

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("fmt", ["nf4", "fp4"])
def test_cuda_quantization_equals_cpu_codes(fmt):
    weight = torch.randn(256, 320, dtype=torch.bfloat16)
    on_gpu = kernels.quantize_4bit(weight.cuda(), fmt, 64, double_quant=False)
    reference = formats.quantize_4bit(weight, fmt, 64, double_quant=False)
    assert torch.equal(on_gpu.codes.cpu(), reference.codes)
    assert torch.equal(on_gpu.absmax.cpu(), reference.absmax)


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

    slim = SlimLinear8bit.from_linear(layer, SlimConfig(weights="int8"))
    slim.set_float_weight(layer.weight.data)
    slim.bias = torch.nn.Parameter(layer.bias.data, requires_grad=False)
    slim, layer = slim.cuda(), layer.cuda()
    x = torch.randn(16, 128, dtype=torch.float16, device="cuda")
    x[:, 7] = 40.0  # an outlier feature column
    rel = (slim(x) - layer(x)).abs().max() / layer(x).abs().max()
    assert rel < 0.02
