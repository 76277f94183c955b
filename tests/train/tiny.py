"""Tiny models with a character tokenizer, and a small text, for the training and distillation tests."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, BertConfig, BertForMaskedLM, BertModel, LlamaConfig, PreTrainedTokenizerFast

from llmslim.train import TrainConfig

CHARS = list("abcdefghijklmnopqrstuvwxyz .,;:!?'\n")
CAUSAL_SPECIALS = ["<unk>", "<eos>"]
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
VOCAB = 64

_LINES = [
    "to be, or not to be, that is the question:",
    "whether 'tis nobler in the mind to suffer",
    "the slings and arrows of outrageous fortune,",
    "or to take arms against a sea of troubles",
    "and by opposing end them. to die: to sleep;",
]
TEXT = "\n".join(_LINES[i % 5] + f" {'abcde'[i % 5] * (1 + i % 3)}" for i in range(60)) + "\n"


def char_tokenizer(encoder: bool = False) -> PreTrainedTokenizerFast:
    """One token per character of CHARS (causal: <unk> <eos>; encoder: BERT's special tokens)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers

    specials = BERT_SPECIALS if encoder else CAUSAL_SPECIALS
    vocab = {token: i for i, token in enumerate(specials + CHARS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token=specials[1] if encoder else specials[0]))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    if encoder:
        names = dict(pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
        return PreTrainedTokenizerFast(tokenizer_object=core, **names)
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", eos_token="<eos>")


def llama_config(layers: int = 4, vocab: int = VOCAB) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )


def bert_config(layers: int = 4) -> BertConfig:
    return BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64, max_position_embeddings=64
    )


def write_causal(folder: Path, layers: int = 4, vocab: int = VOCAB, seed: int = 0) -> Path:
    """A random tiny Llama with the character tokenizer, saved (float32) in `folder`."""
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(llama_config(layers, vocab)).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


def write_bert(folder: Path, head: bool = True, layers: int = 4, seed: int = 0) -> Path:
    """A random tiny BERT (masked-LM head, or the bare encoder) with the character tokenizer."""
    torch.manual_seed(seed)
    (BertForMaskedLM if head else BertModel)(bert_config(layers)).save_pretrained(folder)
    char_tokenizer(encoder=True).save_pretrained(folder)
    return folder


def write_text(folder: Path, text: str = TEXT, name: str = "text.txt") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def train_config(**kwargs) -> TrainConfig:
    """A TrainConfig with the same arithmetic on every device (torch AdamW, no mixed precision), so
    exact-equality tests hold on CUDA too and every Accelerator of the session agrees on precision."""
    return TrainConfig(**{"optimizer": "adamw", "mixed_precision": "no", **kwargs})
