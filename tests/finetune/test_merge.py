"""Merging an adapter into a quantized base: dequantize, add B @ A * scaling, quantize, save, reload."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from train.tiny import write_causal

import llmslim
from llmslim.finetune.lora import load_adapter, register_slim_layers, resolve_targets
from llmslim.finetune.merge import merge, weight_error_bound
from llmslim.quant.modules import SlimLinear

SCALE = 0.05  # LoRA B scaled so that B @ A is a few % of the weight, as after training
IDS = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(3))


def quantized(base, weights: str):
    return llmslim.from_pretrained(base, llmslim.SlimConfig(weights=weights), progress=False)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_causal(tmp_path_factory.mktemp("base") / "model", layers=2)


def write_adapter(base, folder, weights: str):
    """A random (not zero-initialised) LoRA on every linear layer of the quantized base, saved by peft."""
    torch.manual_seed(0)
    model = quantized(base, weights)
    lora = LoraConfig(r=4, lora_alpha=16, target_modules=resolve_targets(model, None, ["lm_head"]), init_lora_weights=False)
    model = get_peft_model(model, register_slim_layers(lora))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(SCALE)  # a trained adapter's update is small next to the weight
    model.save_pretrained(folder)
    return folder


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


@pytest.mark.parametrize("weights", ["nf4", "int8"])
def test_merged_model_matches_base_plus_adapter_within_the_quantization_error(tmp_path, base, weights):
    adapter = write_adapter(base, tmp_path / "adapter", weights)
    with_adapter = load_adapter(quantized(base, weights), adapter)
    exact = {
        name: m.get_base_layer().dequantized_weight(torch.float32) + m.get_delta_weight("default").float()
        for name, m in with_adapter.base_model.model.named_modules()
        if hasattr(m, "lora_A")
    }  # (out, in) each
    expected = logits(with_adapter)
    result = merge(base, adapter, tmp_path / "merged", weights=weights)
    merged = llmslim.from_pretrained(result.out, progress=False)
    layers = {name: module for name, module in merged.named_modules() if isinstance(module, SlimLinear)}
    assert sorted(layers) == sorted(exact) == sorted(result.merged_layers)
    for name, layer in layers.items():  # each weight within half a code step of the exact sum
        error = (layer.dequantized_weight(torch.float32) - exact[name]).abs()
        assert (error <= weight_error_bound(layer) + 1e-6).all(), name
    # logits: with an update of a few % of the weight, the blocks' absmax (so the bound above) barely
    # changes, so re-quantizing moves the logits about as much as quantizing the float base once did
    # (x2 slack); and much less than dropping the adapter would
    float_base = llmslim.from_pretrained(base, llmslim.SlimConfig(weights=None), progress=False)
    quantization_error = (logits(quantized(base, weights)) - logits(float_base)).abs().max()
    merge_error = (logits(merged) - expected).abs().max()
    assert merge_error <= 2 * quantization_error
    assert merge_error < 0.5 * (logits(quantized(base, weights)) - expected).abs().max()


def test_merge_refuses_an_existing_folder_and_an_adapter_that_does_not_fit(tmp_path, base):
    adapter = write_adapter(base, tmp_path / "adapter", "nf4")
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="already exists: choose another output folder or pass --overwrite"):
        merge(base, adapter, tmp_path / "out")
    other = tmp_path / "other"
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM, LlamaConfig

    AutoModelForCausalLM.from_config(
        LlamaConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    ).save_pretrained(other)
    with pytest.raises(
        ValueError,
        match=r"does not fit the base model: \S+lora_\w\.weight has shape \[\d+, \d+\], "
        r"but model\.layers\.0\.\S+ has 48 (inputs|outputs); use the base it was trained on",
    ):
        merge(other, adapter, tmp_path / "merged")


def test_merge_command(tmp_path, base, capsys):
    from llmslim.cli import build_parser
    from llmslim.cli import merge as merge_verb

    adapter = write_adapter(base, tmp_path / "adapter", "nf4")
    args = build_parser().parse_args(["merge", str(base), str(adapter), str(tmp_path / "m")])
    assert merge_verb.run(args) == 0
    assert "merged 14 nf4 layers" in capsys.readouterr().out
    assert (tmp_path / "m" / "config.json").is_file()


@pytest.mark.parametrize(
    ("out", "problem"),
    [
        ("adapter", r"is the adapter folder \(\S+/adapter\): writing there would replace it"),
        (".", r"contains the (base model|adapter) folder \S+: replacing \S+ would delete it"),
        ("base", r"is the base model folder \(\S+\): writing there would replace it"),
    ],
)
def test_merge_never_writes_over_its_inputs(tmp_path, base, out, problem):
    import shutil

    adapter = write_adapter(base, tmp_path / "adapter", "nf4")
    own_base = shutil.copytree(base, tmp_path / "base")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=f"the output folder \\S+ {problem}; choose another output folder, apart from"):
        merge(own_base, adapter, tmp_path / out if out != "." else tmp_path, overwrite=True)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_merged_model_gets_the_base_tokenizer_when_the_adapter_has_none(tmp_path, base):
    adapter = write_adapter(base, tmp_path / "adapter", "nf4")  # peft's files only
    merge(base, adapter, tmp_path / "merged")
    assert (tmp_path / "merged" / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
