"""How the next token is chosen from a row of logits: greedy, or temperature + nucleus (top-p) sampling."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

import torch

SEED_RANGE = (-(2**63), 2**64 - 1)  # what `torch.Generator.manual_seed` accepts; a negative seed wraps around
MIN_TEMPERATURE = 1e-5  # below this, sampling is greedy (as in vLLM): dividing by ~0 would overflow to inf


@dataclass(frozen=True)
class SamplingParams:
    """What one request asks of the generation.

    Args:
        max_tokens: most new tokens to generate (the engine lowers it to its limit and the context).
        temperature: 0 (or below `MIN_TEMPERATURE`) means greedy (argmax); otherwise logits are divided by it before sampling.
        top_p: sample only from the smallest set of tokens whose probabilities sum to at least `top_p`.
        seed: seed of this request's own random generator (within `SEED_RANGE`); None draws a fresh one.
        stop: strings that end the generation; the matched stop string is not returned.
        ignore_eos: keep generating past end-of-sequence tokens (for benchmarks: fixed output length).
    """

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not 0 <= self.temperature <= 2:
            raise ValueError(f"temperature must be between 0 and 2, got {self.temperature}")
        if not 0 <= self.top_p <= 1:
            raise ValueError(f"top_p must be between 0 and 1, got {self.top_p}")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise ValueError(f"seed must be between {SEED_RANGE[0]} and {SEED_RANGE[1]} (64 bits), got {self.seed}")
        if any(not s for s in self.stop):
            raise ValueError(f"stop strings must not be empty, got {list(self.stop)!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    def generator(self) -> torch.Generator:
        """A CPU generator seeded with `seed` (or a random seed), owned by one request."""
        return torch.Generator().manual_seed(self.seed if self.seed is not None else secrets.randbits(63))


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """The next token id from `logits` of shape (vocab,)."""
    if params.greedy:
        return int(logits.argmax())
    logits = logits.float()
    probs = torch.softmax((logits - logits.max()) / params.temperature, dim=-1)  # (vocab,); shifted so nothing overflows
    if params.top_p < 1:
        probs = _nucleus(probs, params.top_p)
    return int(torch.multinomial(probs, 1, generator=generator))


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero every token outside the top-p nucleus (the most likely token always stays)."""
    sorted_probs, order = probs.sort(descending=True)  # (vocab,), (vocab,)
    before = sorted_probs.cumsum(0) - sorted_probs  # probability mass ranked above each token
    sorted_probs[before >= top_p] = 0
    sorted_probs[0] = sorted_probs[0].clamp_min(torch.finfo(sorted_probs.dtype).tiny)
    return torch.zeros_like(probs).scatter_(0, order, sorted_probs)
