"""Both doors (llmslim.from_pretrained and transformers' from_pretrained) on tiny models of five architectures."""

from __future__ import annotations

import json
import logging
import pickle
import shutil

import pytest
import torch
from conftest import ARCHS, write_tiny_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import llmslim
from llmslim import SlimConfig
from llmslim.quant import kernels, registry
from llmslim.quant.modules import SlimLinear

FORMATS = tuple(registry.FORMATS)
# Max |logit error| relative to max |logit| of the float model, per format (random tiny models).
TOLERANCE = {"int8": 0.03, "nf4": 0.25, "fp4": 0.35, "int4": 0.25}


def _logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids).logits.float()


def _slim_layers(model):
    return {name: type(m) for name, m in model.named_modules() if isinstance(m, SlimLinear)}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("weights", FORMATS)
def test_both_doors_agree_and_stay_close_to_float(tiny_models, arch, weights, input_ids):
    path = tiny_models[arch]
    reference = _logits(AutoModelForCausalLM.from_pretrained(path), input_ids)

    ours = llmslim.from_pretrained(path, SlimConfig(weights=weights), progress=False)
    theirs = AutoModelForCausalLM.from_pretrained(path, quantization_config=SlimConfig(weights=weights))

    expected_type = registry.FORMATS[weights].module_class()
    layers = _slim_layers(ours)
    assert layers and set(layers.values()) == {expected_type}
    assert layers == _slim_layers(theirs)
    assert not any("lm_head" in name for name in layers)
    assert torch.equal(_logits(ours, input_ids), _logits(theirs, input_ids))
    error = (_logits(ours, input_ids) - reference).abs().max() / reference.abs().max()
    assert error < TOLERANCE[weights]


@pytest.mark.parametrize("weights", FORMATS)
@pytest.mark.parametrize("arch", ("llama", "gpt2"))
def test_save_and_reload_is_bit_identical_without_requantizing(tiny_models, tmp_path, arch, weights, input_ids, monkeypatch):
    model = llmslim.from_pretrained(tiny_models[arch], SlimConfig(weights=weights), progress=False)
    expected = _logits(model, input_ids)
    llmslim.save_pretrained(model, tmp_path / "q")

    saved = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert saved["quant_method"] == "llmslim" and saved["weights"] == weights

    def no_quantization(*args, **kwargs):
        raise AssertionError("a saved checkpoint must not be quantized again")

    monkeypatch.setattr(SlimLinear, "quantize", no_quantization)
    for reloaded in (
        AutoModelForCausalLM.from_pretrained(tmp_path / "q"),
        llmslim.from_pretrained(tmp_path / "q", progress=False),
    ):
        assert _slim_layers(reloaded) == _slim_layers(model)
        assert torch.equal(_logits(reloaded, input_ids), expected)


def test_reload_state_dict_matches_saved_tensors(tiny_llama, tmp_path):
    model = llmslim.from_pretrained(tiny_llama, SlimConfig(weights="nf4"), progress=False)
    llmslim.save_pretrained(model, tmp_path / "q")
    on_disk = load_file(tmp_path / "q" / "model.safetensors")
    assert on_disk["model.layers.0.mlp.up_proj.weight"].dtype == torch.uint8
    assert on_disk["model.layers.0.mlp.up_proj.weight_absmax"].dtype == torch.uint8  # double quantized
    reloaded = llmslim.from_pretrained(tmp_path / "q", progress=False).state_dict()
    for key, tensor in on_disk.items():
        assert torch.equal(reloaded[key], tensor), key


def test_sharded_checkpoint_streams_every_shard(tmp_path, input_ids):
    path = write_tiny_model(tmp_path / "sharded", "llama", max_shard_size="20KB")
    assert len(list(path.glob("*.safetensors"))) > 1
    whole = llmslim.from_pretrained(write_tiny_model(tmp_path / "whole", "llama"), SlimConfig(weights="nf4"), progress=False)
    sharded = llmslim.from_pretrained(path, SlimConfig(weights="nf4"), progress=False)
    assert torch.equal(_logits(whole, input_ids), _logits(sharded, input_ids))


