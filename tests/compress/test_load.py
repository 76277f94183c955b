"""Compression at load time through both doors, combined with quantization; save and reload; healing."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from train.tiny import write_causal, write_text
from transformers import AutoModelForCausalLM

import llmslim
from llmslim import SlimConfig
from llmslim.cli import build_parser, compress
from llmslim.cli._args import parse_share_layers

IDS = torch.tensor([[1, 5, 9, 2, 7, 3, 0, 4]])
CONFIGS = {
    "factorized": SlimConfig(weights=None, embedding_rank=8),
    "shared": SlimConfig(weights=None, share_layers=2, share_init=1),
    "energy+untie+int8-table": SlimConfig(weights=None, embedding_energy=0.8, untie_embeddings=True, embedding_weights="int8"),
    "nf4+factorized+shared": SlimConfig(weights="nf4", embedding_rank=8, share_layers="all"),
}


@pytest.fixture(scope="module")
def tied_path(tmp_path_factory):
    return write_causal(tmp_path_factory.mktemp("tied") / "llama")


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("name", list(CONFIGS))
def test_both_doors_and_save_reload(tied_path, tmp_path, name):
    config = CONFIGS[name]
    ours = llmslim.from_pretrained(tied_path, config, progress=False)
    theirs = AutoModelForCausalLM.from_pretrained(tied_path, quantization_config=config)
    if config.weights is None:  # with quantization, transformers' door averages already-quantized blocks
        torch.testing.assert_close(logits(ours), logits(theirs))
    recorded = ours.config.quantization_config
    assert recorded.embedding_rank is not None or not config.factorizes_embedding
    llmslim.save_pretrained(ours, tmp_path / "saved")
    for reloaded in (llmslim.from_pretrained(tmp_path / "saved", progress=False), AutoModelForCausalLM.from_pretrained(tmp_path / "saved")):
        torch.testing.assert_close(logits(reloaded), logits(ours), atol=0, rtol=0)


def test_shared_tensors_are_stored_once(tied_path, tmp_path):
    model = llmslim.from_pretrained(tied_path, SlimConfig(weights="int8", share_layers=2), progress=False)
    llmslim.save_pretrained(model, tmp_path / "saved")
    with safe_open(str(tmp_path / "saved" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.mlp.up_proj.weight" in keys and "model.layers.0.mlp.up_proj.SCB" in keys
    assert not any(k.startswith("model.layers.1.mlp") or k.startswith("model.layers.3.self_attn") for k in keys)
    assert "model.layers.1.input_layernorm.weight" in keys  # per-layer norms are kept
    reloaded = llmslim.from_pretrained(tmp_path / "saved", progress=False)
    assert reloaded.model.layers[0].mlp.up_proj is reloaded.model.layers[1].mlp.up_proj


def test_load_time_mean_equals_in_memory(tied_path):
    from llmslim.compress import compress_

    loaded = llmslim.from_pretrained(tied_path, SlimConfig(weights=None, share_layers=2, embedding_rank=8), progress=False)
    model = AutoModelForCausalLM.from_pretrained(tied_path, dtype=torch.float32)
    compress_(model, SlimConfig(weights=None, share_layers=2, embedding_rank=8))
    torch.testing.assert_close(logits(loaded), logits(model.eval()), atol=1e-5, rtol=1e-5)


def test_compress_cli_heals_and_saves(tied_path, tmp_path, capsys):
    text = write_text(tmp_path)
    args = build_parser().parse_args(
        ["compress", str(tied_path), "--embedding-rank", "8", "--share-layers", "2", "--heal-steps", "12", "--train", str(text)]
        + ["--out", str(tmp_path / "out"), "--seq-len", "16", "--eval-tokens", "64", "--batch-size", "4", "--lr", "3e-3"]
        + ["--optimizer", "adamw", "--mixed-precision", "no", "--no-progress", "--weights", "int8", "--embedding-corpus", str(text)]
    )
    assert compress.run(args) == 0
    out = capsys.readouterr().out
    before, after = (float(x) for x in out.split("eval perplexity: ")[1].replace(" before healing,", "").split()[:2])
    assert after < before
    a, b = llmslim.from_pretrained(tmp_path / "out", progress=False), AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(logits(a), logits(b), atol=0, rtol=0)
    assert a.config.quantization_config.weights == "int8"


def test_parse_share_layers():
    assert parse_share_layers("all") == "all" and parse_share_layers("3") == 3
    assert parse_share_layers("0-1,4:6") == [[0, 1], [4, 6]]
    with pytest.raises(ValueError, match=r"--share-layers must be 'all', a group size"):
        parse_share_layers("a-b")


def test_distill_into_a_compressed_student(tied_path, tmp_path):
    from train.tiny import train_config

    from llmslim.distill import DistillConfig, distill

    text = write_text(tmp_path)
    config = DistillConfig(
        out=tmp_path / "student",
        teacher=tied_path,
        student_layers=4,
        student_embedding_rank=8,
        student_share_layers=2,
        train=text,
        block_size=16,
        eval_tokens=64,
    )
    result = distill(config, train_config(steps=2, batch_size=4), progress=False)
    reloaded = llmslim.from_pretrained(result.out, progress=False)
    assert reloaded.model.layers[0].mlp.up_proj is reloaded.model.layers[1].mlp.up_proj
    torch.testing.assert_close(logits(reloaded), logits(result.student.eval()), atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def bert_path(tmp_path_factory):
    from train.tiny import write_bert

    return write_bert(tmp_path_factory.mktemp("bert") / "bert", head=False)


def hidden(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS + 5).last_hidden_state


def test_encoder_compresses_at_load_and_reloads(bert_path, tmp_path):
    from transformers import AutoModel

    from llmslim.compress import FactorizedEmbedding, compress_

    config = SlimConfig(weights="int8", embedding_rank=8)
    loaded = llmslim.from_pretrained(bert_path, config, progress=False)
    assert type(loaded).__name__ == "BertModel" and isinstance(loaded.get_input_embeddings(), FactorizedEmbedding)
    in_memory = AutoModel.from_pretrained(bert_path, dtype=torch.float32)
    compress_(in_memory, SlimConfig(weights=None, embedding_rank=8))
    float_loaded = llmslim.from_pretrained(bert_path, SlimConfig(weights=None, embedding_rank=8), progress=False)
    torch.testing.assert_close(hidden(float_loaded), hidden(in_memory.eval()), atol=1e-5, rtol=1e-5)
    llmslim.save_pretrained(loaded, tmp_path / "saved")
    torch.testing.assert_close(hidden(llmslim.from_pretrained(tmp_path / "saved", progress=False)), hidden(loaded), atol=0, rtol=0)


def test_encoder_heals_on_hidden_state_cosine(bert_path, tmp_path):
    from train.tiny import train_config

    from llmslim.distill.heal import HealConfig, compress_model

    text = write_text(tmp_path)
    config = HealConfig(
        out=tmp_path / "out",
        model=bert_path,
        compression=SlimConfig(weights=None, embedding_rank=4),
        heal_steps=15,
        train=text,
        block_size=16,
        eval_tokens=64,
    )
    result = compress_model(config, train_config(batch_size=4, lr=1e-2), progress=False)
    assert result.metrics_after["eval_cosine"] > result.metrics_before["eval_cosine"]
    assert {"cos"} <= set(result.history[0]) and "kd" not in result.history[0]
    with pytest.raises(ValueError, match="quantizes causal LMs only"):
        compress_model(HealConfig(out=tmp_path / "o2", model=bert_path, compression=config.compression, teacher_weights="nf4"))


def test_heal_quantized_trains_through_the_quantized_layers(tied_path, tmp_path):
    from train.tiny import train_config

    from llmslim.distill.heal import HealConfig, compress_model
    from llmslim.quant.modules import SlimLinear

    text = write_text(tmp_path)
    compression = SlimConfig(weights="nf4", embedding_rank=8, untie_embeddings=True)
    config = HealConfig(out=tmp_path / "out", model=tied_path, compression=compression, heal_steps=12, train=text, block_size=16)
    config.eval_tokens, config.save_dtype, config.heal_quantized = 64, "bfloat16", True  # bf16: absmax must stay float32
    result = compress_model(config, train_config(batch_size=4, lr=3e-3), progress=False)
    assert result.metrics_after["eval_perplexity"] < result.metrics_before["eval_perplexity"]
    assert isinstance(result.model.model.layers[0].mlp.up_proj, SlimLinear)
    reloaded = llmslim.from_pretrained(tmp_path / "out", progress=False)
    torch.testing.assert_close(logits(reloaded), logits(result.model), atol=0, rtol=0)
    with pytest.raises(ValueError, match="heal_quantized needs a format"):
        HealConfig(out=tmp_path / "o2", compression=SlimConfig(weights=None, embedding_rank=8), heal_quantized=True)
