"""How the next token is chosen from a row of logits: penalties, then greedy or temperature sampling with top-k, min-p and top-p.

    raw logits --apply_penalties--> penalized logits --argmax (greedy) | sample_token--> token id

`apply_penalties` implements OpenAI's presence and frequency penalties (over the tokens generated so
far) and the CTRL / Hugging Face repetition penalty (over the prompt and the generated tokens).
`sample_token` divides by the temperature, keeps the `top_k` most likely tokens, drops those below
`min_p` times the most likely one's probability, then keeps the top-p nucleus, and draws from what is
left with the request's own generator. Logprobs (`logprobs.py`) are of the raw logits, before all of this.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import torch

SEED_RANGE = (-(2**63), 2**64 - 1)  # what `torch.Generator.manual_seed` accepts; a negative seed wraps around
MIN_TEMPERATURE = 1e-5  # below this, sampling is greedy (as in vLLM): dividing by ~0 would overflow to inf
PENALTY_RANGE = (-2.0, 2.0)  # presence and frequency penalties, as in the OpenAI API
MAX_TOP_LOGPROBS = 20  # as in the OpenAI API (chat); legacy completions allow 5
_CHOICE_SEED_STEP = 0x9E3779B97F4A7C15  # golden-ratio increment: choice i of seed s is seeded s + i * step (mod 2**64)


@dataclass(frozen=True)
class SamplingParams:
    """What one request asks of the generation.

    Args:
        max_tokens: most new tokens to generate per choice (the engine lowers it to its limit and the context).
        temperature: 0 (or below `MIN_TEMPERATURE`) means greedy (argmax); otherwise logits are divided by it before sampling.
        top_p: sample only from the smallest set of tokens whose probabilities sum to at least `top_p`.
        top_k: sample only from the `top_k` most likely tokens; 0 or -1 means all of them.
        min_p: sample only from tokens at least `min_p` times as likely as the most likely one (0 = off).
        presence_penalty: subtracted from the logit of every token generated at least once (-2 to 2).
        frequency_penalty: subtracted from a token's logit once per time it was generated (-2 to 2).
        repetition_penalty: CTRL's penalty on every token of the prompt or the output: a positive logit
            is divided by it, a negative one multiplied (1 = off, above 1 discourages repeats).
        seed: seed of this request's own random generators (within `SEED_RANGE`); None draws fresh ones.
        stop: strings that end the generation; the matched stop string is not returned.
        ignore_eos: keep generating past end-of-sequence tokens (for benchmarks: fixed output length).
        n: choices generated for the prompt (one prefill, decoded together).
        logprobs: None for no logprobs; k >= 0 for the chosen token's log-probability and the k most likely
            alternatives at each step (at most `MAX_TOP_LOGPROBS`).
        grammar: structured output: an llguidance grammar (from `grammar.Grammars.compile_json_schema`) every
            choice's tokens must follow; the choice ends ("stop") as soon as its output is complete.
    """

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    n: int = 1
    logprobs: int | None = None
    grammar: str | None = None

    def __post_init__(self):
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not 0 <= self.temperature <= 2:
            raise ValueError(f"temperature must be between 0 and 2, got {self.temperature}")
        if not 0 <= self.top_p <= 1:
            raise ValueError(f"top_p must be between 0 and 1, got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 or 0 (all tokens) or a positive count, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be between 0 and 1, got {self.min_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not PENALTY_RANGE[0] <= getattr(self, name) <= PENALTY_RANGE[1]:
                raise ValueError(f"{name} must be between {PENALTY_RANGE[0]} and {PENALTY_RANGE[1]}, got {getattr(self, name)}")
        if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
            raise ValueError(f"repetition_penalty must be a positive number (1 = off), got {self.repetition_penalty}")
        if self.seed is not None and not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]:
            raise ValueError(f"seed must be between {SEED_RANGE[0]} and {SEED_RANGE[1]} (64 bits), got {self.seed}")
        if any(not s for s in self.stop):
            raise ValueError(f"stop strings must not be empty, got {list(self.stop)!r}")
        if self.n < 1:
            raise ValueError(f"n must be at least 1, got {self.n}")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs must be between 0 and {MAX_TOP_LOGPROBS} alternatives, got {self.logprobs}")

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE

    @property
    def penalized(self) -> bool:
        """Whether any penalty changes the logits (else `apply_penalties` returns them untouched)."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1)

    def generator(self) -> torch.Generator:
        """A CPU generator seeded with `seed` (or a random seed), owned by one request (its first choice)."""
        return torch.Generator().manual_seed(self.seed if self.seed is not None else secrets.randbits(63))

    def choice_generator(self, index: int) -> torch.Generator:
        """The generator of choice `index`: choice 0 is `generator()`, the others get seeds derived from `seed`.

        So a seeded request with n choices is reproducible, its first choice equals the same request with n=1,
        and its choices differ from each other.
        """
        if index == 0 or self.seed is None:
            return self.generator()
        return torch.Generator().manual_seed((self.seed + index * _CHOICE_SEED_STEP) % 2**64)


def apply_penalties(logits: torch.Tensor, params: SamplingParams, prompt_ids: list[int], output_ids: list[int]) -> torch.Tensor:
    """The logits of shape (vocab,) after the repetition, frequency and presence penalties (a new tensor, float32).

    OpenAI's semantics: `logits[t] -= count(t) * frequency_penalty + (count(t) > 0) * presence_penalty`, with
    `count(t)` the times token t was generated so far (the prompt does not count). The repetition penalty is
    CTRL's, as in Hugging Face's `RepetitionPenaltyLogitsProcessor`, over every token of the prompt and output,
    applied first (as vLLM does).
    """
    if not params.penalized:
        return logits
    logits = logits.float().clone()  # (vocab,)
    vocab = logits.shape[-1]
    if params.repetition_penalty != 1:
        seen = torch.tensor(prompt_ids + output_ids, dtype=torch.long).unique()  # (distinct,)
        seen = seen[seen < vocab]
        picked = logits[seen]
        logits[seen] = torch.where(picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty)
    if output_ids and (params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(torch.tensor(output_ids, dtype=torch.long), minlength=vocab)[:vocab].float()  # (vocab,)
        logits -= counts * params.frequency_penalty + (counts > 0).float() * params.presence_penalty
    finite = torch.finfo(logits.dtype)
    return logits.nan_to_num_(posinf=finite.max, neginf=finite.min)  # a penalty near 0 divides a logit past float32


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """The next token id from `logits` of shape (vocab,) (penalties already applied)."""
    if params.greedy:
        return int(logits.argmax())
    logits = logits.float()
    if 0 < params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))  # ties with the k-th token stay in
    probs = torch.softmax((logits - logits.max()) / params.temperature, dim=-1)  # (vocab,); shifted so nothing overflows
    if params.min_p > 0:
        probs = probs.masked_fill(probs < params.min_p * probs.max(), 0)
        probs = probs / probs.sum()  # the most likely token always stays, so the sum is positive
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
