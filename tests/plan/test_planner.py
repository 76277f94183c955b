"""The planner's numbers against what llmslim actually allocates, its placement logic, and bad input."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ARCHS
from transformers import AutoModelForCausalLM, LlamaConfig

import llmslim
from llmslim.memory.measure import peak_memory
from llmslim.plan import Hardware, Workload, plan_model
from llmslim.plan.hardware import GiB, parse_gpus, parse_size
from llmslim.plan.known import KNOWN_CONFIGS
from llmslim.plan.shapes import model_shape, skeleton_shape
from llmslim.plan.weights import PLAN_FORMATS, format_config
from llmslim.quant import kernels
from llmslim.stats import model_nbytes

CPU_ONLY = Hardware(gpus=[], cpu=24 * GiB, disk=10**12)


def _load(path, fmt):
    config = format_config(fmt, model_shape(json.loads((path / "config.json").read_text())))
    if config is None:
        return llmslim.from_pretrained(path, llmslim.SlimConfig(weights=None), dtype=torch.bfloat16, progress=False)
    return llmslim.from_pretrained(path, config, progress=False)


def _measured_total(model, batch: int, context: int) -> tuple[int, int]:
    """(bytes of the model's tensors + peak bytes a prompt's forward allocates, KV cache bytes)."""
    ids = torch.randint(0, model.config.vocab_size, (batch, context), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids[:, :4])  # warm-up: NF4/FP4 layers move to the CPU layout on their first call (a one-time swap of their codes)
        out, peak = peak_memory(lambda: model(ids, use_cache=True, logits_to_keep=1))
    kv = sum(t.numel() * t.element_size() for layer in out.past_key_values.layers for t in (layer.keys, layer.values))
    return model_nbytes(model) + peak, kv


def _spec(shape):
    linears = sorted((lin.name, lin.in_features, lin.out_features, lin.bias) for lin in shape.linears)
    return linears, sorted((t.name, t.numel, t.dtype) for t in shape.tensors), sorted(shape.expert_specs, key=lambda e: e.name)


@pytest.mark.parametrize("arch", ARCHS)
def test_architecture_math_lists_the_skeletons_tensors(tiny_models, arch):
    config = json.loads((tiny_models[arch] / "config.json").read_text())
    assert _spec(model_shape(config)) == _spec(skeleton_shape(config))


@pytest.mark.parametrize("name", ["llama-2-70b", "bloom-176b", "opt-175b", "falcon-180b", "mixtral-8x7b", "mixtral-8x22b"])
def test_bundled_configs_match_transformers_skeleton(name):
    config = {k: v for k, v in KNOWN_CONFIGS[name].items() if not k.startswith("_")}
    config["n_layer" if "n_layer" in config else "num_hidden_layers"] = 2  # same blocks, cheaper skeleton
    assert _spec(model_shape(config)) == _spec(skeleton_shape(config))


@pytest.mark.parametrize(
    ("name", "params"),
    [("llama-2-7b", 6.738e9), ("llama-2-13b", 13.016e9), ("llama-2-70b", 68.977e9), ("llama-3-405b", 405.85e9),
     ("bloom-176b", 176.25e9), ("mixtral-8x7b", 46.70e9)],
)  # fmt: skip
def test_bundled_parameter_counts_match_published(name, params):
    assert model_shape(KNOWN_CONFIGS[name]).n_params == pytest.approx(params, rel=2e-3)


def test_nf4_double_quant_costs_4_127_bits_per_quantized_weight():
    plan = plan_model("bloom-176b", CPU_ONLY)
    w = plan.formats["nf4+dq"].weights
    quantized = sum(lin.in_features * lin.out_features for lin in plan.shape.linears)
    assert 8 * (w.codes + w.scales) / quantized == pytest.approx(4.127, abs=1e-3)


@pytest.mark.parametrize("arch", ARCHS)
def test_weight_bytes_equal_the_loaded_models_in_every_format(tiny_models, arch):
    plan = plan_model(tiny_models[arch], CPU_ONLY)
    for fmt in PLAN_FORMATS:
        measured = model_nbytes(_load(tiny_models[arch], fmt))
        assert plan.formats[fmt].weights.total == pytest.approx(measured, rel=0.01), fmt


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory):
    """A Llama whose widths are not dominated by constant overheads (hidden 512), 2 blocks."""
    folder = tmp_path_factory.mktemp("small") / "llama512"
    config = LlamaConfig(
        hidden_size=512, intermediate_size=1408, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, vocab_size=512
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("context", [48, 128])  # 48: past the packed kernels' decode rows, within bitsandbytes' CPU layout's
@pytest.mark.parametrize("half_gemm", [True, False], ids=["bf16-gemm", "emulated-bf16"])
@pytest.mark.parametrize("fmt", list(PLAN_FORMATS))
def test_total_and_kv_cache_match_a_measured_prompt(small_llama, fmt, half_gemm, context, monkeypatch, request):
    """Both CPU kinds on any machine: without hardware bf16 GEMMs (AVX-512 BF16 / AMX) prompts multiply in float32."""
    if fmt == "int8" and context == 48 and not half_gemm:  # a known gap: LLM.int8's prompt workspace
        request.applymarker(pytest.mark.xfail(reason="int8 at 48 tokens: planned 11.54 MB, measured 13.16-13.27 MB (AMX Xeon)"))
    if half_gemm and not kernels.CPU_HALF_MATMUL_IS_NATIVE:
        pytest.skip("this CPU has no hardware bf16 GEMM")
    monkeypatch.setattr(kernels, "CPU_HALF_MATMUL_IS_NATIVE", half_gemm)
    batch = 1
    hardware = Hardware(gpus=[], cpu=24 * GiB, disk=10**12, cpu_half_gemm=half_gemm)
    planned = plan_model(small_llama, hardware, Workload(context=context, batch=batch)).formats[fmt]
    total, kv = _measured_total(_load(small_llama, fmt), batch, context)
    assert planned.kv_cache_bytes == kv
    # int8 prompts on the CPU run LLM.int8, whose outlier columns depend on the data: a looser bound; 4-bit
    # within 4% on either path (measured on an AMX Xeon: +1.3% bf16 GEMM, +3.2% float32), the plan high
    assert planned.total_bytes == pytest.approx(total, rel=0.05 if fmt == "bf16" else 0.10)


@pytest.mark.real_model
@pytest.mark.slow
def test_smollm2_weights_and_total():
    from llmslim.models import resolve

    path = resolve(None)
    plan = plan_model(path, CPU_ONLY, Workload(context=256))
    for fmt in PLAN_FORMATS:
        model = _load(path, fmt)
        assert plan.formats[fmt].weights.total == pytest.approx(model_nbytes(model), rel=0.01), fmt
        measured = _measured_total(model, 1, 256)[0]  # quantized: see the prompt-workspace note above
        assert plan.formats[fmt].total_bytes == pytest.approx(measured, rel=0.05 if fmt == "bf16" else 0.10), fmt


def test_gpu_placement_spreads_blocks_then_offloads():
    two = plan_model("llama-2-13b", Hardware([24 * GiB, 24 * GiB], 64 * GiB, 10**12)).formats["bf16"]
    assert two.placement.fits and set(two.placement.block_devices) == {0, 1}
    assert two.load_kwargs == {"dtype": "bfloat16", "device_map": "auto"}
    assert two.device_map["model.layers.0"] == 0 and two.device_map["model.layers.39"] == 1
    one = plan_model("llama-2-13b", Hardware([24 * GiB], 64 * GiB, 10**12)).formats["bf16"]
    assert one.placement.verdict == "fits with CPU offload"
    assert one.load_kwargs["offload"] == "cpu" and one.tokens_per_s < two.tokens_per_s


def test_cpu_only_machine_gets_disk_offload_and_a_recommendation():
    hardware = Hardware([], 24 * GiB, 2 * 10**12, cpu_half_gemm=True)  # a CPU with bf16 GEMMs, whatever runs the test
    plan = plan_model("bloom-176b", hardware, Workload(context=2048))
    nf4 = plan.formats["nf4+dq"]
    assert nf4.placement.verdict == "fits with disk offload"
    assert nf4.load_kwargs["offload"] == "disk" and nf4.load_kwargs["offload_budget"] > 0
    assert plan.recommended in PLAN_FORMATS
    assert plan.formats["bf16"].gpus_without_offload == 18  # 352 GB over 24 GiB cards


def test_training_adds_lora_state_and_picks_a_checkpointing_policy():
    fp = plan_model("llama-2-7b", Hardware([24 * GiB], 64 * GiB, 10**12), Workload(train=True, context=2048)).formats["nf4+dq"]
    t = fp.training
    assert t.lora_params == 16 * 32 * (4 * 2 * 4096 + 3 * (4096 + 11008))
    assert t.policy == min(t.policies, key=t.policies.get)
    assert t.policies["all"] < t.policies["none"] and fp.kv_cache_bytes == 0


def test_bad_input_names_the_value():
    with pytest.raises(ValueError, match="'llama-9' is neither a model folder.*bundled model: choose from"):
        plan_model("llama-9", CPU_ONLY)
    with pytest.raises(ValueError, match="a size must look like 24GiB.*got 'big'"):
        parse_size("big")
    with pytest.raises(ValueError, match="context must be an integer >= 1, got 0"):
        Workload(context=0)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        Workload(optimizer="adam9")
    assert parse_gpus(["2x24GiB", "80GB"]) == [24 * GiB, 24 * GiB, 80 * 10**9]


def test_factorized_embedding_row_saves_the_embedding_factors_difference():
    plan = plan_model("bloom-176b", CPU_ONLY)
    v, h = plan.shape.vocab, plan.shape.hidden
    rank = h // 4
    saved = plan.formats["nf4+dq"].weights.total - plan.formats["nf4+dq+emb/4"].weights.total
    assert saved == (v * h - v * rank - rank * h) * 2  # bf16 table, tied head through the factors
    assert format_config("nf4+dq+emb/4", plan.shape).embedding_rank == rank
    with pytest.raises(ValueError, match="pass its shape"):
        format_config("nf4+dq+emb/4")


def test_fsdp_splits_the_weights_and_lora_state_across_processes_and_ddp_does_not():
    gpus = Hardware([24 * GiB] * 4, 64 * GiB, 10**12)

    def plan(parallel, processes):
        workload = Workload(train=True, context=1024, parallel=parallel, processes=processes)
        return plan_model("llama-2-70b", gpus, workload).formats["nf4+dq"]

    one, two, four = plan("fsdp", 1), plan("fsdp", 2), plan("fsdp", 4)
    w = one.weights
    assert two.process.weights == -(-(w.codes + w.kept) // 2) + w.scales + w.buffers  # scales stay whole on each
    assert one.process.total > two.process.total > four.process.total
    assert one.process.training - two.process.training == pytest.approx((one.training.total - one.training.activation_bytes) / 2, abs=2)
    # Answer.AI's FSDP-QLoRA: a 70B model trains on two 24 GB GPUs
    assert not one.placement.fits and two.placement.fits and two.placement.verdict == "FSDP on 2 GPUs"
    assert two.gpus_without_offload == 2  # the least 24 GiB GPUs whose per-process share fits
    ddp = plan("ddp", 2)
    assert ddp.process.weights == w.total and ddp.process.training == ddp.training.total + ddp.training.grad_bytes
    assert not ddp.placement.fits and ddp.gpus_without_offload is None
    assert plan("fsdp", 8).placement.verdict == "8 processes need 8 GPUs, 4 given"


def test_parallel_plans_need_training_and_sane_process_counts():
    with pytest.raises(ValueError, match=r"parallel='fsdp' plans training processes: add train=True"):
        Workload(parallel="fsdp")
    with pytest.raises(ValueError, match=r"parallel must be one of \['none', 'ddp', 'fsdp'\], got 'zero3'"):
        Workload(train=True, parallel="zero3")
    with pytest.raises(ValueError, match=r"processes must be an integer >= 1, got 0"):
        Workload(train=True, parallel="ddp", processes=0)


def test_plan_command_prints_the_per_process_table(capsys):
    from llmslim.cli import main

    assert main(["plan", "llama-2-7b", "--gpu", "2x24GiB", "--cpu", "64GiB", "--train", "--parallel", "fsdp", "--context", "1024"]) == 0
    out = capsys.readouterr().out
    assert "| format | weights GiB (all) | FSDP processes | weights GiB / process |" in out
    assert "FSDP on 2 GPUs" in out and "accelerate launch --config_file examples/accelerate/fsdp2_gpu.yaml" in out
