"""A tiny random Llama with the embedded model's real tokenizer (the trainers and the example script need one)."""

from __future__ import annotations

import pytest
from conftest import write_chat_llama


@pytest.fixture(scope="session")
def base(tmp_path_factory):
    """A 2-layer random Llama (hidden 64, tied head) saved in bf16 with SmolLM2's tokenizer (read-only)."""
    return write_chat_llama(tmp_path_factory.mktemp("hf") / "base", tie_word_embeddings=True)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """transformers' and TRL's trainers set accelerate's process-wide state (TRL: bf16 on this CPU); later tests
    build their own `Accelerator`, which refuses a state set with other options."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
