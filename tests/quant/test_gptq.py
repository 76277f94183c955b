"""GPTQ into llmslim's formats: never worse than round-to-nearest on the calibration inputs, the codes on the format's
own grid (the stored layout unchanged: stock bitsandbytes dequantizes the NF4 export to our weights), a calibrated
checkpoint that reloads bit-identical without calibrating, determinism, and bad input."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

import llmslim
from llmslim import SlimConfig
from llmslim.calibrate import (
    _balance_block,
    _collect_hessians,
    _first_block_inputs,
    _run_block,
    calibrate_,
    calibration_dtype,
    calibration_ids,
    read_calibration_text,
)
from llmslim.data import TINY_SHAKESPEARE
from llmslim.quant import formats
from llmslim.quant.experts import quantized_experts
from llmslim.quant.gptq import (
    GptqSettings,
    HessianAccumulator,
    _inverse_cholesky,
    balance_scales,
    clipped_absmax,
    gptq_codes,
    output_error,
)
from llmslim.quant.modules import SlimLinear, quantized_layers
from llmslim.quant.quantize import quantize_
from quant.tiny_moe import float_moe

FORMATS = ("nf4", "fp4", "int4", "int8")


def _layer(weights: str, weight: torch.Tensor, **config) -> SlimLinear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    linear.weight.data = weight.clone()
    spec = SlimConfig(weights=weights, **config).layer_spec("layer")
    layer = spec.module_class().from_linear(linear, spec, "layer")
    layer.set_float_weight(weight)
    return layer


def _correlated_inputs(rows: int, features: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, 16, generator=g) @ torch.randn(16, features, generator=g) + 0.3 * torch.randn(rows, features, generator=g)


@pytest.mark.parametrize("act_order", (False, True))
@pytest.mark.parametrize("weights", FORMATS)
def test_gptq_lowers_the_output_error_of_round_to_nearest(weights, act_order):
    weight = torch.randn(96, 128, generator=torch.Generator().manual_seed(0)) * 0.05
    hessian = HessianAccumulator(128)
    hessian.add(_correlated_inputs(512, 128, seed=1))
    layer = _layer(weights, weight, block_size=32)
    rtn = layer.dequantized_weight(torch.float32)
    layer.set_codes(gptq_codes(weight, hessian.hessian, layer.grid(), GptqSettings(act_order=act_order)))
    gptq = layer.dequantized_weight(torch.float32)
    assert output_error(weight, gptq, hessian.hessian) < 0.5 * output_error(weight, rtn, hessian.hessian)


@pytest.mark.parametrize("fmt", ("nf4", "fp4"))
def test_clipped_absmax_never_raises_a_blocks_weighted_error_and_clips_outlier_blocks(fmt):
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(32, 128, generator=g) * 0.02
    weight[:, ::37] *= 8  # a few outliers: their blocks round everything else coarsely
    diag = torch.rand(128, generator=g) + 0.1
    levels = formats.code_4bit(fmt).float().sort().values
    top = weight.abs().view(32, 4, 32).amax(dim=2)
    torch.testing.assert_close(clipped_absmax(weight, diag, levels, 32, (1.0,)), top)
    chosen = clipped_absmax(weight, diag, levels, 32, GptqSettings().clip)

    def block_errors(absmax):
        bound = absmax.repeat_interleave(32, dim=1)
        rounded = levels[torch.bucketize((weight / bound).clamp(-1, 1), (levels[1:] + levels[:-1]) / 2)] * bound
        return (diag * (weight - rounded) ** 2).view(32, 4, 32).sum(dim=2)

    assert (block_errors(chosen) <= block_errors(top) + 1e-12).all()
    assert block_errors(chosen).sum() < 0.97 * block_errors(top).sum()
    assert ((chosen >= 0.7 * top - 1e-7) & (chosen <= top)).all() and (chosen < top).any()


@pytest.mark.parametrize("columns", [96, 80])  # 80: 4-bit blocks of 32 run across rows, int4's last group is short
@pytest.mark.parametrize(
    "weights, config", [("nf4", {"double_quant": False}), ("fp4", {"double_quant": False}), ("int4", {}), ("int4", {"refine": True})]
)
def test_with_uncorrelated_inputs_gptq_is_round_to_nearest(weights, config, columns):
    """H = I spreads no error: GPTQ's codes are then round-to-nearest's on the same scales, code for code (without double
    quantization: round-to-nearest rounds against the absmax before it is double-quantized, GPTQ against the stored one)."""
    weight = torch.randn(40, columns, generator=torch.Generator().manual_seed(2))
    layer = _layer(weights, weight, block_size=32, **config)
    stored = layer.state_dict()["weight"].clone()
    layer.set_codes(gptq_codes(weight, torch.eye(columns), layer.grid()))
    assert torch.equal(layer.state_dict()["weight"], stored)


def test_hessian_accumulates_batches_as_one():
    x = torch.randn(300, 24, generator=torch.Generator().manual_seed(3))
    hessian = HessianAccumulator(24)
    for part in x.split(70):
        hessian.add(part)
    torch.testing.assert_close(hessian.hessian, 2 * x.t() @ x / 300, rtol=1e-5, atol=1e-5)


def _in_order(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n = h.shape[0]
    return h, torch.arange(n), torch.zeros(n, dtype=torch.bool)


def test_dampening_is_raised_until_the_factorization_succeeds_then_the_layer_is_named(caplog):
    with caplog.at_level(logging.WARNING, logger="llmslim.quant.gptq"):
        _inverse_cholesky(*_in_order(torch.diag(torch.tensor([1.0, -0.5]))), 0.01, "model.layers.0.mlp.up_proj")
    assert "model.layers.0.mlp.up_proj needed dampening 10" in caplog.text
    with pytest.raises(ValueError, match="Hessian of model.layers.3.self_attn.q_proj is not positive definite.*method='rtn'"):
        _inverse_cholesky(*_in_order(-torch.eye(4)), 0.01, "model.layers.3.self_attn.q_proj")


def test_inverse_factor_is_that_of_the_permuted_dampened_hessian_and_leaves_the_hessian_alone():
    torch.manual_seed(0)
    x = torch.randn(200, 16)
    x[:, 5] = 0.0  # a dead input
    h = x.t() @ x
    before = h.clone()
    order = torch.randperm(16)
    dead = torch.diag(h) == 0
    upper = _inverse_cholesky(h, order, dead, 0.1, "layer")
    assert torch.equal(h, before)
    expected = h[order][:, order].clone()
    diag = torch.diag(expected).clone()
    diag[dead[order]] = 1.0
    dampened = expected - torch.diag(torch.diag(expected)) + torch.diag(diag + 0.1 * float(diag.mean()))
    reference = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(dampened)), upper=True)
    assert torch.equal(upper, reference)


# --- models ----------------------------------------------------------------------------------------------------------


def _char_tokenizer(folder):
    """A character-level tokenizer of at most 96 ids (the tiny model's vocabulary) for Tiny Shakespeare's characters."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    chars = sorted(set(TINY_SHAKESPEARE.read_text()))[:95]
    tokenizer = Tokenizer(models.WordLevel({c: i for i, c in enumerate(["<unk>", *chars])}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("(?m).|\\n"), behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>").save_pretrained(folder)


@pytest.fixture(scope="module")
def llama_with_tokenizer(tmp_path_factory):
    """A tiny Llama whose rows are 64 long (bitsandbytes' CPU 4-bit kernels need it), with a tokenizer."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=96)
    path = tmp_path_factory.mktemp("gptq") / "llama"
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(path)
    _char_tokenizer(path)
    return path


CALIBRATION = dict(calibration_tokens=1024, progress=False)  # 2 sequences of 512


@pytest.mark.parametrize("weights", FORMATS)
def test_calibrated_model_reloads_bit_identical_without_calibrating(llama_with_tokenizer, tmp_path, weights, monkeypatch, input_ids):
    config = SlimConfig(weights=weights, method="gptq", block_size=32)
    model = llmslim.from_pretrained(llama_with_tokenizer, config, **CALIBRATION)
    assert {n for n, _ in quantized_layers(model)} and all(layer.fmt == weights for _, layer in quantized_layers(model))
    rtn = llmslim.from_pretrained(llama_with_tokenizer, SlimConfig(weights=weights, block_size=32), progress=False)
    pairs = zip(quantized_layers(model), quantized_layers(rtn), strict=True)
    assert any(not torch.equal(a.state_dict()["weight"], b.state_dict()["weight"]) for (_, a), (_, b) in pairs)  # GPTQ chose other codes
    llmslim.save_pretrained(model, tmp_path / "q")
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["method"] == "gptq"

    def no_calibration(*args, **kwargs):
        raise AssertionError("a quantized checkpoint was calibrated again")

    monkeypatch.setattr("llmslim.load.calibrate_", no_calibration)
    reloaded = llmslim.from_pretrained(tmp_path / "q", progress=False)
    saved, loaded = model.state_dict(), reloaded.state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids).logits, model(input_ids).logits)


def test_transformers_door_calibrates_as_llmslims_does(llama_with_tokenizer, tmp_path):
    config = SlimConfig(weights="nf4", method="gptq")
    ours = llmslim.from_pretrained(llama_with_tokenizer, config, progress=False)  # the default calibration text and tokens
    theirs = AutoModelForCausalLM.from_pretrained(llama_with_tokenizer, quantization_config=config)
    assert [n for n, _ in quantized_layers(theirs)] == [n for n, _ in quantized_layers(ours)]
    a, b = ours.state_dict(), theirs.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    theirs.save_pretrained(tmp_path / "q")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")  # quantized: loads without calibrating
    assert reloaded.config.quantization_config.method == "gptq"
    assert all(torch.equal(b[k], reloaded.state_dict()[k]) for k in b)


def test_calibration_is_deterministic_under_its_seed(llama_with_tokenizer):
    a, b = (llmslim.from_pretrained(llama_with_tokenizer, SlimConfig(weights="nf4", method="gptq"), **CALIBRATION) for _ in range(2))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_gptq_model_is_closer_to_the_float_model_on_held_out_text(llama_with_tokenizer):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llama_with_tokenizer)
    float_model = AutoModelForCausalLM.from_pretrained(llama_with_tokenizer, dtype=torch.float32).eval()
    held_out = calibration_ids(tokenizer, tokens=512, seq_len=128, seed=99)
    with torch.no_grad():
        expected = float_model(held_out).logits
    errors = {}
    for method in ("rtn", "gptq"):
        model = AutoModelForCausalLM.from_pretrained(llama_with_tokenizer, dtype=torch.float32).eval()
        config = SlimConfig(weights="int4", block_size=32, method=method)
        if method == "gptq":
            calibrate_(model, config, calibration_ids(tokenizer, tokens=2048, seq_len=256), progress=False)
        else:
            quantize_(model, config)
        with torch.no_grad():
            errors[method] = float((model(held_out).logits - expected).norm() / expected.norm())
    assert errors["gptq"] < errors["rtn"]


_STOCK_DEQUANTIZE = textwrap.dedent(
    """
    import sys, torch
    from transformers import AutoModelForCausalLM
    from transformers.integrations.bitsandbytes import dequantize_bnb_weight
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
    assert "llmslim" not in sys.modules, "the export must load without llmslim"
    weights = {name: dequantize_bnb_weight(m.weight, getattr(m, "state", None)) for name, m in model.named_modules()
               if type(m).__name__ == "Linear4bit"}
    norms = {name: p.detach() for name, p in model.named_parameters() if "norm" in name}
    torch.save({"weights": weights, "norms": norms}, sys.argv[2])
    """
)


def test_gptq_nf4_export_dequantizes_in_stock_bitsandbytes_to_our_weights(llama_with_tokenizer, tmp_path):
    model = llmslim.from_pretrained(llama_with_tokenizer, SlimConfig(weights="nf4", method="gptq"), **CALIBRATION)
    llmslim.save_pretrained(model, tmp_path / "bnb", format="bnb")
    run = subprocess.run(
        [sys.executable, "-c", _STOCK_DEQUANTIZE, str(tmp_path / "bnb"), str(tmp_path / "w.pt")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    saved = torch.load(tmp_path / "w.pt", weights_only=True)
    theirs, ours = saved["weights"], dict(quantized_layers(model))
    our_norms = {name: p for name, p in model.named_parameters() if "norm" in name}  # balance folded scales into them
    assert saved["norms"].keys() == our_norms.keys() and all(torch.equal(p, our_norms[n]) for n, p in saved["norms"].items())
    assert set(theirs) == set(ours)
    for name, weight in theirs.items():
        assert torch.equal(weight, ours[name].dequantized_weight(weight.dtype)), name


def _rtn_error(weights, layer_weights, hessian):
    return sum(output_error(w, _layer(weights, w).dequantized_weight(torch.float32), hessian) for w in layer_weights)


@pytest.mark.parametrize("weights", ("nf4", "int4", "int8"))
def test_balanced_scales_lower_the_round_to_nearest_error_of_layers_that_share_an_input(weights):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 128, generator=g) * torch.where(torch.arange(128) >= 120, 30.0, 1.0)  # 8 outlier channels
    hessian = HessianAccumulator(128)
    hessian.add(x)
    layer_weights = [torch.randn(64, 128, generator=g) * 0.05 for _ in range(2)]
    scales = balance_scales(layer_weights, hessian.hessian, lambda i, w: _layer(weights, w).dequantized_weight(torch.float32))
    assert scales is not None and scales.shape == (128,) and scales[-8:].mean() > scales[:8].mean()
    scaled = [_layer(weights, w * scales).dequantized_weight(torch.float32) / scales for w in layer_weights]
    balanced = sum(output_error(w, q, hessian.hessian) for w, q in zip(layer_weights, scaled, strict=True))
    assert balanced < 0.8 * _rtn_error(weights, layer_weights, hessian.hessian)


def test_uniform_inputs_need_no_balancing():
    hessian = torch.eye(64) * 2.0  # every channel alike: any rescaling only moves the steps around
    weights = [torch.randn(32, 64, generator=torch.Generator().manual_seed(1))]
    assert balance_scales(weights, hessian, lambda i, w: _layer("int8", w).dequantized_weight(torch.float32)) is None


def _block_and_hessians(path, norm_class=None):
    from transformers import AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    block = model.model.layers[0]
    if norm_class is not None:
        block.input_layernorm = norm_class(block.input_layernorm.weight.shape[0])
    ids = calibration_ids(AutoTokenizer.from_pretrained(path), tokens=512, seq_len=128)
    states = _first_block_inputs(model, block, ids)
    layers = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
    with torch.no_grad():
        hessians = _collect_hessians(block, layers, states)
    return block, layers, hessians, states, _outputs(block, states)


@torch.no_grad()
def _outputs(block, states):
    return [_run_block(block, args, kwargs)[0] for args, kwargs in states]


def test_balancing_a_block_keeps_its_float_outputs_and_scales_the_hessians(llama_with_tokenizer):
    block, layers, _, states, _ = _block_and_hessians(llama_with_tokenizer)
    with torch.no_grad():
        block.input_layernorm.weight.add_(torch.linspace(-0.9, 3.0, 64))  # uneven channels, as trained norms have
        hessians = _collect_hessians(block, layers, states)
    before = _outputs(block, states)
    weights = {n: m.weight.detach().clone() for n, m in layers.items()}
    norms = {n: p.detach().clone() for n, p in block.named_parameters() if "norm" in n}
    q_hessian = hessians["self_attn.q_proj"].hessian.clone()
    spec = SlimConfig(weights="nf4").layer_spec
    _balance_block(block, layers, hessians, states[0], spec)
    for x, y in zip(before, _outputs(block, states), strict=True):
        assert torch.allclose(x, y, rtol=1e-4, atol=1e-5)
    changed = {n for n, m in layers.items() if not torch.equal(m.weight, weights[n])}
    assert {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"} <= changed and "self_attn.o_proj" not in changed
    assert not torch.equal(block.input_layernorm.weight, norms["input_layernorm.weight"])
    scales = layers["self_attn.q_proj"].weight[0] / weights["self_attn.q_proj"][0]
    assert torch.allclose(hessians["self_attn.q_proj"].hessian, q_hessian / torch.outer(scales, scales), rtol=1e-3, atol=1e-6)


class _OnePlusNorm(nn.Module):
    """A norm whose output scales with 1 + weight (Gemma's RMSNorm): dividing its weight does not divide its output."""

    def __init__(self, size):
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(-0.5, 2.0, size))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * (1.0 + self.weight)


def test_a_producer_that_cannot_take_the_scales_is_left_as_it_was(llama_with_tokenizer):
    block, layers, hessians, states, before = _block_and_hessians(llama_with_tokenizer, _OnePlusNorm)
    norm = block.input_layernorm.weight.detach().clone()
    qkv = {n: layers[n].weight.detach().clone() for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")}
    _balance_block(block, layers, hessians, states[0], SlimConfig(weights="nf4").layer_spec)
    assert torch.equal(block.input_layernorm.weight, norm)
    assert all(torch.equal(layers[n].weight, w) for n, w in qkv.items())
    assert all(torch.allclose(x, y, rtol=1e-4, atol=1e-5) for x, y in zip(before, _outputs(block, states), strict=True))


# --- bad input -------------------------------------------------------------------------------------------------------


def test_calibration_text_shorter_than_a_sequence_is_refused(llama_with_tokenizer, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be")
    with pytest.raises(ValueError, match="holds 19 tokens, fewer than one sequence of 512"):
        llmslim.from_pretrained(llama_with_tokenizer, SlimConfig(weights="nf4", method="gptq"), calibration_text=short, progress=False)


def test_non_utf8_calibration_text_is_refused_with_the_file_and_offset(tmp_path):
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("fine")
    (tmp_path / "texts" / "b.txt").write_bytes(b"caf\xe9")
    with pytest.raises(ValueError, match="b.txt' is not UTF-8 \\(byte 3\\)"):
        read_calibration_text(tmp_path / "texts")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_calibration_text(tmp_path / "missing.txt")


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"weights": None, "method": "gptq"}, "method='gptq' chooses the codes of quantized weights"),
        ({"method": "awq"}, "method must be one of \\['rtn', 'gptq'\\], got 'awq'"),
        ({"method": "gptq", "damp": 0}, "damp must be a number in \\(0, 1\\)"),
        ({"act_order": "yes"}, "act_order must be True or False"),
        ({"balance": 1}, "balance must be True or False, got 1"),
    ],
)
def test_bad_gptq_settings_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        SlimConfig(**fields)


def test_cli_quantizes_with_gptq_and_reloads(llama_with_tokenizer, tmp_path):
    from llmslim.cli import main

    out = tmp_path / "out"
    args = ["--weights", "int4", "--method", "gptq", "--calibration-tokens", "512", "--no-balance", "--damp", "0.1"]
    assert main(["quantize", str(llama_with_tokenizer), str(out), *args]) == 0
    saved = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (saved["method"], saved["balance"], saved["act_order"], saved["damp"]) == ("gptq", False, True, 0.1)
    assert not list(tmp_path.glob(".*"))  # nothing half-written beside it
    llmslim.from_pretrained(out, progress=False)


def test_gptq_under_a_bit_budget_calibrates_both_int4_and_int8_layers(llama_with_tokenizer):
    config = SlimConfig(weights="int4", block_size=32, method="gptq", bits_per_param=5.5)
    model = llmslim.from_pretrained(llama_with_tokenizer, config, **CALIBRATION)
    rtn = llmslim.from_pretrained(llama_with_tokenizer, SlimConfig(weights="int4", block_size=32, bits_per_param=5.5), progress=False)
    formats = {name: layer.fmt for name, layer in quantized_layers(model)}
    assert set(formats.values()) == {"int4", "int8"}
    assert formats == {name: layer.fmt for name, layer in quantized_layers(rtn)}  # the budget picks the same layers
    pairs = zip(quantized_layers(model), quantized_layers(rtn), strict=True)
    changed = {a.fmt for (_, a), (_, b) in pairs if not torch.equal(a.state_dict()["weight"], b.state_dict()["weight"])}
    assert changed == {"int4", "int8"}  # GPTQ chose other codes in layers of both formats


def test_blocks_compute_in_bf16_where_the_cpu_multiplies_it_natively_else_float32(monkeypatch):
    from llmslim import calibrate

    for native, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(calibrate, "cpu_half_matmul_is_native", lambda native=native: native)
        assert calibration_dtype(torch.device("cpu")) == expected
    assert calibration_dtype(torch.device("meta")) is None  # off the CPU: the blocks' own dtype


@pytest.mark.parametrize("native", (True, False))
def test_blocks_calibrated_on_cpu_return_to_their_dtypes(llama_with_tokenizer, monkeypatch, native):
    from llmslim import calibrate

    monkeypatch.setattr(calibrate, "cpu_half_matmul_is_native", lambda: native)  # bf16 or float32 blocks while calibrating
    model = llmslim.from_pretrained(llama_with_tokenizer, SlimConfig(weights="nf4", method="gptq"), dtype=torch.bfloat16, **CALIBRATION)
    layers = dict(quantized_layers(model))
    assert layers and all(layer.compute_dtype == torch.bfloat16 for layer in layers.values())
    floats = {
        name: tensor.dtype
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]
        if tensor.is_floating_point() and name.rsplit(".", 1)[0] not in layers
    }
    reference = AutoModelForCausalLM.from_pretrained(llama_with_tokenizer, dtype=torch.bfloat16)
    expected = {name: t.dtype for name, t in [*reference.named_parameters(), *reference.named_buffers()] if name in floats}
    assert floats == expected and torch.bfloat16 in floats.values()


