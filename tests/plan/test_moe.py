"""The planner on mixture-of-experts models: expert bytes exactly as llmslim stores them, total and active
parameters, bytes a decoded token reads, and the placement that keeps the experts apart."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import transformers
from quant.tiny_moe import MOE_CONFIGS, float_moe
from transformers import AutoModelForCausalLM

import llmslim
from llmslim import SlimConfig
from llmslim.plan import Hardware, Workload, plan_model
from llmslim.plan.hardware import CPU_RESERVE, GiB
from llmslim.plan.known import KNOWN_CONFIGS
from llmslim.plan.planner import routed_share, tensor_table
from llmslim.plan.report import render
from llmslim.plan.shapes import model_shape, skeleton_shape
from llmslim.plan.weights import format_config, weight_bytes
from llmslim.quant.experts import experts_modules, quantized_experts
from llmslim.quant.quantize import quantize_
from llmslim.stats import model_nbytes

CPU_ONLY = Hardware(gpus=[], cpu=24 * GiB, disk=2 * 10**12, cpu_half_gemm=True)  # pinned, not detected
ONE_GPU = Hardware(gpus=[24 * GiB], cpu=128 * GiB, disk=2 * 10**12)
FORMATS = ("bf16", "int8", "nf4", "nf4+dq", "int4")
MOE_BUNDLED = ("mixtral-8x22b", "qwen3-235b-a22b", "deepseek-v3", "gpt-oss-120b", "llama-4-maverick")


def _llama4():
    """Llama-4's text model: interleaved MoE layers, a shared expert, experts outside transformers' experts decorator."""
    return transformers.Llama4TextConfig(
        hidden_size=64, intermediate_size=32, intermediate_size_mlp=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=96, num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=2,
    )  # fmt: skip


ARCHS = {**MOE_CONFIGS, "llama4_text": _llama4}


def _bf16_model(arch: str) -> torch.nn.Module:
    """A tiny random MoE model with bfloat16 parameters; buffers keep the dtype transformers builds them in (as loaded)."""
    model = float_moe(arch) if arch in MOE_CONFIGS else AutoModelForCausalLM.from_config(ARCHS[arch]())
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)
    return model


def _quantized(arch: str, fmt: str):
    model = _bf16_model(arch)
    shape = model_shape(model.config.to_dict())
    config = format_config(fmt, shape)
    if config is not None:
        quantize_(model, config)
    return model, shape, config


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("arch", list(ARCHS))
def test_planned_bytes_equal_the_quantized_models_tensor_by_tensor(arch, fmt):
    model, shape, config = _quantized(arch, fmt)
    planned = weight_bytes(shape, config, "bfloat16")
    assert planned.total == model_nbytes(model)
    table = tensor_table(shape, fmt, "bfloat16")
    stored = {name: t.numel() * t.element_size() for name, t in model.state_dict().items()}
    assert {name: table.get(name) for name in stored} == stored  # same names (`--tensors`), same bytes
    assert set(table) - set(stored) <= {name for name, _ in model.named_buffers()}  # only non-persistent buffers left


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("arch", ["qwen3_moe", "mixtral", "deepseek_v3", "gpt_oss"])
def test_planned_expert_bytes_are_the_quantized_experts(arch, fmt):
    model, shape, config = _quantized(arch, fmt)
    experts = sum(t.numel() * t.element_size() for _, module in experts_modules(model) for t in module.parameters(recurse=False))
    experts += sum(t.numel() * t.element_size() for _, module in experts_modules(model) for t in module.buffers(recurse=False))
    planned = weight_bytes(shape, config, "bfloat16")
    assert planned.experts == experts
    assert sum(planned.per_block_experts) == experts
    if fmt != "bf16":
        assert {name for name, _ in quantized_experts(model)} == {e.name for e in shape.expert_specs}


def test_planned_bytes_equal_what_from_pretrained_allocates(tmp_path):
    folder = tmp_path / "qwen3_moe"
    _bf16_model("qwen3_moe").save_pretrained(folder)
    plan = plan_model(folder, CPU_ONLY)
    for fmt in ("int8", "nf4+dq", "int4"):
        model = llmslim.from_pretrained(folder, format_config(fmt, plan.shape), progress=False)
        assert plan.formats[fmt].weights.total == model_nbytes(model), fmt


@pytest.mark.parametrize("arch", ["mixtral"])
def test_architecture_math_lists_the_skeletons_experts(arch):
    config = MOE_CONFIGS[arch]().to_dict()
    math, skeleton = model_shape(config), skeleton_shape(config)
    assert math.expert_specs == skeleton.expert_specs and math.n_params == skeleton.n_params


def test_total_and_active_parameters_of_a_hand_counted_model():
    # qwen3_moe, hidden 64, 2 layers, 4 heads / 2 KV heads of 16, 8 experts of 64, 2 per token, vocab 96, untied
    shape = model_shape(MOE_CONFIGS["qwen3_moe"]().to_dict())
    attention = 64 * 64 + 2 * (32 * 64) + 64 * 64 + 2 * 16  # q, k, v, o, q_norm, k_norm
    expert = 2 * 64 * 64 + 64 * 64  # gate_up (128 x 64), down (64 x 64)
    per_layer = attention + 2 * 64 + 8 * 64 + 8 * expert  # norms, router, routed experts
    total = 2 * per_layer + 2 * 96 * 64 + 64  # embedding, lm_head, final norm
    assert shape.n_params == total == 234880
    assert shape.active_params == total - 2 * 6 * expert == 87424  # each layer uses 2 of its 8 experts
    assert (shape.experts, shape.experts_per_token, shape.expert_intermediate) == (8, 2, 64)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_total_parameters_are_the_models_and_active_ones_count_the_routed_experts_used(arch):
    model = _bf16_model(arch)
    shape = model_shape(model.config.to_dict())
    assert shape.n_params == sum(p.numel() for p in model.parameters())
    k = model.config.num_experts_per_tok
    routed = [p for _, module in experts_modules(model) for p in module.parameters(recurse=False)]
    if arch == "llama4_text":  # Llama-4's experts module is not built with the decorator: found by its 3-D parameters
        routed = [m.experts.gate_up_proj for m in model.modules() if hasattr(m, "experts") and hasattr(m, "router")]
        routed += [m.experts.down_proj for m in model.modules() if hasattr(m, "experts") and hasattr(m, "router")]
    unused = sum(p.numel() // p.shape[0] * (p.shape[0] - k) for p in routed)
    assert shape.active_params == shape.n_params - unused


def test_experts_outside_the_decorator_stay_float_and_are_noted():
    shape = model_shape(_llama4().to_dict())
    assert shape.expert_specs and not any(e.quantized for e in shape.expert_specs)
    assert [len(b) for b in shape.block_experts] == [0, 2]  # layer 1 is the MoE one (interleave step 2)
    assert any("Llama4TextExperts are not built with transformers' experts decorator" in n for n in shape.notes)


def test_a_decoded_token_reads_only_its_routed_experts():
    plan = plan_model(KNOWN_CONFIGS["qwen3-235b-a22b"] | {"num_hidden_layers": 2}, CPU_ONLY)
    w = plan.formats["nf4+dq"].weights
    assert w.experts > 0 and routed_share(plan.shape) == 8 / 128
    assert plan.formats["nf4+dq"].decode_bytes == w.total - w.input_embedding - w.experts + round(w.experts * 8 / 128)
    assert routed_share(plan.shape, batch=4) == pytest.approx(1 - (120 / 128) ** 4)  # distinct experts of 4 tokens
    dense = plan_model("llama-2-7b", CPU_ONLY).formats["nf4+dq"]
    assert dense.decode_bytes == dense.weights.total - dense.weights.input_embedding


@pytest.mark.parametrize(
    ("name", "total", "active"),
    [
        ("mixtral-8x22b", 141e9, 39e9),  # Mistral AI: 141B, 39B active
        ("qwen3-235b-a22b", 235e9, 22e9),
        ("deepseek-v3", 671e9, 37e9),  # the main model; the Hub's 685B adds the 14B multi-token-prediction layer
        ("gpt-oss-120b", 116.83e9, None),  # OpenAI's model card: 116.83B, 5.13B active without the embedding table
        ("llama-4-maverick", 400e9, 17e9),
    ],
)
def test_bundled_moe_models_plan_with_their_published_sizes(name, total, active):
    plan = plan_model(name, CPU_ONLY)
    s = plan.shape
    assert s.n_params == pytest.approx(total, rel=0.02)
    if active is None:
        assert s.active_params - s.vocab * s.hidden == pytest.approx(5.13e9, rel=0.01)
    else:
        assert s.active_params == pytest.approx(active, rel=0.02)
    text = render(plan)
    assert f"{s.n_params / 1e9:.2f}B parameters, {s.active_params / 1e9:.2f}B active per token" in text
    assert "weights read per decoded token" in text
    report = plan.to_dict()
    assert report["architecture"]["active_params"] == s.active_params
    assert all(f["decode_bytes_per_token"] < f["weight_bytes"] for f in report["formats"].values())


@pytest.mark.parametrize(("name", "moe_blocks"), [("mixtral-8x22b", 4), ("qwen3-235b-a22b", 4), ("deepseek-v3", 1), ("gpt-oss-120b", 4),
                                                ("llama-4-maverick", 2)])  # fmt: skip
def test_bundled_moe_configs_have_routed_experts_where_their_architecture_puts_them(name, moe_blocks):
    config = {k: v for k, v in KNOWN_CONFIGS[name].items() if not k.startswith("_")} | {"num_hidden_layers": 4}
    shape = model_shape(config)
    assert sum(1 for block in shape.block_experts if block) == moe_blocks  # DeepSeek: 3 dense layers first; Llama-4: every other


def test_cpu_only_machine_keeps_the_experts_on_disk_and_the_rest_in_ram():
    fp = plan_model("qwen3-235b-a22b", CPU_ONLY).formats["nf4+dq"]
    p, w = fp.placement, fp.weights
    assert (p.verdict, p.experts_device) == ("fits with experts on disk", "disk")
    assert p.used["disk"] == w.experts and p.used["cpu"] == fp.total_bytes - w.experts  # the bytes on each side
    assert 0 < p.expert_cache == p.capacity["cpu"] - p.used["cpu"]  # page cache for the hot experts
    assert fp.load_kwargs == {"device_map": "cpu", "offload": "disk", "offload_dir": "OFFLOAD_DIR"}
    assert fp.device_map["model.layers.0.mlp.experts"] == "disk" and fp.device_map["model.layers.0"] == "cpu"
    text = render(plan_model("qwen3-235b-a22b", CPU_ONLY))
    assert "suggested: nf4+dq (fits with experts on disk)" in text and "page cache:" in text


def test_a_gpu_machine_keeps_the_experts_in_cpu_ram_where_they_fit():
    plan = plan_model("qwen3-235b-a22b", ONE_GPU)
    fp = plan.formats["nf4+dq"]
    assert (fp.placement.verdict, fp.placement.experts_device) == ("fits with experts in CPU RAM", "cpu")
    assert fp.placement.used == {"gpu0": fp.total_bytes - fp.weights.experts, "cpu": fp.weights.experts}
    assert fp.load_kwargs == {"device_map": "cuda:0", "offload": "cpu"}
    assert fp.gpus_with_offload == 1 and fp.tokens_per_s > plan_model("qwen3-235b-a22b", CPU_ONLY).formats["nf4+dq"].tokens_per_s
    assert plan.formats["int8"].placement.experts_device == "disk"  # 205 GB of experts: more than the RAM
    assert plan.formats["bf16"].placement.experts_device is None  # float experts: the loader streams whole blocks


def test_training_a_moe_model_does_not_offload_its_experts():
    fp = plan_model("gpt-oss-120b", ONE_GPU, Workload(train=True, context=512)).formats["nf4+dq"]
    assert not fp.placement.fits and "offload serves inference only" in fp.placement.verdict


def test_the_suggested_call_loads_a_moe_model_with_its_experts_on_disk(tmp_path):
    folder = tmp_path / "qwen3_moe"
    _bf16_model("qwen3_moe").save_pretrained(folder)
    roomy = plan_model(folder, CPU_ONLY).formats["nf4+dq"]
    # RAM for everything but half the experts: the plan keeps them on disk
    tight = replace(CPU_ONLY, cpu=CPU_RESERVE + roomy.total_bytes - roomy.weights.experts // 2, disk=10**9)
    plan = plan_model(folder, tight)
    fp = plan.formats[plan.recommended]
    assert fp.placement.experts_device == "disk" and fp.load_kwargs["offload"] == "disk"
    kwargs = fp.load_kwargs | {"offload_dir": tmp_path / "off"}
    model = llmslim.from_pretrained(folder, SlimConfig.from_dict(fp.slim_config), progress=False, **kwargs)
    assert model.__dict__["_llmslim_offload_experts"].nbytes == fp.weights.experts  # every expert tensor, and only those


def test_a_config_without_a_window_written_as_0_plans():
    config = MOE_CONFIGS["qwen2_moe"]().to_dict()
    assert config["sliding_window"] == 0  # transformers writes 0 when use_sliding_window is false
    plan = plan_model(json.loads(json.dumps(config)), CPU_ONLY)
    assert plan.shape.sliding_window in (None, 0) and plan.formats["nf4"].kv_cache_bytes > 0
