"""Perplexity, with the convention of the shared data README.

Read the file as UTF-8, replace CRLF by LF, tokenize the first 400,000 characters, take the first
N tokens, score non-overlapping windows of 512 tokens, report exp(mean NLL) over every predicted
token.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

MAX_CHARS = 400_000
WINDOW = 512


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float
    tokens: int
    predicted: int
    windows: int

    def to_dict(self) -> dict:
        return asdict(self)


def load_tokens(tokenizer, text_file: str | Path, n_tokens: int = 20_000) -> torch.Tensor:
    """The first `n_tokens` token ids of `text_file` under the convention above."""
    path = Path(text_file)
    if not path.is_file():
        raise FileNotFoundError(f"text file {str(path)!r} does not exist: pass --text with a UTF-8 text file")
    if n_tokens < 2:
        raise ValueError(f"n_tokens must be at least 2, got {n_tokens}")
    text = path.read_bytes().decode("utf-8").replace("\r\n", "\n")[:MAX_CHARS]
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    return ids[:n_tokens]


@torch.inference_mode()
def perplexity(model, token_ids: torch.Tensor, window: int = WINDOW, progress: bool = True) -> PerplexityResult:
    """exp(mean NLL) of `token_ids` scored in non-overlapping windows of `window` tokens."""
    device = next(model.parameters()).device
    total_nll, predicted, windows = 0.0, 0, 0
    starts = range(0, token_ids.numel(), window)
    for start in tqdm(starts, desc="perplexity", unit="window", disable=None if progress else True):
        chunk = token_ids[start : start + window].to(device)  # (w,)
        if chunk.numel() < 2:
            continue
        logits = model(chunk.unsqueeze(0)).logits[0, :-1].float()  # (w - 1, vocab)
        total_nll += F.cross_entropy(logits, chunk[1:], reduction="sum").item()
        predicted += chunk.numel() - 1
        windows += 1
    mean_nll = total_nll / predicted
    return PerplexityResult(math.exp(mean_nll), mean_nll, token_ids.numel(), predicted, windows)