def test_only_one_block_is_in_float_while_calibrating(llama_with_tokenizer, monkeypatch):
    """llmslim's door reads each block from the checkpoint just before calibrating it: the blocks after it are still
    empty (meta) and the ones before it are quantized, so a model larger than RAM can be calibrated."""
    from llmslim import load

    seen: dict[int, list[str]] = {}

    def spy(model, config, input_ids, progress=True, read_block=None):
        def reading(index):
            read_block(index)
            floats = [n for n, m in model.model.layers.named_modules() if type(m) is nn.Linear and not m.weight.is_meta]
            meta = [n for n, m in model.model.layers.named_modules() if type(m) is nn.Linear and m.weight.is_meta]
            seen[index] = floats, meta

        return calibrate_(model, config, input_ids, progress=progress, read_block=reading)

    monkeypatch.setattr(load, "calibrate_", spy)
    model = llmslim.from_pretrained(llama_with_tokenizer, SlimConfig(weights="nf4", method="gptq"), **CALIBRATION)
    assert sorted(seen) == [0, 1]
    assert len(seen[0][0]) == 7 and all(n.startswith("0.") for n in seen[0][0]) and all(n.startswith("1.") for n in seen[0][1])
    assert len(seen[1][0]) == 7 and all(n.startswith("1.") for n in seen[1][0]) and not seen[1][1]
    assert not any(t.is_meta for t in model.state_dict().values()) and len(list(quantized_layers(model))) == 14


