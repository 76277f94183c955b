"""Quantized linear modules (`SlimLinear4bit`, `SlimLinear8bit`) and `replace_linear_modules`."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from llmslim.config import SlimConfig
from llmslim.quant import formats, kernels
from llmslim.quant.modules import SlimLinear, SlimLinear4bit, SlimLinear8bit, quantized_layers, replace_linear_modules
from llmslim.quant.registry import FORMATS

# relative error ||y_q - y|| / ||y|| of a quantized layer on random normal weights and inputs
REL_ERROR = {"nf4": 0.15, "fp4": 0.18, "int8": 0.02, "int4": 0.15}


def _linear(in_features: int, out_features: int, bias: bool = True, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=bias)
    nn.init.normal_(linear.weight)
    if bias:
        nn.init.normal_(linear.bias)
    return linear.to(dtype)


def _quantized(linear: nn.Module, config: SlimConfig) -> SlimLinear:
    """What loading does: an empty layer from the float one, its weight quantized in, its bias copied."""
    layer = FORMATS[config.weights].module_class().from_linear(linear, config.layer_spec())
    layer.set_float_weight(linear.weight.data)
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    return layer


def _rel_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.float() - expected.float()).norm() / expected.float().norm()).item()


def _x(batch: tuple[int, ...], in_features: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn((*batch, in_features), generator=torch.Generator().manual_seed(1)).to(dtype)


# --- construction on the meta device ------------------------------------------------------------------------------


@pytest.mark.parametrize("double_quant", (True, False))
def test_4bit_from_meta_linear_has_the_stored_layout(double_quant):
    linear = nn.Linear(96, 40, device="meta", dtype=torch.bfloat16)
    layer = SlimLinear4bit.from_linear(linear, SlimConfig(weights="nf4", block_size=64, double_quant=double_quant).layer_spec())
    expected = {"weight": ((1920, 1), torch.uint8), "bias": ((40,), torch.bfloat16)}  # 96 * 40 / 2 bytes, 60 blocks
    if double_quant:
        expected |= {"weight_absmax": ((60,), torch.uint8), "weight_nested_absmax": ((1,), torch.float32)}
        expected |= {"weight_nested_offset": ((), torch.float32)}
    else:
        expected["weight_absmax"] = ((60,), torch.float32)
    state = layer.state_dict()
    assert {k: (tuple(v.shape), v.dtype) for k, v in state.items()} == expected
    assert all(v.is_meta for v in state.values())
    assert (layer.in_features, layer.out_features, layer.fmt, layer.block_size) == (96, 40, "nf4", 64)
    assert layer.compute_dtype == torch.bfloat16
    assert not layer.weight.requires_grad


def test_4bit_layout_of_an_odd_sized_layer():
    layer = SlimLinear4bit.from_linear(nn.Linear(7, 3, bias=False, device="meta"), SlimConfig(weights="fp4", block_size=32).layer_spec())
    state = layer.state_dict()
    assert layer.bias is None and "bias" not in state
    assert state["weight"].shape == (11, 1)  # ceil(21 / 2)
    assert state["weight_absmax"].shape == (1,) and state["weight_nested_absmax"].shape == (1,)


def test_int8_from_meta_linear_has_the_stored_layout():
    layer = SlimLinear8bit.from_linear(nn.Linear(96, 40, device="meta"), SlimConfig(weights="int8", compute_dtype="bfloat16").layer_spec())
    state = layer.state_dict()
    assert {k: (tuple(v.shape), v.dtype) for k, v in state.items()} == {
        "weight": ((40, 96), torch.int8),
        "SCB": ((40,), torch.float32),
        "bias": ((40,), torch.float32),
    }
    assert all(v.is_meta for v in state.values())
    assert layer.compute_dtype == torch.bfloat16 and layer.threshold == 1.5


def test_conv1d_from_meta_takes_in_and_out_from_its_transposed_weight():
    conv = Conv1D(40, 96).to("meta")  # nf=out, nx=in: weight (96, 40)
    layer = SlimLinear4bit.from_linear(conv, SlimConfig(weights="nf4").layer_spec())
    assert (layer.in_features, layer.out_features) == (96, 40)
    assert layer.source_transposed


# --- quantizing and forward ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch", ((1,), (7,), (2, 3)), ids=str)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("weights", ("nf4", "fp4", "int8", "int4"))
def test_forward_is_close_to_the_float_layer(weights, dtype, batch):
    linear = _linear(128, 48, dtype=dtype)
    layer = _quantized(linear, SlimConfig(weights=weights))
    x = _x(batch, 128, dtype)
    out = layer(x)
    assert out.dtype == dtype and out.shape == (*batch, 48)
    assert _rel_error(out, linear(x)) < REL_ERROR[weights]


@pytest.mark.parametrize("weights", ("nf4", "fp4", "int8", "int4"))
def test_forward_equals_matmul_with_the_dequantized_weight_plus_bias(weights):
    linear = _linear(128, 48)
    layer = _quantized(linear, SlimConfig(weights=weights))
    x = _x((5,), 128)
    expected = x @ layer.dequantized_weight(torch.float32).T + linear.bias
    tol = 1e-5 * expected.abs().max().item()  # float32 kernels: high and low bf16 parts
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=tol)
    layer.bias = None
    torch.testing.assert_close(layer(x), expected - linear.bias, rtol=0, atol=tol)


@pytest.mark.parametrize("in_features", (65, 96))
def test_4bit_forward_equals_reference_when_in_features_is_not_a_multiple_of_the_block(in_features):
    linear = _linear(in_features, 16)
    layer = _quantized(linear, SlimConfig(weights="nf4", block_size=64))
    x = _x((3,), in_features)
    reference = formats.dequantize_4bit(layer.four_bit_weight())  # (16, in_features)
    torch.testing.assert_close(layer(x), x @ reference.T + linear.bias, rtol=1e-5, atol=1e-5)


def test_4bit_dequantized_weight_matches_the_reference_and_the_float_weight():
    linear = _linear(128, 48)
    layer = _quantized(linear, SlimConfig(weights="nf4", double_quant=True))
    w = layer.dequantized_weight()
    assert w.dtype == torch.float32 and w.shape == (48, 128)
    assert torch.equal(w, formats.dequantize_4bit(layer.four_bit_weight()))
    assert torch.equal(layer.weight, formats.quantize_4bit(linear.weight.data, "nf4", 64, False).codes)
    assert _rel_error(w, linear.weight) < 0.11


def test_compute_dtype_from_config_and_output_in_input_dtype():
    linear = _linear(64, 32, dtype=torch.bfloat16)
    layer = _quantized(linear, SlimConfig(weights="nf4", compute_dtype="float32"))
    assert layer.compute_dtype == torch.float32
    x = _x((4,), 64, torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    expected = x.float() @ layer.dequantized_weight().T + linear.bias.float()
    torch.testing.assert_close(out, expected.bfloat16())


@pytest.mark.parametrize("weights", ("nf4", "int8"))
def test_conv1d_source_is_transposed(weights):
    torch.manual_seed(0)
    conv = Conv1D(48, 128)  # weight (128, 48)
    nn.init.normal_(conv.weight)
    nn.init.normal_(conv.bias)
    layer = _quantized(conv, SlimConfig(weights=weights))
    assert layer.weight.shape == ((48 * 128 // 2, 1) if weights == "nf4" else (48, 128))
    x = _x((2, 5), 128)
    assert _rel_error(layer(x), conv(x)) < REL_ERROR[weights]
    linear = nn.Linear(128, 48)
    linear.weight.data, linear.bias.data = conv.weight.data.t().contiguous(), conv.bias.data
    same_as_linear = _quantized(linear, SlimConfig(weights=weights))
    assert torch.equal(layer(x), same_as_linear(x))


@pytest.mark.parametrize("weights", ("nf4", "int8"))
def test_wrong_weight_shape_is_refused(weights):
    layer = (SlimLinear8bit if weights == "int8" else SlimLinear4bit).from_linear(nn.Linear(6, 4), SlimConfig(weights=weights).layer_spec())
    with pytest.raises(ValueError, match=r"a weight of shape \(6, 4\) does not fit a layer of shape \(4, 6\)"):
        layer.set_float_weight(torch.zeros(6, 4))
    conv_layer = SlimLinear4bit.from_linear(Conv1D(4, 6), SlimConfig(weights="nf4").layer_spec())
    with pytest.raises(ValueError, match=r"a weight of shape \(6, 4\) does not fit a layer of shape \(4, 6\)"):
        conv_layer.set_float_weight(torch.zeros(4, 6))  # given (out, in) where Conv1D's (in, out) was expected


def test_state_dict_loads_into_a_meta_layer():
    config = SlimConfig(weights="fp4", block_size=32)
    layer = _quantized(_linear(64, 24), config)
    fresh = SlimLinear4bit.from_linear(nn.Linear(64, 24, device="meta"), config.layer_spec())
    fresh.load_state_dict(layer.state_dict(), assign=True)
    x = _x((3,), 64)
    assert torch.equal(fresh(x), layer(x))


def test_quantized_nbytes_and_repr():
    layer = _quantized(_linear(128, 48), SlimConfig(weights="nf4"))
    assert layer.quantized_nbytes() == 128 * 48 // 2 + 96 + 4 + 4  # codes, uint8 absmax, nested absmax, offset
    assert "format=nf4" in repr(layer) and "in_features=128, out_features=48, bias=True" in repr(layer)
    int8_layer = _quantized(_linear(128, 48), SlimConfig(weights="int8"))
    assert int8_layer.quantized_nbytes() == 128 * 48 + 48 * 4


# --- replace_linear_modules ------------------------------------------------------------------------------------------


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(8, 8)
        self.k_proj = nn.Linear(8, 8, bias=False)
        self.mlp = nn.Sequential()
        self.mlp.add_module("up_proj", nn.Linear(8, 16))
        self.mlp.add_module("down_proj", nn.Linear(16, 8))


class _TinyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(64, 8)
        self.layers = nn.ModuleList([_Block(), _Block()])
        self.norm = nn.LayerNorm(8)
        self.lm_head = nn.Linear(8, 64, bias=False)


ALL_LINEARS = [f"layers.{i}.{name}" for i in (0, 1) for name in ("q_proj", "k_proj", "mlp.up_proj", "mlp.down_proj")]


@pytest.fixture
def model() -> _TinyModel:
    with torch.device("meta"):
        return _TinyModel()


def _slim_names(model: nn.Module) -> list[str]:
    return [name for name, _ in quantized_layers(model)]


def test_default_replaces_every_linear_but_lm_head(model):
    replaced = replace_linear_modules(model, SlimConfig(weights="nf4"))
    assert replaced == ALL_LINEARS == _slim_names(model)
    assert type(model.lm_head) is nn.Linear and type(model.embed) is nn.Embedding
    up = model.layers[0].mlp.up_proj
    assert isinstance(up, SlimLinear4bit) and (up.in_features, up.out_features) == (8, 16) and up.weight.is_meta


def test_int8_format_gives_8bit_layers(model):
    replace_linear_modules(model, SlimConfig(weights="int8"))
    assert all(isinstance(layer, SlimLinear8bit) for _, layer in quantized_layers(model))


@pytest.mark.parametrize(
    "include, exclude, expected",
    [
        (["q_proj"], None, ["layers.0.q_proj", "layers.1.q_proj"]),
        (["layers.1.*"], None, ALL_LINEARS[4:]),
        (["mlp.*_proj"], None, ["layers.0.mlp.up_proj", "layers.0.mlp.down_proj", "layers.1.mlp.up_proj", "layers.1.mlp.down_proj"]),
        # an explicit exclude replaces the default ["lm_head"]
        (
            None,
            ["k_proj", "layers.0.mlp.*"],
            ["layers.0.q_proj", "layers.1.q_proj", "layers.1.mlp.up_proj", "layers.1.mlp.down_proj", "lm_head"],
        ),
        (["*proj"], ["*.1.*"], ALL_LINEARS[:4]),
        (["lm_head"], [], ["lm_head"]),
        (["lm_head", "q_proj"], None, ["layers.0.q_proj", "layers.1.q_proj"]),  # exclude wins over include
        (["proj"], None, []),  # a pattern matches whole names or dotted suffixes, not parts of a name
    ],
)
def test_include_and_exclude_patterns(model, caplog, include, exclude, expected):
    kwargs = {} if exclude is None else {"exclude": exclude}
    with caplog.at_level(logging.WARNING, logger="llmslim.quant.modules"):
        replaced = replace_linear_modules(model, SlimConfig(weights="fp4", include=include, **kwargs))
    assert replaced == expected == _slim_names(model)
    assert ("no linear layer matched" in caplog.text) == (not expected)


def test_explicitly_included_embedding_is_skipped_and_logged(model, caplog):
    with caplog.at_level(logging.INFO, logger="llmslim.quant.modules"):
        replaced = replace_linear_modules(model, SlimConfig(weights="nf4", include=["embed", "norm", "q_proj"]))
    assert replaced == ["layers.0.q_proj", "layers.1.q_proj"]
    assert type(model.embed) is nn.Embedding and type(model.norm) is nn.LayerNorm
    messages = [r.getMessage() for r in caplog.records if r.name == "llmslim.quant.modules"]
    assert "not quantizing embed: Embedding layers are not quantized (only Linear and Conv1D)" in messages
    assert "not quantizing norm: LayerNorm layers are not quantized (only Linear and Conv1D)" in messages


def test_keep_names_stay_float_and_are_logged(model, caplog):
    with caplog.at_level(logging.INFO, logger="llmslim.quant.modules"):
        replaced = replace_linear_modules(model, SlimConfig(weights="nf4"), keep={"layers.0.q_proj", "layers.1.mlp.down_proj"})
    assert replaced == [n for n in ALL_LINEARS if n not in ("layers.0.q_proj", "layers.1.mlp.down_proj")]
    assert type(model.layers[0].q_proj) is nn.Linear and type(model.layers[1].mlp.down_proj) is nn.Linear
    assert "not quantizing layers.0.q_proj: its weight is tied to another module" in caplog.text


def test_no_format_replaces_nothing(model):
    assert replace_linear_modules(model, SlimConfig(weights=None)) == []
    assert _slim_names(model) == []


def test_already_quantized_layers_are_not_replaced_again(model):
    first = replace_linear_modules(model, SlimConfig(weights="nf4", include=["q_proj"]))
    layer = model.layers[0].q_proj
    second = replace_linear_modules(model, SlimConfig(weights="nf4"))
    assert model.layers[0].q_proj is layer
    assert sorted(first + second) == sorted(ALL_LINEARS)


def test_conv1d_layers_are_replaced():
    model = nn.Module()
    with torch.device("meta"):
        model.c_attn = Conv1D(24, 8)
    assert replace_linear_modules(model, SlimConfig(weights="nf4")) == ["c_attn"]
    assert (model.c_attn.in_features, model.c_attn.out_features) == (8, 24) and model.c_attn.source_transposed


@pytest.mark.slow
@pytest.mark.parametrize("weights, fullgraph", [("int4", True), ("nf4", False), ("int8", False)])
def test_torch_compile_goes_through_the_cpu_operators(weights, fullgraph):
    # the operators have fake (shape) implementations, so tracing neither fails nor falls back
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 48).to(torch.bfloat16)
    layer = FORMATS[weights].module_class().from_linear(linear, SlimConfig(weights=weights).layer_spec())
    layer.set_float_weight(linear.weight.data)
    layer.bias = linear.bias
    compiled = torch.compile(layer, fullgraph=fullgraph)
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), layer(x), rtol=0, atol=0)


@pytest.mark.parametrize("weights", ["int8", "nf4", "fp4", "int4"])
@pytest.mark.parametrize("tokens", [1, 5, 40])  # the packed / one-token kernels and the dense path
def test_input_gradient_is_that_of_the_dequantized_weight(weights, tokens):
    torch.manual_seed(0)
    linear = nn.Linear(128, 24).to(torch.bfloat16)
    layer = FORMATS[weights].module_class().from_linear(linear, SlimConfig(weights=weights).layer_spec())
    layer.set_float_weight(linear.weight.data)
    x = torch.randn(tokens, 128, dtype=torch.bfloat16, requires_grad=True)
    grad_out = torch.randn(tokens, 24, dtype=torch.bfloat16)
    layer(x).backward(grad_out)
    assert x.grad is not None and not any(p.requires_grad for p in layer.parameters())
    dtype = layer._gemm_dtype(x)  # float32 on a CPU that emulates bf16 GEMMs
    torch.testing.assert_close(x.grad, (grad_out.to(dtype) @ layer.dequantized_weight(dtype)).to(torch.bfloat16))


@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("weights", ["int8", "nf4", "int4"])
def test_dense_passes_on_a_cpu_without_half_gemms_compute_in_float32(weights, native, monkeypatch):
    """bf16 GEMMs are emulated without AVX-512 BF16 / AMX (~15x slower): a layer in train mode (the checkpointed forward
    too), a pass that backpropagates and a prompt compute in float32 there; decode keeps the compute dtype's kernels."""
    monkeypatch.setattr(kernels, "CPU_HALF_MATMUL_IS_NATIVE", native)
    torch.manual_seed(0)
    linear = nn.Linear(128, 24).to(torch.bfloat16)
    layer = _quantized(linear, SlimConfig(weights=weights))
    x = torch.randn(40, 128, dtype=torch.bfloat16)
    in_float32 = (x.float() @ layer.dequantized_weight(torch.float32).t() + linear.bias.float()).to(torch.bfloat16)
    inference = layer.eval()(x)
    layer.train()
    with torch.no_grad():
        checkpointed = layer(x)
    trained = layer(x.clone().requires_grad_(True))
    for out in (checkpointed, trained, inference):
        assert out.dtype == torch.bfloat16
        if native:
            torch.testing.assert_close(out, inference, rtol=0, atol=0)
        else:
            torch.testing.assert_close(out, in_float32, rtol=0, atol=0)
    token = x[:1]
    layer.eval()
    with torch.no_grad():
        assert torch.equal(layer(token), layer._add_bias(layer._matmul(token)).to(torch.bfloat16))  # the decode kernels


