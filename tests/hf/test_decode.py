"""The lean decode step (`llmslim.hf.decode`): on by default, bit-identical to each class's own forward, and out of the
way whenever a call needs the standard path."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_greedy_decode
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

import llmslim
from llmslim import SlimConfig
from llmslim.hf import decode
from llmslim.hf.decode import LEAN_LAYER_CLASSES, use_lean_layers, use_standard_layers
from llmslim.quant import kernels

needs_decode_kernels = pytest.mark.skipif(not kernels.fused_decode_ops(), reason="the fused operators need a C++ compiler")

# hidden 64 / intermediate 128: shapes the 4-bit decode kernel takes (N % 32 == 0, K a multiple of the block)
_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=160,
    max_position_embeddings=128,
)
CONFIGS = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}  # qwen2: biased q/k/v projections


@pytest.fixture(scope="module")
def decode_models(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("lean_decode")
    folders = {}
    for arch, config in {**CONFIGS, "qwen3": Qwen3Config}.items():
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config(**_SHAPE)).to(torch.bfloat16).save_pretrained(root / arch)
        folders[arch] = root / arch
    return folders


def _greedy(model, steps: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    prompt = torch.randint(0, 160, (1, 7), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        out = model.generate(prompt, max_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits)


def _lean_steps(monkeypatch) -> list:
    """Count the layer calls that take the lean step."""
    taken = []
    step = decode._lean_step

    def counted(*args):
        taken.append(1)
        return step(*args)

    monkeypatch.setattr(decode, "_lean_step", counted)
    return taken


@pytest.mark.parametrize("arch", tuple(CONFIGS))
@pytest.mark.parametrize("weights", ("nf4", "int8", None))
def test_the_lean_step_on_torch_operators_is_bit_identical_to_the_standard_forward(decode_models, arch, weights, monkeypatch):
    model = llmslim.from_pretrained(decode_models[arch], SlimConfig(weights=weights), progress=False)
    assert all(type(layer).__name__ == f"Lean{CONFIGS[arch].model_type.capitalize()}DecoderLayer" for layer in model.model.layers)
    monkeypatch.setattr(decode, "_fused_ops", lambda *args: None)
    taken = _lean_steps(monkeypatch)
    lean = _greedy(model)
    assert len(taken) == 23 * 2  # every decoded token after the first (the prompt's step), in both layers
    use_standard_layers(model)
    assert type(model.model.layers[0]).__name__.startswith(CONFIGS[arch].model_type.capitalize())
    standard = _greedy(model)
    assert len(taken) == 46
    assert torch.equal(lean[0], standard[0])
    assert torch.equal(lean[1], standard[1])  # bit for bit, every step's logits


@needs_decode_kernels
@pytest.mark.parametrize("arch", tuple(CONFIGS))
@pytest.mark.parametrize("weights", ("nf4", "int8"))
def test_the_fused_lean_step_decodes_as_the_standard_forward(decode_models, arch, weights, monkeypatch):
    model = llmslim.from_pretrained(decode_models[arch], SlimConfig(weights=weights), progress=False)
    fused = []
    ops = decode._fused_ops
    monkeypatch.setattr(decode, "_fused_ops", lambda *args: fused.append(ops(*args)) or fused[-1])
    attended = []
    attend = torch.ops.llmslim.attend_one_rows
    monkeypatch.setattr(torch.ops.llmslim, "attend_one_rows", lambda *args: attended.append(args[1].shape) or attend(*args))
    if kernels.lean_layer_ops():  # a layer of one weight kind attends inside lean_out (its k is the third operand)
        out = torch.ops.llmslim.lean_out
        monkeypatch.setattr(torch.ops.llmslim, "lean_out", lambda *args: attended.append(args[2].shape) or out(*args))
    lean = _greedy(model)
    assert len(fused) == 46 and all(op is not None for op in fused)
    assert [shape[2] for shape in attended] == [seen for seen in range(8, 31) for _ in range(2)]  # the cache, growing
    use_standard_layers(model)
    # the norms' sums of squares, SiLU's exp and the attention's sums may round one bf16 step apart: logits within
    # 0.02, near-ties may flip
    assert_same_greedy_decode(_greedy(model), lean, prompt_length=7, tolerance=0.02)


needs_i16 = pytest.mark.skipif(not (kernels._ops_loaded() and kernels._i16_kernel()), reason="mm_4bit_i16 is built for AVX2 only")
needs_layer_ops = pytest.mark.skipif(not kernels.lean_layer_ops(), reason="the layer operators are built for AVX2 and AVX-512 BF16")


def _without_layer_ops(model, monkeypatch) -> None:
    """The lean step's operator-by-operator path: no layer takes `lean_qkv` / `lean_out`."""
    monkeypatch.setattr(kernels, "lean_layer_ops", lambda: False)
    for layer in model.model.layers:
        layer.__dict__.pop("_lean_plan", None)


