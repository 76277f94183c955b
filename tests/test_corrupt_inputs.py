"""Corrupt checkpoints fail loudly, in both doors, naming the file or tensor and the fix.

Each test copies a tiny checkpoint (float or llmslim nf4), damages one thing, and loads it through
`llmslim.from_pretrained` and through transformers' `AutoModelForCausalLM.from_pretrained` (our
`SlimHfQuantizer`). Nothing may load with a zero, random or truncated tensor in place of the damaged one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import write_tiny_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import llmslim
from llmslim import SlimConfig
from llmslim.offload.store import safetensors_index

LAYER = "model.layers.1.mlp.up_proj"  # (64, 32) in the tiny llama


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A float tiny llama, the same split into shards, and its llmslim nf4 checkpoint."""
    root = tmp_path_factory.mktemp("corrupt")
    float_path = write_tiny_model(root / "float", "llama")
    sharded = write_tiny_model(root / "sharded", "llama", max_shard_size="20KB")
    llmslim.save_pretrained(llmslim.from_pretrained(float_path, SlimConfig(weights="nf4"), progress=False), root / "nf4")
    return {"float": float_path, "sharded": sharded, "nf4": root / "nf4"}


def _copy(checkpoints, kind: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(checkpoints[kind], tmp_path / kind))


def _edit_tensors(path: Path, edit) -> None:
    shard = path / "model.safetensors"
    tensors = load_file(shard)
    edit(tensors)
    save_file(tensors, shard, metadata={"format": "pt"})


def _both_doors(path: Path, kind: str):
    """(door name, loader) pairs; a float checkpoint is quantized to nf4 on load."""
    config = None if kind == "nf4" else SlimConfig(weights="nf4")
    extra = {} if config is None else {"quantization_config": config}
    return [
        ("llmslim", lambda: llmslim.from_pretrained(path, config, progress=False)),
        ("transformers", lambda: AutoModelForCausalLM.from_pretrained(path, **extra)),
    ]


def _raises_in_both_doors(path: Path, kind: str, match: str, error=ValueError) -> None:
    for door, load in _both_doors(path, kind):
        with pytest.raises(error, match=match):
            load()
            pytest.fail(f"{door}'s door loaded a corrupt checkpoint")


# --- quantization state (llmslim checkpoints) ---------------------------------------------------


def test_missing_quantization_tensor(checkpoints, tmp_path):
    path = _copy(checkpoints, "nf4", tmp_path)
    _edit_tensors(path, lambda t: t.pop(f"{LAYER}.weight_nested_absmax"))
    _raises_in_both_doors(path, "nf4", rf"no data for {LAYER}\.weight_nested_absmax.*model\.safetensors")


def test_extra_quantization_tensor(checkpoints, tmp_path):
    path = _copy(checkpoints, "nf4", tmp_path)
    _edit_tensors(path, lambda t: t.update({f"{LAYER}.weight_scale": torch.ones(64, 1, dtype=torch.float16)}))
    _raises_in_both_doors(path, "nf4", rf"model\.safetensors: tensor {LAYER}\.weight_scale .*not part of the nf4 layer")


@pytest.mark.parametrize(
    ("name", "edit", "found"),
    [
        ("weight_nested_absmax", lambda t: t.half(), r"torch\.float16 \(1,\)"),
        ("weight_absmax", lambda t: t[:-1].clone(), r"torch\.uint8 \(31,\)"),
        ("weight", lambda t: t.view(torch.int8), r"torch\.int8 \(1024, 1\)"),
    ],
)
def test_quantization_tensor_with_wrong_dtype_or_shape(checkpoints, tmp_path, name, edit, found):
    path = _copy(checkpoints, "nf4", tmp_path)
    _edit_tensors(path, lambda t: t.update({f"{LAYER}.{name}": edit(t[f"{LAYER}.{name}"])}))
    _raises_in_both_doors(path, "nf4", rf"model\.safetensors: tensor {LAYER}\.{name} is {found} but .*expects")


# --- float checkpoints quantized on load -------------------------------------------------------


def test_linear_weight_of_the_wrong_shape(checkpoints, tmp_path):
    path = _copy(checkpoints, "float", tmp_path)
    _edit_tensors(path, lambda t: t.update({f"{LAYER}.weight": t[f"{LAYER}.weight"][:-1].clone()}))
    _raises_in_both_doors(path, "float", rf"model\.safetensors: tensor {LAYER}\.weight has shape \(63, 32\), the model expects \(64, 32\)")


def test_linear_weight_missing(checkpoints, tmp_path):
    path = _copy(checkpoints, "float", tmp_path)
    _edit_tensors(path, lambda t: t.pop(f"{LAYER}.weight"))
    _raises_in_both_doors(path, "float", rf"no data for {LAYER}\.weight")


