"""Shared fixtures: tiny random causal LMs written from configs, the shipped texts, markers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, LlamaConfig, MistralConfig, OPTConfig, Qwen2Config

import llmslim  # noqa: F401 - registers the quantization method, as a user's import does
from llmslim.data import DATA_DIR as DATA  # noqa: F401 - the texts shipped with the package (= ../shared/data)
from llmslim.data import WIKITEXT2_TEST as WIKITEXT  # noqa: F401

_TINY = dict(vocab_size=96, max_position_embeddings=64)
TINY_CONFIGS = {
    "llama": lambda: LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, **_TINY
    ),
    "gpt2": lambda: GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=96),
    "opt": lambda: OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=32, **_TINY),
    "qwen2": lambda: Qwen2Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, **_TINY
    ),
    "mistral": lambda: MistralConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, **_TINY
    ),
}
ARCHS = tuple(TINY_CONFIGS)


def write_tiny_model(folder: Path, arch: str, dtype: torch.dtype = torch.bfloat16, seed: int = 0, **save_kwargs) -> Path:
    """A random-initialised model of architecture `arch`, saved as safetensors in `folder`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS[arch]()).to(dtype)
    model.save_pretrained(folder, **save_kwargs)
    return folder


def write_chat_llama(folder: Path, **config) -> Path:
    """A 2-layer random Llama (hidden 64) saved in bf16 with the embedded model's real tokenizer and chat template;
    `config` overrides LlamaConfig fields."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmslim import models

    tokenizer = AutoTokenizer.from_pretrained(models.resolve(None))
    fields = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    fields |= dict(vocab_size=len(tokenizer), max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**fields, eos_token_id=tokenizer.eos_token_id, **config))
    model.to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """One saved tiny model per architecture, shared by the whole session (read-only)."""
    root = tmp_path_factory.mktemp("tiny")
    return {arch: write_tiny_model(root / arch, arch) for arch in ARCHS}


@pytest.fixture
def tiny_llama(tiny_models) -> Path:
    return tiny_models["llama"]


@pytest.fixture
def input_ids() -> torch.Tensor:
    return torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture(autouse=True)
def cpu_unless_marked_gpu(request, monkeypatch):
    """Tests not marked `gpu` run on the CPU even where a GPU is visible.

    llmslim and transformers put a model on the GPU by default when there is one; the CPU tests
    feed CPU tensors and check CPU kernels, so on a GPU machine they hide it (also from the child
    processes some of them start). The `gpu` tests check the CUDA paths and the GPU default.
    """
    if "gpu" in request.keywords or not torch.cuda.is_available():
        return
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def assert_same_greedy_decode(eager: tuple, compiled: tuple, prompt_length: int, tolerance: float) -> None:
    """Two greedy decodes of one prompt, each `(sequences (1, T), logits (steps, 1, vocab))`, agree: the same tokens
    except where the eager logits tie within `tolerance`, and equal logits (within `tolerance`) up to and including
    the first different token.

    The tiny random models' logits are nearly flat, and compiled arithmetic (fusions; on CUDA a static cache) or int8
    activations round differently from eager, which flips near-ties: an exact comparison of two free-running decodes
    fails for no fault of either (seen on an H200: token 92 chosen five times eagerly, six times compiled).
    """
    eager_tokens, eager_logits = eager
    compiled_tokens, compiled_logits = compiled
    differ = (compiled_tokens[0, prompt_length:] != eager_tokens[0, prompt_length:]).nonzero()
    steps = int(differ[0, 0]) + 1 if differ.numel() else eager_logits.shape[0]
    torch.testing.assert_close(compiled_logits[:steps], eager_logits[:steps], rtol=0, atol=tolerance)
    if differ.numel():
        step = int(differ[0, 0])
        scores = eager_logits[step, 0]
        tie = scores[eager_tokens[0, prompt_length + step]] - scores[compiled_tokens[0, prompt_length + step]]
        assert tie <= 2 * tolerance, f"step {step}: compiled chose a token {float(tie):.4f} below the eager one"