@needs_i16
@pytest.mark.parametrize("arch", ("llama", "qwen2"))  # qwen2: biased q/k/v, added after the shared call
def test_on_avx2_the_lean_step_projects_q_k_v_and_gate_up_in_one_call_each(decode_models, arch, monkeypatch):
    model = llmslim.from_pretrained(decode_models[arch], SlimConfig(weights="nf4"), progress=False)
    _without_layer_ops(model, monkeypatch)
    calls = []
    multi = torch.ops.llmslim.mm_4bit_i16_multi
    monkeypatch.setattr(torch.ops.llmslim, "mm_4bit_i16_multi", lambda *args: calls.append(len(args[1])) or multi(*args))
    lean = _greedy(model)
    assert calls == [3, 2] * 46  # every decoded token after the first, both layers: q/k/v, then gate/up
    monkeypatch.setattr(decode, "_projections_i16", lambda *args: None)  # one call per projection instead
    single = _greedy(model)
    assert torch.equal(single[0], lean[0]) and torch.equal(single[1], lean[1])  # bit for bit


@needs_layer_ops
@pytest.mark.parametrize("arch", ("llama", "mistral", "qwen2"))
@pytest.mark.parametrize("weights", ("nf4", "int8"))
def test_a_layer_decodes_in_two_operators_with_the_same_bits(decode_models, arch, weights, monkeypatch):
    model = llmslim.from_pretrained(decode_models[arch], SlimConfig(weights=weights), progress=False)
    calls = []
    for name in ("lean_qkv", "lean_out"):
        op = getattr(torch.ops.llmslim, name)
        monkeypatch.setattr(
            torch.ops.llmslim,
            name,
            lambda *args, _op=op, _name=name: calls.append((_name, args[3 + 2 * (_name == "lean_out")])) or _op(*args),
        )
    fused = _greedy(model)
    kind = decode.LEAN_INT8 if weights == "int8" else decode.LEAN_4BIT_I16 if kernels._i16_kernel() else decode.LEAN_4BIT_TILES
    assert calls == [("lean_qkv", kind), ("lean_out", kind)] * 46
    _without_layer_ops(model, monkeypatch)
    assert torch.equal(_greedy(model)[1], fused[1])  # the operator-by-operator step's logits, bit for bit


@needs_layer_ops
@pytest.mark.parametrize("weights", ("nf4", "int8"))
def test_a_layer_plan_follows_a_replaced_weight(decode_models, weights, monkeypatch):
    if weights == "nf4" and not kernels._i16_kernel():
        pytest.skip("a replaced 4-bit weight in the CPU layout (AVX-512) leaves the layout: no plan to follow")
    model = llmslim.from_pretrained(decode_models["llama"], SlimConfig(weights=weights), progress=False)
    _greedy(model, steps=3)  # the layers keep their plans
    assert all("_lean_plan" in layer.__dict__ for layer in model.model.layers)
    before = _greedy(model)
    down = model.model.layers[1].mlp.down_proj
    other = 255 - down.weight.data if weights == "nf4" else -down.weight.data  # other codes, in a new tensor
    down.weight = torch.nn.Parameter(other, requires_grad=False)
    replaced = _greedy(model)
    assert not torch.equal(replaced[1], before[1])
    _without_layer_ops(model, monkeypatch)
    assert torch.equal(_greedy(model)[1], replaced[1])


def test_a_look_alike_layer_keeps_its_own_forward(decode_models):
    model = llmslim.from_pretrained(decode_models["qwen3"], SlimConfig(weights="nf4"), progress=False)
    assert "Qwen3DecoderLayer" not in LEAN_LAYER_CLASSES  # its q/k norms are not in the lean step
    assert type(model.model.layers[0]).__name__ == "Qwen3DecoderLayer"