def test_pickled_checkpoint_missing_a_linear_weight(checkpoints, tmp_path):
    path = tmp_path / "bin"
    path.mkdir()
    shutil.copy(checkpoints["float"] / "config.json", path)
    tensors = load_file(checkpoints["float"] / "model.safetensors")
    del tensors[f"{LAYER}.weight"]
    torch.save(tensors, path / "pytorch_model.bin")
    _raises_in_both_doors(path, "float", rf"no data for {LAYER}\.weight in pytorch_model\.bin")


def test_quantized_tensor_in_a_checkpoint_without_quantization_config(checkpoints, tmp_path):
    path = _copy(checkpoints, "float", tmp_path)
    _edit_tensors(path, lambda t: t.update({f"{LAYER}.weight": t[f"{LAYER}.weight"].view(torch.int16)}))
    _raises_in_both_doors(path, "float", rf"model\.safetensors: tensor {LAYER}\.weight is torch\.int16, not a float weight")


# --- files -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["float", "nf4"])
def test_truncated_shard(checkpoints, tmp_path, kind):
    path = _copy(checkpoints, kind, tmp_path)
    shard = path / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size - 100])  # header intact, data cut short
    _raises_in_both_doors(path, kind, r"model\.safetensors: not a readable .*truncated or corrupt.*re-download or re-save")


@pytest.mark.parametrize("content", [b"", b"not a safetensors file at all", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      "])
def test_shard_that_is_not_safetensors(checkpoints, tmp_path, content):
    path = _copy(checkpoints, "float", tmp_path)
    (path / "model.safetensors").write_bytes(content)
    _raises_in_both_doors(path, "float", r"model\.safetensors: not a readable .*truncated or corrupt")


def test_malformed_shard_index(checkpoints, tmp_path):
    path = _copy(checkpoints, "sharded", tmp_path)
    (path / "model.safetensors.index.json").write_text('{"weight_map": {')
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json is not valid JSON .*re-download or re-save"):
        llmslim.from_pretrained(path, SlimConfig(weights="nf4"), progress=False)
    with pytest.raises(Exception, match=r"model\.safetensors\.index\.json|Expecting"):  # transformers reads the index itself
        AutoModelForCausalLM.from_pretrained(path, quantization_config=SlimConfig(weights="nf4"))


@pytest.mark.parametrize(
    ("index", "match"),
    [
        ({"metadata": {}}, r"index\.json has no \"weight_map\""),
        (
            {"weight_map": {"model.norm.weight": "model-09-of-09.safetensors"}},
            r"lists shards \['model-09-of-09\.safetensors'\] that do not exist",
        ),
    ],
)
def test_shard_index_without_weight_map_or_with_a_missing_shard(checkpoints, tmp_path, index, match):
    path = _copy(checkpoints, "sharded", tmp_path)
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        llmslim.from_pretrained(path, SlimConfig(weights="nf4"), progress=False)


def test_malformed_config(checkpoints, tmp_path):
    path = _copy(checkpoints, "float", tmp_path)
    (path / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(ValueError, match=r"config\.json is not valid JSON .*re-download or re-save"):
        llmslim.from_pretrained(path, SlimConfig(weights="nf4"), progress=False)
    with pytest.raises(OSError, match=r"config\.json.* not a valid JSON"):  # transformers parses config.json before any quantizer runs
        AutoModelForCausalLM.from_pretrained(path, quantization_config=SlimConfig(weights="nf4"))


def test_missing_config(checkpoints, tmp_path):
    path = _copy(checkpoints, "float", tmp_path)
    (path / "config.json").unlink()
    with pytest.raises(ValueError, match=r"neither a Hugging Face model folder \(with config\.json\)"):
        llmslim.from_pretrained(path, SlimConfig(weights="nf4"), progress=False)
    with pytest.raises((OSError, ValueError), match=r"config\.json"):
        AutoModelForCausalLM.from_pretrained(path, quantization_config=SlimConfig(weights="nf4"))


def test_offload_reader_rejects_a_corrupt_header(checkpoints, tmp_path):
    shard = _copy(checkpoints, "nf4", tmp_path) / "model.safetensors"
    assert f"{LAYER}.weight" in safetensors_index(shard)
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"model\.safetensors: .*ends at byte \d+ but the file has \d+ bytes.*truncated or corrupt"):
        safetensors_index(shard)
    shard.write_bytes(b"\x04\x00\x00\x00\x00\x00\x00\x00{no}")
    with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors file .*truncated or corrupt"):
        safetensors_index(shard)
