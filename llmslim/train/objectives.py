"""Language-modelling objectives shared by distillation and fine-tuning.

Causal LM: predict token t+1 from tokens <= t. Masked LM (BERT): 15% of the non-special tokens
are chosen; of those 80% become [MASK], 10% a random token, 10% stay; the loss is on the chosen.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

IGNORE = -100


def causal_lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy of predicting each next token; padding targets are skipped.

    Args:
        logits: (batch, seq, vocab).
        input_ids: (batch, seq).
        attention_mask: (batch, seq), 1 for real tokens; None means all real.
    """
    labels = input_ids[:, 1:].clone()  # (batch, seq - 1)
    if attention_mask is not None:
        labels[attention_mask[:, 1:] == 0] = IGNORE
    return masked_lm_loss(logits[:, :-1], labels)


def masked_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the positions whose label is not -100 (zero when there are none).

    Args:
        logits: (batch, seq, vocab).
        labels: (batch, seq) target ids, -100 where no loss is taken.
    """
    if not (labels != IGNORE).any():
        return logits.sum() * 0.0  # keeps the graph (and DDP's gradient hooks) intact
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=IGNORE)


def mask_tokens(
    input_ids: torch.Tensor,
    special_mask: torch.Tensor,
    mask_token_id: int,
    vocab_size: int,
    probability: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masking: choose `probability` of the non-special tokens; 80% [MASK], 10% random, 10% kept.

    Args:
        input_ids: (batch, seq).
        special_mask: (batch, seq) bool, True for tokens never chosen ([CLS], [SEP], padding).
        mask_token_id: id of [MASK].
        vocab_size: random replacements are drawn from [0, vocab_size).
        probability: share of tokens chosen.
        generator: random source (the global one when None).

    Returns:
        (inputs, labels): the corrupted ids, and the original ids where chosen, -100 elsewhere.
    """
    device = input_ids.device
    chosen_p = torch.full(input_ids.shape, probability).masked_fill(special_mask.cpu(), 0.0)
    chosen = torch.bernoulli(chosen_p, generator=generator).bool().to(device)  # (batch, seq)
    labels = input_ids.masked_fill(~chosen, IGNORE)
    masked = torch.bernoulli(torch.full(input_ids.shape, 0.8), generator=generator).bool().to(device) & chosen
    randomised = torch.bernoulli(torch.full(input_ids.shape, 0.5), generator=generator).bool().to(device) & chosen & ~masked
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator).to(device)
    inputs = input_ids.masked_fill(masked, mask_token_id)
    inputs = torch.where(randomised, random_ids, inputs)
    return inputs, labels


def special_tokens_mask(input_ids: torch.Tensor, special_ids: list[int]) -> torch.Tensor:
    """(batch, seq) bool: True where `input_ids` holds one of `special_ids`."""
    return torch.isin(input_ids, torch.tensor(special_ids, device=input_ids.device))


@torch.no_grad()
def masked_perplexity(
    model,
    blocks: torch.Tensor,
    special_ids: list[int],
    mask_token_id: int,
    probability: float = 0.15,
    seed: int = 0,
    batch_size: int = 8,
) -> float:
    """exp(mean cross-entropy) of a masked LM on `blocks` masked with a fixed seed (same masks each call)."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for start in range(0, blocks.shape[0], batch_size):
        ids = blocks[start : start + batch_size].to(device)  # (b, block)
        inputs, labels = mask_tokens(
            ids, special_tokens_mask(ids, special_ids), mask_token_id, model.config.vocab_size, probability, generator
        )
        logits = model(input_ids=inputs).logits.float()  # (b, block, vocab)
        chosen = labels != IGNORE
        total += F.cross_entropy(logits[chosen], labels[chosen], reduction="sum").item()
        count += int(chosen.sum())
    if count == 0:
        raise ValueError(f"no token of the {blocks.shape[0]} eval blocks was masked: use more eval text")
    return math.exp(total / count)
