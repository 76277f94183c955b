"""`SlimConfig`: validation messages, defaults, module selection, and serialisation (JSON and transformers)."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import AutoConfig, LlamaConfig
from transformers.quantizers.auto import AutoQuantizationConfig

import llmslim  # noqa: F401 - registers quant_method "llmslim" with transformers
from llmslim.config import BLOCK_SIZES, SlimConfig

THRESHOLD = "int8_threshold must be a finite number >= 0 (default 1.5; 6.0 is the LLM.int8 paper's),"
SHARE = "share_layers must be 'all', a group size k >= 2, or groups of layer indices such as [[0, 1], [2, 3]],"
CHECKPOINTING = "checkpointing must be one of ['none', 'all', 'sqrt'] or a number of segments >= 1,"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"weights": "int4", "double_quant": True}, "double_quant applies to nf4/fp4 absmax blocks, not to weights='int4': leave it None"),
        ({"refine": "yes"}, "refine must be True or False, got 'yes'"),
        ({"weights": "int3"}, "weights must be one of [None, 'int8', 'nf4', 'fp4', 'int4'], got 'int3'"),
        ({"weights": "NF4"}, "weights must be one of [None, 'int8', 'nf4', 'fp4', 'int4'], got 'NF4'"),
        ({"block_size": 48}, f"block_size must be one of {list(BLOCK_SIZES)}, got 48"),
        ({"block_size": True}, f"block_size must be one of {list(BLOCK_SIZES)}, got True"),
        ({"block_size": 64.0}, f"block_size must be one of {list(BLOCK_SIZES)}, got 64.0"),
        ({"compute_dtype": "float64"}, "compute_dtype must be one of [None, 'float32', 'bfloat16', 'float16'], got 'float64'"),
        ({"compute_dtype": torch.int8}, "compute_dtype must be one of [None, 'float32', 'bfloat16', 'float16'], got 'int8'"),
        ({"int8_threshold": -1}, f"{THRESHOLD} got -1"),
        ({"int8_threshold": True}, f"{THRESHOLD} got True"),
        ({"int8_threshold": "6"}, f"{THRESHOLD} got '6'"),
        ({"int8_threshold": float("nan")}, f"{THRESHOLD} got nan"),
        ({"int8_threshold": float("inf")}, f"{THRESHOLD} got inf"),
        ({"int8_threshold": -float("inf")}, f"{THRESHOLD} got -inf"),
        ({"int8_threshold": 10**400}, f"{THRESHOLD} got {10**400}"),  # JSON allows it; float() would overflow
        ({"weights": "int4", "bits_per_param": float("nan")}, "bits_per_param must be a number of bits such as 5.0, got nan"),
        ({"weights": "int4", "bits_per_param": float("inf")}, "bits_per_param must be a number of bits such as 5.0, got inf"),
        ({"weights": "int4", "bits_per_param": True}, "bits_per_param must be a number of bits such as 5.0, got True"),
        ({"embedding_energy": float("nan")}, "embedding_energy must be a share in (0, 1) such as 0.9, got nan"),
        ({"embedding_energy": True}, "embedding_energy must be a share in (0, 1) such as 0.9, got True"),
        ({"embedding_rank": True}, "embedding_rank must be a positive integer such as 256 (below min(vocab, hidden)), got True"),
        ({"embedding_rank": 256.0}, "embedding_rank must be a positive integer such as 256 (below min(vocab, hidden)), got 256.0"),
        ({"embedding_rank": 8, "embedding_corpus": 5}, "embedding_corpus must be the path of a UTF-8 text file, got 5"),
        ({"embedding_rank": 8, "embedding_corpus": ["a.txt"]}, "embedding_corpus must be the path of a UTF-8 text file, got ['a.txt']"),
        ({"share_layers": True}, f"{SHARE} got True"),
        ({"share_layers": [[0, -1]]}, f"{SHARE} got [[0, -1]]"),
        ({"share_init": True}, "share_init must be 'mean' or the index of a group member (0 is the first), got True"),
        ({"share_init": -1}, "share_init must be 'mean' or the index of a group member (0 is the first), got -1"),
        ({"checkpointing": True}, f"{CHECKPOINTING} got True"),
        ({"checkpointing": 2.0}, f"{CHECKPOINTING} got 2.0"),
        ({"allow_nonfinite": "yes"}, "allow_nonfinite must be True or False, got 'yes'"),
        ({"allow_nonfinite": 1}, "allow_nonfinite must be True or False, got 1"),
        ({"version": True}, "version must be 1 (this llmslim's config schema), got True"),
        ({"version": 1.0}, "version must be 1 (this llmslim's config schema), got 1.0"),
        ({"double_quant": "yes"}, "double_quant must be True, False or None, got 'yes'"),
        ({"double_quant": 1}, "double_quant must be True, False or None, got 1"),
        ({"include": [""]}, "include must be a list of module-name patterns such as ['q_proj', 'layers.*.mlp.*'], got ['']"),
        ({"include": [3]}, "include must be a list of module-name patterns such as ['q_proj', 'layers.*.mlp.*'], got [3]"),
        ({"exclude": {"lm_head"}}, "exclude must be a list of module-name patterns such as ['q_proj', 'layers.*.mlp.*'], got {'lm_head'}"),
        (
            {"weights": "int8", "bits_per_param": 5.0},
            "bits_per_param mixes 4-bit and int8 layers: use weights in ['nf4', 'fp4', 'int4'], got weights='int8'",
        ),
        ({"weights": "int4", "bits_per_param": 4.0}, "bits_per_param must be above 4 (4-bit) and at most 9 (all int8), got 4.0"),
        ({"weights": "int4", "bits_per_param": "5"}, "bits_per_param must be a number of bits such as 5.0, got '5'"),
        (
            {"weights": "int8", "int8_layers": ["a"]},
            "int8_layers keeps some layers of a 4-bit model in int8 (weights in ['nf4', 'fp4', 'int4']), got weights='int8'",
        ),
        (
            {"weights": "int4", "int8_layers": "a"},
            "int8_layers must be a list of module names such as ['model.layers.0.mlp.down_proj'], got 'a'",
        ),
        ({"checkpointing": "half"}, f"{CHECKPOINTING} got 'half'"),
        ({"checkpointing": 0}, f"{CHECKPOINTING} got 0"),
        ({"version": 2}, "version must be 1 (this llmslim's config schema), got 2"),
        ({"quant_method": "bitsandbytes"}, "quant_method must be 'llmslim', got 'bitsandbytes'"),
    ],
    ids=lambda v: repr(v) if isinstance(v, dict) else "",
)
def test_bad_values_raise_naming_field_and_value(kwargs, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        SlimConfig(**kwargs)


@pytest.mark.parametrize("weights, double_quant", [("nf4", True), ("fp4", True), ("int8", False), (None, False)])
def test_defaults(weights, double_quant):
    cfg = SlimConfig(weights=weights)
    assert cfg.double_quant is double_quant
    assert cfg.is_4bit is (weights in ("nf4", "fp4"))
    assert cfg.exclude == ["lm_head"] and cfg.include is None
    assert (cfg.block_size, cfg.int8_threshold, cfg.compute_dtype, cfg.version, cfg.quant_method) == (64, 1.5, None, 1, "llmslim")
    assert cfg.torch_compute_dtype is None


def test_default_weights_are_nf4():
    assert SlimConfig().weights == "nf4"


def test_explicit_double_quant_is_kept():
    assert SlimConfig(weights="nf4", double_quant=False).double_quant is False


def test_normalised_values():
    cfg = SlimConfig(compute_dtype=torch.bfloat16, int8_threshold=0, include="q_proj", exclude=None)
    assert cfg.compute_dtype == "bfloat16" and cfg.torch_compute_dtype == torch.bfloat16
    assert cfg.int8_threshold == 0.0 and isinstance(cfg.int8_threshold, float)
    assert cfg.include == ["q_proj"] and cfg.exclude == []
    assert SlimConfig(include=("q_proj", "v_proj")).include == ["q_proj", "v_proj"]


def test_default_exclude_is_not_shared():
    a, b = SlimConfig(), SlimConfig()
    a.exclude.append("q_proj")
    assert b.exclude == ["lm_head"]


@pytest.mark.parametrize(
    "include, exclude, name, selected",
    [
        (None, ["lm_head"], "model.layers.0.self_attn.q_proj", True),
        (None, ["lm_head"], "lm_head", False),
        (None, ["lm_head"], "model.lm_head", False),  # suffix after a dot
        (["q_proj"], [], "model.layers.0.self_attn.q_proj", True),
        (["q_proj"], [], "model.layers.0.self_attn.xq_proj", False),  # a suffix starts after a dot
        (["q_proj"], [], "model.layers.0.self_attn.q_proj.lora", False),
        (["Q_PROJ"], [], "model.layers.0.self_attn.q_proj", False),  # case-sensitive
        (["self_attn.q_proj"], [], "model.layers.0.self_attn.q_proj", True),
        (["layers.*.mlp.*"], [], "model.layers.3.mlp.up_proj", True),
        (["layers.*.mlp.*"], [], "model.layers.3.self_attn.o_proj", False),
        (["model.layers.1*"], [], "model.layers.12.mlp.up_proj", True),  # '*' also crosses dots
        (["layers.[01].*"], [], "model.layers.1.mlp.up_proj", True),
        (["layers.[01].*"], [], "model.layers.2.mlp.up_proj", False),
        (["*_proj"], ["down_proj"], "model.layers.0.mlp.down_proj", False),  # exclude wins
        (["*_proj"], ["down_proj"], "model.layers.0.mlp.up_proj", True),
    ],
)
def test_selects(include, exclude, name, selected):
    assert SlimConfig(include=include, exclude=exclude).selects(name) is selected


@pytest.mark.parametrize(
    "cfg",
    [
        SlimConfig(),
        SlimConfig(weights="int8", int8_threshold=0.0, compute_dtype="float16"),
        SlimConfig(weights="fp4", block_size=4096, double_quant=False, include=["q_proj", "layers.*.mlp.*"], exclude=[]),
        SlimConfig(weights=None),
        SlimConfig(weights="int4", bits_per_param=5.0, int8_layers=["model.layers.1.mlp.down_proj"]),
        SlimConfig(weights="int8", allow_nonfinite=True),
        SlimConfig(weights="nf4", decode_head="float"),
        SlimConfig(weights="nf4", method="gptq", damp=0.05, act_order=False, balance=False),
    ],
    ids=repr,
)
def test_json_round_trip(cfg):
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["quant_method"] == "llmslim" and data["version"] == 1
    back = SlimConfig.from_dict(data)
    assert back == cfg and back.to_dict() == cfg.to_dict()
    assert SlimConfig.from_dict(json.loads(cfg.to_json_string())) == cfg


def test_repr_names_every_field():
    assert repr(SlimConfig(weights="int8")) == (
        "SlimConfig(version=1, weights='int8', compute_dtype=None, block_size=64, double_quant=False, "
        "int8_threshold=1.5, refine=False, method='rtn', damp=0.25, act_order=True, balance=True, "
        "bits_per_param=None, int8_layers=None, decode_head='int8', include=None, exclude=['lm_head'], "
        "embedding_rank=None, embedding_energy=None, embedding_corpus=None, embedding_weights=None, untie_embeddings=False, "
        "share_layers=None, share_init='mean', share_norms=False, checkpointing='none', allow_nonfinite=False)"
    )


def test_round_trip_through_a_transformers_config(tmp_path):
    cfg = SlimConfig(weights="fp4", block_size=128, compute_dtype="bfloat16", include=["q_proj"])
    model_config = LlamaConfig(
        hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, vocab_size=64
    )
    model_config.quantization_config = cfg
    model_config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved == cfg.to_dict()
    reloaded = AutoConfig.from_pretrained(tmp_path).quantization_config
    back = AutoQuantizationConfig.from_dict(reloaded)  # transformers finds SlimConfig by quant_method
    assert type(back) is SlimConfig
    assert back.to_dict() == cfg.to_dict() and back == cfg


def test_transformers_config_built_with_quantization_config_kwarg(tmp_path):
    cfg = SlimConfig(weights="int8")
    LlamaConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, vocab_size=64, quantization_config=cfg).save_pretrained(tmp_path)
    reloaded = AutoConfig.from_pretrained(tmp_path)
    assert AutoQuantizationConfig.from_dict(reloaded.quantization_config).to_dict() == cfg.to_dict()


@pytest.mark.parametrize(
    "data, message",
    [
        (
            {"weights": "nf4", "block_sise": 64},
            r"unknown SlimConfig field\(s\) \['block_sise'\]: valid fields are \[.*'block_size'.*upgrade llmslim",
        ),
        (["nf4"], r"a SlimConfig dict must be a JSON object of its fields, got \['nf4'\]"),
    ],
)
def test_from_dict_refuses_unknown_fields_and_non_objects(data, message):
    with pytest.raises(ValueError, match=message):
        SlimConfig.from_dict(data)


def test_allow_nonfinite_round_trips_through_config_json(tmp_path):
    cfg = SlimConfig(weights="int4", allow_nonfinite=True)
    LlamaConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, vocab_size=64, quantization_config=cfg).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["allow_nonfinite"] is True
    assert AutoQuantizationConfig.from_dict(AutoConfig.from_pretrained(tmp_path).quantization_config) == cfg
    assert SlimConfig.from_dict({k: v for k, v in saved.items() if k != "allow_nonfinite"}).allow_nonfinite is False  # older configs