def test_the_lean_layer_keeps_names_state_dict_and_saves(decode_models, tmp_path):
    model = llmslim.from_pretrained(decode_models["llama"], SlimConfig(weights="nf4"), progress=False)
    lean_state = model.state_dict()
    use_standard_layers(model)
    assert list(model.state_dict()) == list(lean_state)
    assert use_lean_layers(model) == 2
    assert use_lean_layers(model) == 2  # idempotent
    llmslim.save_pretrained(model, tmp_path / "saved")
    again = llmslim.from_pretrained(tmp_path / "saved", progress=False)
    assert type(again.model.layers[0]).__name__ == "LeanLlamaDecoderLayer"
    assert torch.equal(_greedy(again)[0], _greedy(model)[0])


def test_calls_the_step_does_not_cover_take_the_standard_forward(decode_models, monkeypatch):
    model = llmslim.from_pretrained(decode_models["llama"], SlimConfig(weights="nf4"), progress=False)
    taken = _lean_steps(monkeypatch)
    prompts = torch.randint(0, 160, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        model.generate(prompts, max_new_tokens=3, do_sample=False)  # a batch of two
    with torch.no_grad():
        model(prompts[:1])  # a prompt, no cache
    with torch.enable_grad():
        model(prompts[:1, :1], use_cache=True)  # gradients on
    assert taken == []


def test_a_hook_on_a_bypassed_module_sees_every_call(decode_models, monkeypatch):
    model = llmslim.from_pretrained(decode_models["llama"], SlimConfig(weights="nf4"), progress=False)
    monkeypatch.setattr(decode, "_fused_ops", lambda *args: None)  # torch's operators: layer 0's lean step bit-identical
    seen = []
    model.model.layers[1].post_attention_layernorm.register_forward_hook(lambda m, args, out: seen.append(out.shape))
    hooked = _greedy(model, steps=5)
    assert len(seen) == 5  # the prompt's step and four decoded tokens, all through the standard forward of layer 1
    use_standard_layers(model)
    assert torch.equal(hooked[1], _greedy(model, steps=5)[1])


def test_a_hook_on_a_projection_is_called_by_the_lean_step(decode_models, monkeypatch):
    model = llmslim.from_pretrained(decode_models["llama"], SlimConfig(weights="nf4"), progress=False)
    taken = _lean_steps(monkeypatch)
    seen = []
    model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape))
    _greedy(model, steps=5)
    assert taken and len(seen) == 5


@pytest.mark.parametrize("weights", ("nf4", "int8"))
def test_an_instance_forward_on_a_projection_is_called_by_the_lean_step(decode_models, weights, monkeypatch):
    # as accelerate's hooks wrap a module's forward: neither the two-operator layer nor the per-operator step skips it
    model = llmslim.from_pretrained(decode_models["llama"], SlimConfig(weights=weights), progress=False)
    taken = _lean_steps(monkeypatch)
    down = model.model.layers[1].mlp.down_proj
    seen, forward = [], down.forward
    down.forward = lambda x: seen.append(x.shape) or forward(x)
    _greedy(model, steps=5)
    assert taken and len(seen) == 5 and "_lean_plan" not in model.model.layers[1].__dict__


def test_quantize_in_place_gives_the_lean_step(decode_models):
    model = AutoModelForCausalLM.from_pretrained(decode_models["llama"], dtype=torch.bfloat16)
    llmslim.quantize_(model, SlimConfig(weights="nf4"))
    assert type(model.model.layers[0]).__name__ == "LeanLlamaDecoderLayer"


def test_the_transformers_door_gives_the_lean_step(decode_models):
    model = AutoModelForCausalLM.from_pretrained(decode_models["llama"], quantization_config=SlimConfig(weights="nf4"))
    assert type(model.model.layers[0]).__name__ == "LeanLlamaDecoderLayer"