def test_include_exclude_and_unquantized_float_model(tiny_llama):
    model = llmslim.from_pretrained(tiny_llama, SlimConfig(weights="int8", include=["*mlp*"], exclude=["down_proj"]), progress=False)
    names = set(_slim_layers(model))
    assert names == {f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj")}
    plain = llmslim.from_pretrained(tiny_llama, SlimConfig(weights=None), progress=False)
    assert not _slim_layers(plain)


def test_tied_lm_head_stays_tied_and_float(tmp_path, input_ids):
    path = tmp_path / "tied"
    torch.manual_seed(0)
    from conftest import TINY_CONFIGS

    config = TINY_CONFIGS["llama"]()
    config.tie_word_embeddings = True
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    model = llmslim.from_pretrained(path, SlimConfig(weights="nf4", exclude=[]), progress=False)
    assert not isinstance(model.lm_head, SlimLinear)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_quantize_in_place_equals_streaming_load(tiny_llama, input_ids):
    float_model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    names = llmslim.quantize_(float_model, SlimConfig(weights="nf4"))
    streamed = llmslim.from_pretrained(tiny_llama, SlimConfig(weights="nf4"), progress=False)
    assert set(names) == set(_slim_layers(streamed))
    assert torch.equal(_logits(float_model, input_ids), _logits(streamed, input_ids))


def test_dtype_option_sets_float_layers(tiny_llama):
    model = llmslim.from_pretrained(tiny_llama, SlimConfig(weights="nf4"), dtype="float32", progress=False)
    assert model.model.embed_tokens.weight.dtype == torch.float32
    assert model.model.layers[0].self_attn.q_proj.compute_dtype == torch.float32


# --- bad input -------------------------------------------------------------------------------


def test_missing_path_is_named():
    with pytest.raises(FileNotFoundError, match="model path '/no/such/model' does not exist"):
        llmslim.from_pretrained("/no/such/model", SlimConfig())


def test_float_model_without_config_asks_for_one(tiny_llama):
    with pytest.raises(ValueError, match="holds a float model: pass a SlimConfig"):
        llmslim.from_pretrained(tiny_llama)


def test_bad_dtype_and_device_map(tiny_llama):
    with pytest.raises(ValueError, match="dtype must be a torch dtype name.*'float99'"):
        llmslim.from_pretrained(tiny_llama, SlimConfig(), dtype="float99")
    with pytest.raises(ValueError, match="device_map must be 'auto'.*'gpu7'"):
        llmslim.from_pretrained(tiny_llama, SlimConfig(), device_map="gpu7")


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_truncated_shard_names_the_file(tiny_llama, tmp_path):
    path = _copy(tiny_llama, tmp_path / "m")
    shard = path / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors: not a readable checkpoint shard.*truncated or corrupt"):
        llmslim.from_pretrained(path, SlimConfig(weights="nf4"), progress=False)


def test_corrupt_shard_header_names_the_file(tiny_llama, tmp_path):
    path = _copy(tiny_llama, tmp_path / "m")
    shard = path / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[8:40] = b"\x00" * 32  # garbage in the JSON header
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model\.safetensors: not a readable checkpoint shard"):
        llmslim.from_pretrained(path, SlimConfig(weights="nf4"), progress=False)


def test_checkpoint_whose_tensors_do_not_match_its_config(tiny_llama, tmp_path):
    model = llmslim.from_pretrained(tiny_llama, SlimConfig(weights="nf4"), progress=False)
    llmslim.save_pretrained(model, tmp_path / "q")
    config_file = tmp_path / "q" / "config.json"
    config = json.loads(config_file.read_text())
    config["quantization_config"].update(weights="int8", double_quant=False)  # the tensors are still nf4
    config_file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="the checkpoint's tensors do not match its quantization_config"):
        llmslim.from_pretrained(tmp_path / "q", progress=False)


