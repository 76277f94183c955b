"""Activation checkpointing: same gradients as the unchecked run, less peak memory, clear errors."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_CONFIGS
from transformers import AutoModelForCausalLM, LlamaConfig

import llmslim
from llmslim.memory import checkpointing_plan, disable_checkpointing, enable_checkpointing, find_blocks, segment_bounds
from llmslim.memory.activations import activation_costs
from llmslim.memory.measure import peak_memory

POLICIES = ("all", "sqrt", 2, 1)


def deep_model(arch: str, layers: int = 5) -> torch.nn.Module:
    tiny = TINY_CONFIGS[arch]()
    values = {k: v for k, v in tiny.to_dict().items() if k != "layer_types"}
    values["n_layer" if "n_layer" in values else "num_hidden_layers"] = layers
    config = type(tiny).from_dict(values)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).train()


def gradients(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # same dropout masks in every run
    model(input_ids=ids, labels=ids).loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt", "qwen2"])
def test_gradients_equal_the_unchecked_run(arch, input_ids):
    model = deep_model(arch)
    reference = gradients(model, input_ids)
    for policy in POLICIES:
        enable_checkpointing(model, policy)
        assert_same(gradients(model, input_ids), reference)


def test_segments_are_recomputed_from_their_boundaries(input_ids):
    model = deep_model("llama", layers=9)
    calls = []
    for block in model.model.layers:
        block.register_forward_pre_hook(lambda module, args: calls.append(module))
    for policy, recomputed in (("none", 0), ("sqrt", 9), ("all", 9)):
        plan = enable_checkpointing(model, policy)
        calls.clear()
        loss = model(input_ids=input_ids, labels=input_ids).loss
        assert len(calls) == 9
        loss.backward()
        assert len(calls) - 9 == recomputed, policy
    assert plan.segments == [(i, i + 1) for i in range(9)]
    assert enable_checkpointing(model, "sqrt").segments == [(0, 3), (3, 6), (6, 9)]


def test_no_checkpointing_without_gradients_and_disable_removes_hooks(input_ids):
    model = deep_model("llama")
    enable_checkpointing(model, "sqrt")
    with torch.no_grad():
        checked = model(input_ids=input_ids).logits
    disable_checkpointing(model)
    assert checkpointing_plan(model) is None
    assert all(not block._forward_pre_hooks for block in model.model.layers)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=input_ids).logits, checked)


def test_works_with_peft_on_quantized_layers(tiny_models, input_ids):
    from peft import LoraConfig, get_peft_model

    from llmslim.finetune.lora import register_slim_layers

    base = llmslim.from_pretrained(tiny_models["llama"], llmslim.SlimConfig(weights="nf4"), dtype=torch.float32, progress=False)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    model = get_peft_model(base, register_slim_layers(lora))
    reference = gradients(model, input_ids)
    assert len(reference) == 2 * 3 * 2  # A and B of 3 layers in each of 2 blocks: only adapters get gradients
    for policy in ("all", "sqrt"):
        llmslim.enable_checkpointing(model, policy, offload=True)
        assert_same(gradients(model, input_ids), reference)


@pytest.mark.parametrize(
    ("policy", "match"),
    [
        (0, r"checkpointing must be one of \['none', 'all', 'sqrt'\] or a number of segments >= 1, got 0"),
        ("half", "got 'half'"),
        (True, "got True"),
        (6, r"checkpointing=6 segments is more than the model's 5 blocks: use 1..5"),
    ],
)
def test_bad_policy(policy, match):
    with pytest.raises(ValueError, match=match):
        enable_checkpointing(deep_model("llama"), policy)


def test_find_blocks_needs_a_block_list():
    with pytest.raises(ValueError, match="has no config.num_hidden_layers"):
        find_blocks(torch.nn.Linear(2, 2))
    assert find_blocks(deep_model("gpt2"))[0] == "transformer.h"


def test_segment_bounds_cover_every_block_once():
    assert segment_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert segment_bounds(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]


def _memory_model() -> tuple[torch.nn.Module, LlamaConfig]:
    """Deep and narrow, long sequence: activations dominate everything else."""
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=16,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=64,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").requires_grad_(False)
    return model, config


def test_each_policy_peaks_below_none_and_the_formula_predicts_it():
    model, config = _memory_model()
    ids = torch.randint(0, 64, (2, 128), generator=torch.Generator().manual_seed(0))

    def step():
        embeds = model.get_input_embeddings()(ids).requires_grad_(True)
        logits = model(inputs_embeds=embeds, use_cache=False).logits
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()

    peaks = {}
    for policy in ("none", "all", "sqrt", 2):
        enable_checkpointing(model, policy)
        _, peaks[policy] = peak_memory(step)  # profiler timeline: recomputed segments count
    assert peaks["all"] < peaks["sqrt"] < peaks[2] < peaks["none"]
    assert peaks["sqrt"] <= peaks["none"] / 3
    costs = activation_costs(config, 2, 128)
    for policy, measured in peaks.items():
        assert costs.peak(policy) == pytest.approx(measured, rel=0.15), policy
    assert costs.choose(peaks["none"] * 2) == "none" and costs.choose(peaks["sqrt"]) == "all"
    with pytest.raises(ValueError, match="activations need at least"):
        costs.choose(1000)


@pytest.mark.gpu
def test_offload_keeps_boundaries_off_the_gpu():
    model, _ = _memory_model()
    model.cuda()
    ids = torch.randint(0, 64, (2, 96), device="cuda")

    def step():
        embeds = model.get_input_embeddings()(ids).requires_grad_(True)
        model(inputs_embeds=embeds, use_cache=False).logits.float().logsumexp(-1).mean().backward()

    peaks = {}
    for offload in (False, True):
        enable_checkpointing(model, "all", offload=offload)
        _, peaks[offload] = peak_memory(step, "cuda")
    assert peaks[True] < peaks[False]


def test_slim_config_field_enables_checkpointing_at_load(tiny_llama):
    import llmslim
    from llmslim.memory.checkpointing import checkpointing_plan

    model = llmslim.from_pretrained(tiny_llama, llmslim.SlimConfig(weights="nf4", checkpointing="sqrt"), progress=False)
    assert checkpointing_plan(model) is not None and model.config.quantization_config.checkpointing == "sqrt"
