"""Saving: atomic folders, refusing to overwrite, and the bitsandbytes export read by stock transformers."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

import llmslim
from llmslim import SlimConfig


@pytest.fixture
def nf4_model(tiny_llama):
    return llmslim.from_pretrained(tiny_llama, SlimConfig(weights="nf4"), progress=False)


def test_existing_output_is_refused_without_overwrite(nf4_model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists: choose another output folder or pass --overwrite"):
        llmslim.save_pretrained(nf4_model, out)
    assert (out / "keep.txt").read_text() == "mine"
    llmslim.save_pretrained(nf4_model, out, overwrite=True)
    assert (out / "config.json").exists() and not (out / "keep.txt").exists()


def test_failed_save_leaves_nothing_behind(nf4_model, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(type(nf4_model), "save_pretrained", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        llmslim.save_pretrained(nf4_model, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_unknown_format_is_refused(nf4_model, tmp_path):
    with pytest.raises(ValueError, match="format must be one of \\['llmslim', 'bnb'\\], got 'gguf'"):
        llmslim.save_pretrained(nf4_model, tmp_path / "out", format="gguf")


def test_bnb_export_of_unquantized_model_is_refused(tiny_llama, tmp_path):
    model = llmslim.from_pretrained(tiny_llama, SlimConfig(weights=None), progress=False)
    with pytest.raises(ValueError, match="no llmslim quantized layers"):
        llmslim.save_pretrained(model, tmp_path / "out", format="bnb")


_STOCK_LOAD = textwrap.dedent(
    """
    import sys, torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
    assert "llmslim" not in sys.modules, "the export must load without llmslim"
    layer = model.model.layers[0].self_attn.q_proj
    print(type(layer).__module__, type(layer).__name__)
    from transformers.integrations.bitsandbytes import dequantize_bnb_weight
    torch.save(dequantize_bnb_weight(layer.weight, getattr(layer, "state", None)), sys.argv[3] + ".weight")
    with torch.no_grad():
        torch.save(model(torch.load(sys.argv[2])).logits, sys.argv[3])
    """
)


@pytest.fixture(scope="module")
def llama_64(tmp_path_factory):
    """bitsandbytes' CPU 4-bit forward repacks weights per 64-element block: rows must be >= 64 long."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=96)
    path = tmp_path_factory.mktemp("llama64") / "m"
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(path)
    return path


@pytest.mark.parametrize("weights", ["nf4", "fp4", "int8"])
def test_bnb_export_loads_in_stock_transformers(llama_64, tmp_path, weights, input_ids):
    model = llmslim.from_pretrained(llama_64, SlimConfig(weights=weights), progress=False)
    with torch.no_grad():
        model(input_ids)  # NF4/FP4 layers now hold their codes in the CPU layout: the export must still write the stored one
    llmslim.save_pretrained(model, tmp_path / "bnb", format="bnb")
    torch.save(input_ids, tmp_path / "ids.pt")
    run = subprocess.run(
        [sys.executable, "-c", _STOCK_LOAD, str(tmp_path / "bnb"), str(tmp_path / "ids.pt"), str(tmp_path / "logits.pt")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    expected_class = "Linear8bitLt" if weights == "int8" else "Linear4bit"
    assert run.stdout.split()[-2:] == ["bitsandbytes.nn.modules", expected_class]
    # the same weights, bit for bit
    their_weight = torch.load(str(tmp_path / "logits.pt") + ".weight")
    our_weight = model.model.layers[0].self_attn.q_proj.dequantized_weight(their_weight.dtype)
    if weights == "int8":  # bitsandbytes multiplies by a rounded 1/127: last-bit differences
        torch.testing.assert_close(their_weight, our_weight, rtol=1e-6, atol=0)
    else:
        assert torch.equal(their_weight, our_weight)
    # and nearly the same logits: bitsandbytes' CPU kernels round differently (bf16 accumulation,
    # int8 activation quantization)
    theirs = torch.load(tmp_path / "logits.pt").float()
    with torch.no_grad():
        ours = model(input_ids).logits.float()
    assert (theirs - ours).abs().max() < 0.05 * ours.abs().max()
