"""Mixture-of-experts: fused 3-D expert weights quantized per expert, through transformers' door and in place."""

from __future__ import annotations

import logging
import re
import shutil

import bitsandbytes.functional as bnb_f
import pytest
import torch
from transformers import AutoModelForCausalLM

import llmslim
from llmslim import SlimConfig, save_pretrained
from llmslim.quant.experts import SlimExpertWeights, expert_stores, experts_modules, quantize_experts_, quantized_experts
from llmslim.quant.quantize import quantize_
from llmslim.quant.registry import FORMATS
from quant.tiny_moe import MOE_CONFIGS
from quant.tiny_moe import float_moe as _float_model

# ||logits - float logits|| / ||float logits||, experts quantized, tiny random models (measured: int8 <= 0.08,
# 4-bit 0.04-0.28; int8 includes LLM.int8's int8 activations on a 10-token prompt)
TOLERANCE = {"int8": 0.12, "nf4": 0.35, "fp4": 0.4, "int4": 0.35}


def _expert_float_bytes(model: torch.nn.Module) -> int:
    params = [p for _, m in experts_modules(model) for p in m.parameters(recurse=False)]
    return sum(p.numel() * p.element_size() for p in params if p.dim() == 3 and p.is_floating_point())


@pytest.fixture(scope="module")
def hub_folders(tmp_path_factory):
    """Each architecture saved by transformers itself (one tensor per expert where its Hub format has them)."""
    root = tmp_path_factory.mktemp("moe")
    folders = {}
    for arch in MOE_CONFIGS:
        folders[arch] = root / arch
        _float_model(arch).save_pretrained(folders[arch])
    return folders


