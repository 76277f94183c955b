"""A tiny random Llama with the embedded model's real tokenizer (the trainers and the example script need one)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from llmslim import models


@pytest.fixture(scope="session")
def base(tmp_path_factory):
    """A 2-layer random Llama (hidden 64) saved in bf16 with SmolLM2's tokenizer (read-only)."""
    folder = tmp_path_factory.mktemp("hf") / "base"
    tokenizer = AutoTokenizer.from_pretrained(models.resolve(None))
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """transformers' and TRL's trainers set accelerate's process-wide state (TRL: bf16 on this CPU); later tests
    build their own `Accelerator`, which refuses a state set with other options."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
