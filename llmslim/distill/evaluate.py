"""Held-out metrics of a student: perplexity (causal or masked) and pooled-embedding cosine to the teacher."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn import functional as F

from llmslim.evaluate import perplexity
from llmslim.train.data import TokenData
from llmslim.train.objectives import masked_perplexity


@torch.no_grad()
def mean_pooled(model, blocks: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Mean-pooled last hidden states of `blocks`, (n_blocks, hidden): sentence-transformers' pooling."""
    device = next(model.parameters()).device
    pooled = []
    for start in range(0, blocks.shape[0], batch_size):
        ids = blocks[start : start + batch_size].to(device)  # (b, block)
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1].float()  # (b, block, hidden)
        pooled.append(hidden.mean(dim=1).cpu())  # (b, hidden)
    return torch.cat(pooled)


def pooled_cosine(student, teacher, blocks: torch.Tensor) -> float:
    """Mean cosine similarity of the student's pooled embeddings to the teacher's on `blocks`."""
    return F.cosine_similarity(mean_pooled(student, blocks), mean_pooled(teacher, blocks), dim=-1).mean().item()


def make_eval_fn(objective: str, has_head: bool, data: TokenData, eval_tokens: int, teacher, masking=None) -> Callable:
    """The trainer's eval function: `{"eval_perplexity": ...}` for LMs, plus `"eval_cosine"` for encoders."""
    block_size = data.eval.shape[1]
    n_blocks = max(1, eval_tokens // block_size)
    eval_ids = data.eval_ids[:eval_tokens]  # (tokens,)
    eval_blocks = data.eval[:n_blocks]  # (n_blocks, block)

    def evaluate(model) -> dict[str, float]:
        if objective == "causal":
            return {"eval_perplexity": perplexity(model, eval_ids, window=block_size, progress=False).perplexity}
        metrics = {"eval_cosine": pooled_cosine(model, teacher, eval_blocks)}
        if has_head:
            m = masking
            metrics["eval_perplexity"] = masked_perplexity(model, eval_blocks, m.special_ids, m.mask_token_id, m.probability)
        return metrics

    return evaluate