@pytest.mark.parametrize("weights", list(FORMATS))
@pytest.mark.parametrize("arch", list(MOE_CONFIGS))
def test_transformers_door_quantizes_every_expert_and_reloads_identically(hub_folders, tmp_path, arch, weights):
    reference = _float_model(arch)
    ids = torch.randint(0, 96, (1, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(ids).logits
    config = SlimConfig(weights=weights, block_size=32, include=["*experts*"])
    model = AutoModelForCausalLM.from_pretrained(hub_folders[arch], quantization_config=config).eval()

    assert _expert_float_bytes(model) == 0, "an expert weight stayed in float"
    stores = dict(quantized_experts(model))
    assert len(stores) == 2 * len(list(experts_modules(model)))  # gate_up and down of every experts module
    float_bytes = _expert_float_bytes(reference)
    quantized_bytes = sum(s.quantized_nbytes() for s in stores.values())
    assert quantized_bytes <= float_bytes * (FORMATS[weights].bits + 1.5) / 32  # float32 experts -> bits + scales
    with torch.no_grad():
        logits = model(ids).logits
    assert (logits - expected).norm() / expected.norm() < TOLERANCE[weights]

    model.save_pretrained(tmp_path / "q")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    saved, loaded = model.state_dict(), reloaded.state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)  # bit-identical
    with torch.no_grad():  # not bit-equal: torch's float GEMV (the router, the shared-expert gate) may sum in another
        # order for a weight mapped at another alignment from the file (seen on an AVX2-only AMD EPYC)
        torch.testing.assert_close(reloaded(ids).logits, logits, rtol=1e-5, atol=1e-6)
    greedy = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(reloaded.generate(ids, max_new_tokens=4, do_sample=False), greedy)


@pytest.mark.parametrize("weights", ["int8", "nf4", "int4"])
@pytest.mark.parametrize("arch", list(MOE_CONFIGS))
def test_routed_forward_equals_the_float_experts_it_dequantizes_to(arch, weights):
    """The quantized experts compute exactly what float experts holding their dequantized weights compute."""
    model = _float_model(arch)
    quantize_experts_(model, SlimConfig(weights=weights, block_size=32))
    name, module = next((n, m) for n, m in experts_modules(model) if expert_stores(m))
    floats = _float_model(arch).get_submodule(name)
    with torch.no_grad():
        for proj, store in expert_stores(module).items():
            weight = store.dequantized_weight(torch.float32)  # (experts, out, in)
            getattr(floats, proj).copy_(weight.transpose(1, 2) if store.transposed else weight)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(10, 64, generator=g)
    top_k = torch.stack([torch.randperm(module.num_experts, generator=g)[:2] for _ in range(10)])  # (tokens, 2)
    top_k_weights = torch.rand(10, 2, generator=g)
    with torch.no_grad():
        got, expected = module(x, top_k, top_k_weights), floats(x, top_k, top_k_weights)
    assert (got - expected).norm() / expected.norm() < 1e-5


def test_only_the_routed_experts_are_read():
    model = _float_model("qwen3_moe")
    quantize_experts_(model, SlimConfig(weights="nf4"))
    module = model.model.layers[0].mlp.experts
    read = []
    for proj, store in expert_stores(module).items():
        original = store.expert
        store.expert = lambda index, original=original, proj=proj: read.append((proj, index)) or original(index)
    module(torch.randn(3, 64), torch.tensor([[1, 5], [5, 2], [1, 2]]), torch.rand(3, 2))
    assert sorted(read) == sorted((p, e) for p in ("gate_up_proj", "down_proj") for e in (1, 2, 5))


def test_nf4_experts_are_bitsandbytes_per_expert(hub_folders):
    model = AutoModelForCausalLM.from_pretrained(
        hub_folders["qwen3_moe"], quantization_config=SlimConfig(weights="nf4", double_quant=False)
    )
    reference = _float_model("qwen3_moe")
    name, store = next(quantized_experts(model))
    module_name, _, proj = name.rpartition(".")
    weight = getattr(reference.get_submodule(module_name), proj).detach()  # (experts, out, in)
    for expert in range(store.num_experts):
        codes, state = bnb_f.quantize_4bit(weight[expert].contiguous(), blocksize=64, quant_type="nf4", compress_statistics=False)
        layer = store.expert(expert)
        assert torch.equal(layer.weight, codes)
        assert torch.equal(layer.weight_absmax, state.absmax)


def test_in_place_quantize_covers_experts_and_gradients_reach_the_input():
    model = _float_model("qwen2_moe")
    quantize_(model, SlimConfig(weights="int4", block_size=32))
    assert _expert_float_bytes(model) == 0
    shared = model.model.layers[0].mlp.shared_expert.gate_proj  # the shared expert is an ordinary linear layer
    assert type(shared).__name__ == "SlimLinearInt4"
    embeds = model.get_input_embeddings()(torch.tensor([[1, 2, 3]])).detach().requires_grad_(True)
    model(inputs_embeds=embeds).logits.sum().backward()
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0


def test_experts_of_an_unknown_layout_stay_in_float_and_are_named(caplog):
    model = _float_model("mixtral")
    experts = model.model.layers[0].mlp.experts
    experts.down_proj = torch.nn.Parameter(experts.down_proj.data[0].clone())  # 2-D: not a layout we know
    with caplog.at_level(logging.WARNING, logger="llmslim.quant.experts"):
        replaced = quantize_experts_(model, SlimConfig(weights="nf4"))
    assert "not quantizing the experts of model.layers.0.mlp.experts: down_proj has shape (64, 64)" in caplog.text
    assert not expert_stores(experts)
    assert replaced == ["model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"]


def test_bitsandbytes_export_refuses_quantized_experts(tmp_path):
    model = _float_model("qwen3_moe")
    quantize_(model, SlimConfig(weights="nf4"))
    with pytest.raises(ValueError, match=r"bitsandbytes has no layout for quantized mixture-of-experts weights \(model\.layers\.0"):
        save_pretrained(model, tmp_path / "bnb", format="bnb")
    assert not (tmp_path / "bnb").exists()


def test_a_store_refuses_a_weight_of_the_wrong_shape():
    model = _float_model("qwen3_moe")
    quantize_experts_(model, SlimConfig(weights="int8"))
    store = expert_stores(model.model.layers[0].mlp.experts)["down_proj"]
    assert isinstance(store, SlimExpertWeights)
    with pytest.raises(ValueError, match=r"a weight of shape \(8, 64, 32\) does not fit experts of shape \(8, 64, 64\)"):
        store.quantize(torch.zeros(8, 64, 32), "down_proj")


@pytest.mark.parametrize("weights", ["int8", "nf4"])
@pytest.mark.parametrize("arch", list(MOE_CONFIGS))
def test_llmslim_door_streams_hub_experts_like_the_transformers_door(hub_folders, tmp_path, arch, weights):
    config = SlimConfig(weights=weights, block_size=32)
    ours = llmslim.from_pretrained(hub_folders[arch], config, progress=False)
    theirs = AutoModelForCausalLM.from_pretrained(hub_folders[arch], quantization_config=config).eval()
    assert _expert_float_bytes(ours) == 0
    ids = torch.randint(0, 96, (1, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = ours(ids).logits
        assert torch.equal(logits, theirs(ids).logits)
    llmslim.save_pretrained(ours, tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(llmslim.from_pretrained(tmp_path / "q", progress=False)(ids).logits, logits)


def test_a_checkpoint_missing_an_expert_names_the_tensor_and_file(hub_folders, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "partial"
    shutil.copytree(hub_folders["mixtral"], folder)
    state = load_file(folder / "model.safetensors")
    missing = next(k for k in state if k.endswith("experts.2.w3.weight"))
    del state[missing]
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"the checkpoint has no data for {re.escape(missing)} in model\.safetensors"):
        llmslim.from_pretrained(folder, SlimConfig(weights="nf4"), progress=False)