def test_checkpoint_missing_quantized_tensors(tiny_llama, tmp_path):
    model = llmslim.from_pretrained(tiny_llama, SlimConfig(weights="nf4"), progress=False)
    llmslim.save_pretrained(model, tmp_path / "q")
    shard = tmp_path / "q" / "model.safetensors"
    tensors = load_file(shard)
    del tensors["model.layers.1.mlp.up_proj.weight_absmax"]
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"does not match its llmslim quantization config: no data for model\.layers\.1\.mlp\.up_proj"):
        llmslim.from_pretrained(tmp_path / "q", progress=False)


def test_requesting_another_format_for_a_quantized_checkpoint(tiny_llama, tmp_path):
    model = llmslim.from_pretrained(tiny_llama, SlimConfig(weights="nf4"), progress=False)
    llmslim.save_pretrained(model, tmp_path / "q")
    with pytest.raises(ValueError, match="already quantized with SlimConfig.*weights='nf4'"):
        llmslim.from_pretrained(tmp_path / "q", SlimConfig(weights="int8"), progress=False)


def test_pickled_bin_loads_only_plain_tensors(tiny_llama, tmp_path, input_ids):
    path = tmp_path / "bin"
    path.mkdir()
    shutil.copy(tiny_llama / "config.json", path)
    torch.save(load_file(tiny_llama / "model.safetensors"), path / "pytorch_model.bin")
    from_bin = llmslim.from_pretrained(path, SlimConfig(weights="nf4"), progress=False)
    from_st = llmslim.from_pretrained(tiny_llama, SlimConfig(weights="nf4"), progress=False)
    assert torch.equal(_logits(from_bin, input_ids), _logits(from_st, input_ids))

    class Exploit:
        def __reduce__(self):
            return (print, ("code ran while unpickling",))

    (path / "pytorch_model.bin").write_bytes(pickle.dumps({"x": Exploit()}))
    with pytest.raises(ValueError, match=r"pytorch_model\.bin: not a readable checkpoint shard"):
        llmslim.from_pretrained(path, SlimConfig(weights="nf4"), progress=False)


def test_unquantizable_module_is_skipped_with_reason(tiny_llama, caplog):
    with caplog.at_level(logging.INFO, logger="llmslim.quant.modules"):
        model = llmslim.from_pretrained(tiny_llama, SlimConfig(weights="nf4", include=["embed_tokens", "q_proj"]), progress=False)
    assert "not quantizing model.embed_tokens: Embedding layers are not quantized" in caplog.text
    assert set(_slim_layers(model)) == {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"}


def test_auto_device_map_places_everything_on_cpu(tiny_llama):
    model = llmslim.from_pretrained(tiny_llama, SlimConfig(weights="nf4"), device_map="auto", progress=False)
    assert {t.device.type for t in model.state_dict().values()} == {"cpu"}


def test_auto_device_map_that_needs_disk_asks_for_an_offload_dir(tiny_llama):
    with pytest.raises(ValueError, match="does not fit in max_memory.*go to disk, so pass offload_dir="):
        llmslim.from_pretrained(tiny_llama, SlimConfig(weights="nf4"), device_map="auto", max_memory={"cpu": 1000}, progress=False)


@pytest.mark.parametrize("weights", ["int8", "nf4"])
def test_what_does_not_fit_is_offloaded_to_disk_quantized(tiny_llama, tmp_path, weights, input_ids, monkeypatch):
    in_memory = llmslim.from_pretrained(tiny_llama, SlimConfig(weights=weights), progress=False)
    offloaded = llmslim.from_pretrained(
        tiny_llama,
        SlimConfig(weights=weights),
        device_map="auto",
        max_memory={"cpu": 12_000},
        offload_dir=tmp_path / "offload",
        progress=False,
    )
    (index_file,) = (tmp_path / "offload").glob("llmslim-offload-*/index.json")  # a subfolder of this load's own
    index = json.loads(index_file.read_text())
    quantized_on_disk = [k for k, v in index.items() if v["dtype"] in ("uint8", "int8")]
    assert quantized_on_disk, "the offloaded layers must be stored quantized"
    # resident NF4 layers would switch to bitsandbytes' CPU kernel, hooked ones keep llmslim's: compare on llmslim's
    monkeypatch.setattr(kernels, "cpu_packable", lambda *args: False)
    assert torch.equal(_logits(offloaded, input_ids), _logits(in_memory, input_ids))