# --- NF4/FP4 layers in bitsandbytes' CPU layout ---------------------------------------------------


@pytest.mark.skipif(not kernels.bnb_cpu_4bit_kernel(), reason="bitsandbytes' CPU 4-bit kernel needs AVX-512 BF16")
@pytest.mark.parametrize("fmt", formats.FOUR_BIT_FORMATS)
def test_4bit_layer_switches_to_the_cpu_layout_for_inference_only(fmt, tmp_path):
    linear = _linear(320, 96, dtype=torch.bfloat16)
    layer = _quantized(linear, SlimConfig(weights=fmt)).eval()
    stored = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(5, 320, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = nn.functional.linear(x.float(), layer.dequantized_weight(torch.float32), linear.bias.float())
        got = layer(x)
    assert layer.cpu_layout and layer.weight_absmax_cpu.dtype == torch.bfloat16
    assert _rel_error(got, expected) < 0.01
    # saved, compared and dequantized in the stored layout while packed
    assert stored.keys() == layer.state_dict().keys()
    assert all(torch.equal(stored[k], v) for k, v in layer.state_dict().items())
    assert torch.equal(layer.four_bit_weight().codes, stored["weight"])
    # loading a state dict into a packed layer puts it back in the stored layout first
    layer.load_state_dict(stored)
    assert not layer.cpu_layout and "weight_absmax_cpu" not in layer._buffers
    # training goes back to the stored layout; a weight swapped in from outside is read as stored
    with torch.no_grad():
        layer(x)
    layer.train()
    with torch.no_grad():
        assert _rel_error(layer(x), expected) < 0.01
    assert not layer.cpu_layout and torch.equal(layer.weight, stored["weight"])
    layer.eval()
    with torch.no_grad():
        layer(x)
    layer.weight = nn.Parameter(stored["weight"].clone(), requires_grad=False)  # what the offload manager does
    assert not layer.cpu_layout
    with torch.no_grad():
        assert _rel_error(layer(x), expected) < 0.01


def test_4bit_layer_keeps_the_stored_layout_where_the_kernel_does_not_apply():
    linear = _linear(64, 48, dtype=torch.bfloat16)  # 48 rows: not a multiple of 32
    layer = _quantized(linear, SlimConfig(weights="nf4")).eval()
    with torch.no_grad():
        layer(torch.randn(2, 64, dtype=torch.bfloat16))
    assert not layer.cpu_layout
    fp32 = _quantized(_linear(64, 64), SlimConfig(weights="nf4")).eval()  # float32 compute: the kernel is bf16 only
    with torch.no_grad():
        fp32(torch.randn(2, 64))
    assert not fp32.cpu_layout


def _nf4_decode_layer(bias: bool) -> tuple[SlimLinear4bit, list[torch.Tensor]]:
    """A bf16 NF4 layer (128 -> 96) in eval mode, and decode rows of 1 and 5 tokens for it."""
    linear = nn.Linear(128, 96, bias=bias).to(torch.bfloat16)
    layer = SlimLinear4bit.from_linear(linear, SlimConfig(weights="nf4").layer_spec())
    layer.set_float_weight(linear.weight.data)
    if bias:
        layer.bias = nn.Parameter(linear.bias.data.clone(), requires_grad=False)
    layer.eval()
    return layer, [torch.randn(1, t, 128, generator=torch.Generator().manual_seed(t)).to(torch.bfloat16) for t in (1, 5)]


@pytest.mark.skipif(not (kernels._ops_loaded() and kernels._i16_kernel()), reason="mm_4bit_i16 is built for AVX2 only")
@pytest.mark.parametrize("bias", (False, True))
def test_4bit_decode_on_avx2_goes_straight_to_the_i16_kernel_with_the_same_bits(bias, monkeypatch):
    # the AVX2 counterpart of the test below: the operands kept at the first call, the general path's result bit for bit
    layer, tokens = _nf4_decode_layer(bias)
    with torch.no_grad():
        general = [SlimLinear.forward(layer, x) for x in tokens]
        fast = [layer(x) for x in tokens]
        for got, want in zip(fast, general, strict=True):
            assert torch.equal(got, want)
        monkeypatch.setattr(kernels, "linear_4bit", None)  # the general path would fail now; the kept operands do not
        assert torch.equal(layer(tokens[0]), general[0])
        monkeypatch.undo()
        layer.set_codes(torch.randint(0, 16, (96, 128), dtype=torch.uint8, generator=torch.Generator().manual_seed(9)))
        new = layer(tokens[0])  # new codes (a new tensor): operands taken again, not the kept ones
        assert torch.equal(new, SlimLinear.forward(layer, tokens[0])) and not torch.equal(new, general[0])
        calls = []
        kernel = torch.ops.llmslim.mm_4bit_i16
        monkeypatch.setattr(torch.ops.llmslim, "mm_4bit_i16", lambda *args: calls.append(1) or kernel(*args))
        layer(tokens[0])
        fresh, _ = _nf4_decode_layer(bias)
        monkeypatch.setattr(kernels, "I16_4BIT_MAX_TOKENS", 0)  # the opt-out, at a layer's first call and after
        fresh(tokens[0])
        layer(tokens[0])
        monkeypatch.setattr(kernels, "I16_4BIT_MAX_TOKENS", kernels.DECODE_MAX_TOKENS)
        general_path = kernels.linear_4bit
        monkeypatch.setattr(kernels, "linear_4bit", None)
        fresh(tokens[0])  # the direct path: the kept decision does not depend on the limit at the first call
        monkeypatch.setattr(kernels, "linear_4bit", general_path)
        layer.train()
        layer(tokens[0])  # training: the general path (a dense product)
        assert calls == [1, 1]


@pytest.mark.skipif(not kernels.decode_kernels(), reason="llmslim's decode kernel needs AVX-512 BF16 and VNNI")
@pytest.mark.parametrize("bias", (False, True))
def test_4bit_decode_goes_straight_to_the_kernel_with_the_same_bits(bias, monkeypatch):
    # a decoded token skips the general path's checks (Python per call) and calls the same operator: identical results
    layer, tokens = _nf4_decode_layer(bias)
    with torch.no_grad():
        layer(tokens[0])  # the first call repacks into the CPU layout
        general = [SlimLinear.forward(layer, x) for x in tokens]
        monkeypatch.setattr(kernels, "linear_4bit_packed", None)  # the general path would fail now
        fast = [layer(x) for x in tokens]
        for got, want in zip(fast, general, strict=True):
            assert torch.equal(got, want)
        prompt = torch.randn(1, kernels.DECODE_MAX_TOKENS + 1, 128).to(torch.bfloat16)
        with pytest.raises(TypeError):  # more rows than decode takes: the general path
            layer(prompt)
        layer.train()
        layer(tokens[0])  # training: the general path, which keeps the stored layout for training
        assert not layer.cpu_layout


@pytest.mark.skipif(not (kernels._ops_loaded() and kernels._i16_kernel()), reason="mm_4bit_i16 is built for AVX2 only")
@pytest.mark.parametrize("in_features", (704, 1024))  # 11 blocks a row (8 decoded together, 3 alone), 16
def test_avx2_decode_keeps_a_double_quantized_absmax_decoded_with_the_same_bits(in_features):
    linear = nn.Linear(in_features, 64, bias=False).to(torch.bfloat16)
    layer = SlimLinear4bit.from_linear(linear, SlimConfig(weights="nf4").layer_spec())
    layer.set_float_weight(linear.weight.data)
    layer.eval()
    assert layer.weight_absmax.dtype == torch.uint8  # double quantization, the default
    x = torch.randn(1, 3, in_features, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    with torch.no_grad():
        general = SlimLinear.forward(layer, x)  # mm_4bit_i16 decoding the uint8 absmax per row
        fast = layer(x)
    assert torch.equal(fast, general)
    codes, _, absmax, nested_absmax, nested_map, nested_offset = layer.i16_operands(x[0])
    assert absmax.dtype == torch.float32 and nested_absmax is None and nested_map is None and nested_offset is None
    n = layer.weight_absmax.numel()
    index = torch.arange(n) // formats.NESTED_BLOCK_SIZE
    want = formats.dynamic_map()[layer.weight_absmax.long()] * layer.weight_nested_absmax[index] + layer.weight_nested_offset
    # the kernel's one fused multiply-add against torch's two roundings
    torch.testing.assert_close(absmax, want, rtol=1e-6, atol=1e-7 * float(want.abs().max()))
    with pytest.raises(RuntimeError, match="whole rows of 3 blocks"):
        torch.ops.llmslim.block_scales_f32(
            layer.weight_absmax, layer.weight_nested_absmax, formats.dynamic_map(), layer.weight_nested_offset, 3
        )