@needs_decode_kernels
def test_the_kept_cache_room_holds_what_torch_cat_gives():
    from transformers import DynamicCache

    torch.manual_seed(0)
    ours, theirs = DynamicCache(), DynamicCache()
    prompt_k, prompt_v = torch.randn(1, 2, 5, 8).bfloat16(), torch.randn(1, 2, 5, 8).bfloat16()
    for cache in (ours, theirs):
        cache.update(prompt_k, prompt_v, 0)  # the prompt's step: torch.cat, a plain tensor
    handed_out = []
    for step in range(140):  # past the first room of 5 + 128 positions: the room grows once
        k, v = torch.randn(1, 2, 1, 8).bfloat16(), torch.randn(1, 2, 1, 8).bfloat16()
        if step % 7 == 0:  # a strided token: written through copy_ instead of the direct copy
            k = torch.randn(1, 2, 1, 16).bfloat16()[..., ::2]
        got = decode._cache_update(ours, k, v, 0)
        want = theirs.update(k, v, 0)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        handed_out.append((got[0], want[0].clone()))
        if step == 60:
            ours.crop(-26), theirs.crop(-26)  # 66 -> 40 positions: new keys, which the next step copies into new room
    assert all(torch.equal(view, kept) for view, kept in handed_out)  # no later write reached a view handed out earlier
    assert ours.get_seq_length() == theirs.get_seq_length() == 40 + 79


@needs_decode_kernels
def test_a_cache_of_another_kind_takes_its_own_update(monkeypatch):
    from transformers import StaticCache

    cache = StaticCache(config=LlamaConfig(**_SHAPE), max_cache_len=16)
    calls = []
    update = cache.update
    monkeypatch.setattr(cache, "update", lambda *args, **kwargs: calls.append(1) or update(*args, **kwargs))
    k = torch.randn(1, 2, 1, 16).bfloat16()
    decode._cache_update(cache, k, k, 0)
    assert calls == [1]


def _lean_forwards(model, monkeypatch) -> list:
    """Count the tokens that take the lean token loop of the base model."""
    taken = []
    lean = type(model.model)._lean_forward
    monkeypatch.setattr(type(model.model), "_lean_forward", lambda self, *args: taken.append(1) or lean(self, *args))
    return taken


@pytest.mark.parametrize("weights", ("nf4", None))
def test_the_lean_token_loop_gives_the_standard_forwards_logits(decode_models, weights, monkeypatch):
    model = llmslim.from_pretrained(decode_models["llama"], SlimConfig(weights=weights), progress=False)
    assert type(model.model).__name__ == "LeanLlamaModel"
    monkeypatch.setattr(decode, "_fused_ops", lambda *args: None)  # torch's operators: bit-identical to the standard forward
    loops, steps = _lean_forwards(model, monkeypatch), _lean_steps(monkeypatch)
    lean = _greedy(model)
    assert len(loops) == 23 and len(steps) == 46  # every decoded token after the first, through both layers' steps
    use_standard_layers(model)
    assert type(model.model).__name__ == "LlamaModel"
    standard = _greedy(model)
    assert len(loops) == 23
    assert torch.equal(lean[0], standard[0]) and torch.equal(lean[1], standard[1])


def test_the_lean_token_loop_calls_a_hooked_layer_and_its_own_modules(decode_models, monkeypatch):
    model = llmslim.from_pretrained(decode_models["llama"], SlimConfig(weights="nf4"), progress=False)
    loops, steps = _lean_forwards(model, monkeypatch), _lean_steps(monkeypatch)
    seen = []
    model.model.layers[1].register_forward_hook(lambda m, args, out: seen.append("layer 1"))
    model.model.norm.register_forward_hook(lambda m, args, out: seen.append("norm"))
    model.model.embed_tokens.register_forward_hook(lambda m, args, out: seen.append("embed"))
    _greedy(model, steps=5)
    assert len(loops) == 4 and len(steps) == 8  # layer 1's hook runs around its __call__, whose forward takes the step
    assert seen == ["embed", "layer 1", "norm"] * 5


def test_the_lean_token_loop_leaves_captured_outputs_to_the_standard_forward(decode_models, monkeypatch):
    model = llmslim.from_pretrained(decode_models["llama"], SlimConfig(weights="nf4"), progress=False)
    loops = _lean_forwards(model, monkeypatch)
    prompt = torch.randint(0, 160, (1, 7), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        out = model.generate(prompt, max_new_tokens=4, do_sample=False, output_hidden_states=True, return_dict_in_generate=True)
    assert not loops
    assert [len(step) for step in out.hidden_states] == [3] * 4  # embeddings and both layers, every step