@pytest.mark.parametrize("arch", ("qwen3_moe", "gpt_oss"))  # gpt-oss: experts stored transposed, with biases
def test_each_expert_is_calibrated_on_the_tokens_routed_to_it(tmp_path, monkeypatch, arch):
    from llmslim import calibrate

    path = tmp_path / "moe"
    float_moe(arch).to(torch.bfloat16).save_pretrained(path)
    _char_tokenizer(path)
    seen = {}

    def spy(name, store, spec, hessians, settings):
        hessians.pop(0, None)  # as if no calibration token had chosen expert 0
        seen[name] = {i: w.float().clone() for i, w in store.floats.items()}, {i: h.hessian.clone() for i, h in hessians.items()}
        return gptq_experts(name, store, spec, hessians, settings)

    gptq_experts = calibrate._gptq_experts
    monkeypatch.setattr(calibrate, "_gptq_experts", spy)
    config = SlimConfig(weights="nf4", method="gptq")
    model = llmslim.from_pretrained(path, config, **CALIBRATION)  # the experts stream in as float, block by block
    rtn = llmslim.from_pretrained(path, SlimConfig(weights="nf4"), progress=False)
    experts, rtn_experts = dict(quantized_experts(model)), dict(quantized_experts(rtn))
    assert experts.keys() == rtn_experts.keys() == seen.keys() and len(experts) == 4
    for name, store in experts.items():
        weights, hessians = seen[name]
        assert all(torch.equal(a[0], b[0]) for a, b in zip(store.tensors().values(), rtn_experts[name].tensors().values(), strict=True))
        assert hessians and 0 not in hessians
        lower = []
        for index, hessian in hessians.items():
            w = weights[index].t() if store.transposed else weights[index]
            ours = output_error(w, store.expert(index).dequantized_weight(torch.float32), hessian)
            theirs = output_error(w, rtn_experts[name].expert(index).dequantized_weight(torch.float32), hessian)
            assert ours <= theirs
            lower.append(ours < theirs)
        assert any(lower), name  # GPTQ found better codes for some expert of each projection

    from transformers import AutoTokenizer

    in_memory = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()  # the other door: a float model
    calibrate_(in_memory, config, calibration_ids(AutoTokenizer.from_pretrained(path), tokens=1024), progress=False)
    a, b = model.state_dict(), in_memory.state_dict()
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []
    pairs = list(zip(quantized_layers(model), quantized_layers(rtn), strict=True))
    assert any(not torch.equal(x.state_dict()["weight"], y.state_dict()["weight"]) for (_, x), (_, y) in pairs)
    with torch.no_grad():
        assert torch.isfinite(model(torch.arange(32)[None]).logits).all()
