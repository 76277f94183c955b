"""The planner's config.json validation: bad fields raise a ValueError naming them, at once and in bounded memory;
a config that passes always gives a plan without negative numbers."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import llmslim
from llmslim import SlimConfig
from llmslim.plan import Hardware, Workload, plan_model
from llmslim.plan.hardware import GiB, parse_size
from llmslim.plan.known import KNOWN_CONFIGS
from llmslim.plan.report import render
from llmslim.plan.shapes import _BOOL_FIELDS, _INT_FIELDS, MAX_LAYERS
from llmslim.quant.modules import quantized_layers

CPU_ONLY = Hardware(gpus=[], cpu=24 * GiB, disk=10**12)
ONE_GPU = Hardware(gpus=[24 * GiB], cpu=64 * GiB, disk=10**12)
FIELDS = [*_INT_FIELDS, *_BOOL_FIELDS, "partial_rotary_factor", "dtype", "torch_dtype", "model_type"]
DELETE = object()


def _small(name: str) -> dict:
    """A bundled config with 2 blocks (same tensors per block, a cheaper plan)."""
    config = {k: v for k, v in KNOWN_CONFIGS[name].items() if not k.startswith("_")}
    config["n_layer" if "n_layer" in config else "num_hidden_layers"] = 2
    return config


BASES = {name: _small(name) for name in ("llama-2-7b", "bloom-176b", "opt-175b", "falcon-180b", "mixtral-8x7b")}
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=5,
)
values = json_values | st.integers(min_value=-3, max_value=300) | st.sampled_from([0, -64, 10**6, 2**40, 0.5, "64", "bfloat16", DELETE])


def _numbers(value, path="plan"):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _numbers(v, f"{path}[{i}]")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield path, value


def _check_plan(config: dict, changed: list[str], hardware: Hardware, workload: Workload) -> None:
    try:
        plan = plan_model(config, hardware, workload)
    except ValueError as err:
        message = str(err)
        assert any(field in message for field in changed) or "config.json has none of" in message, message
        return
    bad = [(path, v) for path, v in _numbers(plan.to_dict()) if v < 0 or (isinstance(v, float) and not math.isfinite(v))]
    assert not bad, bad
    render(plan)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    base=st.sampled_from(list(BASES)),
    changes=st.dictionaries(st.sampled_from(FIELDS), values, min_size=1, max_size=3),
    hardware=st.sampled_from([CPU_ONLY, ONE_GPU]),
    train=st.booleans(),
)
@example(base="llama-2-7b", changes={"hidden_size": "64"}, hardware=CPU_ONLY, train=False)  # once a TypeError
@example(base="llama-2-7b", changes={"num_hidden_layers": -2}, hardware=CPU_ONLY, train=False)  # once a plan with "-2 layers"
@example(base="opt-175b", changes={"hidden_size": -64}, hardware=CPU_ONLY, train=False)
@example(base="llama-2-7b", changes={"num_attention_heads": 0}, hardware=CPU_ONLY, train=False)  # once a ZeroDivisionError
@example(base="falcon-180b", changes={"partial_rotary_factor": None}, hardware=CPU_ONLY, train=False)
def test_any_json_value_in_a_config_field_gives_a_plan_or_names_the_field(base, changes, hardware, train):
    config = dict(BASES[base])
    for field, value in changes.items():
        if value is DELETE:
            config.pop(field, None)
        else:
            config[field] = value
    config = json.loads(json.dumps(config))  # what a config.json holds
    _check_plan(config, list(changes), hardware, Workload(train=train))


def _plausible(field: str) -> st.SearchStrategy:
    """Values of the right type for `field` (in range, or at its bounds): most configs pass and are planned."""
    if field in _INT_FIELDS:
        low, high = _INT_FIELDS[field]
        return st.integers(low, min(high, 600)) | st.sampled_from([low, high]) | st.none()
    if field in _BOOL_FIELDS:
        return st.booleans() | st.none()
    if field == "partial_rotary_factor":
        return st.floats(0.01, 1.0) | st.none()
    if field == "model_type":
        return st.sampled_from(["llama", "mistral", "qwen2", "mixtral", "gpt2", "opt", "bloom", "falcon"])
    return st.sampled_from(["bfloat16", "float16", "float32", "int8", None])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    base=st.sampled_from(list(BASES)),
    changes=st.lists(st.sampled_from(FIELDS).flatmap(lambda f: st.tuples(st.just(f), _plausible(f))), min_size=1, max_size=4).map(dict),
    hardware=st.sampled_from([CPU_ONLY, ONE_GPU]),
    train=st.booleans(),
)
def test_plausible_values_give_plans_without_negative_numbers(base, changes, hardware, train):
    config = dict(BASES[base], **changes)
    _check_plan(config, list(changes), hardware, Workload(train=train))


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        (
            "num_hidden_layers",
            1_000_000,
            rf"'num_hidden_layers' must be an integer from 1 to {MAX_LAYERS}, got 1000000: fix it in config.json",
        ),
        ("num_hidden_layers", -2, r"'num_hidden_layers' must be an integer from 1 to \d+, got -2"),
        ("hidden_size", "64", r"'hidden_size' must be an integer from 1 to \d+, got '64'"),
        ("hidden_size", 64.0, r"'hidden_size' must be an integer from 1 to \d+, got 64.0"),
        ("vocab_size", True, r"'vocab_size' must be an integer from 1 to \d+, got True"),
        ("intermediate_size", 0, r"'intermediate_size' must be an integer from 1 to \d+, got 0"),
        ("tie_word_embeddings", "false", r"'tie_word_embeddings' must be true or false, got 'false'"),
        ("torch_dtype", ["bfloat16"], r"'torch_dtype' must be a dtype name such as 'bfloat16', got \['bfloat16'\]"),
        ("model_type", ["llama"], r"'model_type' must name an architecture such as 'llama', got \['llama'\]"),
        ("num_attention_heads", 8192, r"more attention heads \(8192\) than hidden units \(4096\): fix num_attention_heads or hidden_size"),
    ],
)
def test_bad_config_fields_are_named_with_their_value(field, value, message):
    config = dict(BASES["llama-2-7b"], **{field: value})
    with pytest.raises(ValueError, match=message):
        plan_model(config, CPU_ONLY)


def test_a_config_json_file_with_a_million_layers_is_refused_from_the_cli(tmp_path, capsys):
    from llmslim.cli import main

    (tmp_path / "config.json").write_text(json.dumps(dict(BASES["llama-2-7b"], num_hidden_layers=1_000_000)))
    assert main(["plan", str(tmp_path), "--cpu", "24GiB", "--disk", "1TB"]) == 2
    assert "llmslim plan: error: config.json field 'num_hidden_layers' must be an integer from 1 to" in capsys.readouterr().err


def test_the_suggested_bf16_call_loads_the_model(tiny_llama):
    plan = plan_model(tiny_llama, CPU_ONLY)
    assert plan.recommended == "bf16"
    call = next(line.strip() for line in render(plan).splitlines() if line.strip().startswith("llmslim.from_pretrained("))
    assert call == "llmslim.from_pretrained(MODEL, SlimConfig(weights=None), dtype='bfloat16', device_map='cpu')"
    model = eval(call, {"llmslim": llmslim, "SlimConfig": SlimConfig, "MODEL": tiny_llama})  # the line a user copies
    assert model.dtype == torch.bfloat16 and not list(quantized_layers(model))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"gpus": [-1]}, r"gpus must list each GPU's memory in bytes \(> 0\), got \[-1\]"),
        ({"disk": -1}, r"disk space must be >= 0 bytes, got -1"),
        ({"bandwidth": {"disk": 0.0}}, r"bandwidths must be bytes/s > 0, got \{'disk': 0.0\}"),  # a divisor of tokens/s
    ],
)
def test_bad_hardware_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Hardware(**{"gpus": [], "cpu": 24 * GiB, "disk": 10**12, **kwargs})


@pytest.mark.parametrize("value", [float("inf"), float("nan"), -1])
def test_parse_size_refuses_non_finite_and_negative_numbers(value):
    with pytest.raises(ValueError, match=r"a size must be a finite number of bytes >= 0, got"):
        parse_size(value)


GEMMA = {"model_type": "gemma", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 1,
         "intermediate_size": 128, "vocab_size": 100, "head_dim": 16}  # fmt: skip


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"num_hidden_layers": 10**6}, r"'num_hidden_layers' must be an integer from 1 to \d+, got 1000000"),  # no million-block skeleton
        ({"hidden_act": 5}, r"transformers rejects this 'gemma' config.json: .*hidden_act"),
        ({"rope_theta": "abc"}, r"transformers cannot build a 'gemma' model from this config.json: TypeError"),
    ],
)
def test_architectures_planned_from_a_skeleton_refuse_bad_fields_with_a_value_error(changes, message):
    with pytest.raises(ValueError, match=message):
        plan_model(dict(GEMMA, **changes), CPU_ONLY)


def test_integer_buffers_of_a_skeleton_are_counted():
    bert = {"model_type": "bert", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128}
    plan = plan_model(dict(bert, vocab_size=100), CPU_ONLY)  # position_ids is an int64 buffer
    assert plan.formats["bf16"].weights.buffers > 0
