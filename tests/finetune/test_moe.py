"""LoRA fine-tuning on a quantized mixture-of-experts base (tiny Qwen3-MoE): adapters on the attention
projections train while every expert stays quantized."""

from __future__ import annotations

import json

import torch
import transformers
from train.tiny import VOCAB, char_tokenizer, train_config, write_text
from transformers import AutoModelForCausalLM

from llmslim.finetune.config import FinetuneConfig
from llmslim.finetune.run import finetune
from llmslim.quant.experts import quantized_experts


def write_moe(folder):
    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


def test_lora_on_attention_of_a_quantized_moe_base(tmp_path):
    base = write_moe(tmp_path / "moe")
    text = write_text(tmp_path)
    config = FinetuneConfig(
        out=tmp_path / "adapter",
        base=str(base),
        train=text,
        block_size=32,
        eval_tokens=256,
        targets=["q_proj", "k_proj", "v_proj", "o_proj"],
    )
    result = finetune(config, train_config(steps=12, batch_size=4, lr=2e-2), progress=False)
    assert result.metrics["eval_perplexity"] < result.metrics["eval_perplexity_before"]
    stores = dict(quantized_experts(result.model))
    assert len(stores) == 4 and all(s.fmt == "nf4" for s in stores.values())  # gate_up and down of both layers
    adapted = json.loads((config.out / "adapter_config.json").read_text())["target_modules"]
    assert sorted(adapted) == sorted(f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
