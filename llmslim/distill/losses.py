"""Distillation losses: soft-target KL (forward or reverse), language modelling, hidden-state cosine.

    loss = alpha_kd * T^2 * D(teacher / T, student / T)      D: KL(p || q) forward, KL(q || p) reverse
         + alpha_lm * (causal or masked) LM cross-entropy
         + alpha_cos * (1 - cos(student hidden, teacher hidden))

Each term averages over the non-padding positions. The teacher's logits come from the teacher itself, run under
`torch.no_grad()` on each batch, or from a teacher cache (`llmslim.distill.cache`) that keeps, per position, the
top-k logits and the log-sum-exp of the rest: the KL is then taken over k + 1 outcomes (the kept tokens and "any
other token"), exact for the kept tokens and charging the tail's whole mass; with k = the vocabulary it is the full KL.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from llmslim.train.loop import LossOutput
from llmslim.train.objectives import causal_lm_loss, mask_tokens, masked_lm_loss, special_tokens_mask

DIVERGENCES = ("forward", "reverse")


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, temperature: float, divergence: str = "forward"
) -> torch.Tensor:
    """T^2 * mean over masked positions of KL(p || q) (forward) or KL(q || p) (reverse), p = softmax(teacher / T),
    q = softmax(student / T).

    Args:
        student_logits, teacher_logits: (batch, seq, vocab).
        mask: (batch, seq) bool, True at the positions that count.
        temperature: T.
        divergence: "forward" or "reverse".
    """
    student = F.log_softmax(student_logits[mask].float() / temperature, dim=-1)  # (n, vocab)
    teacher = F.log_softmax(teacher_logits[mask].float() / temperature, dim=-1)  # (n, vocab)
    return _kl(teacher, student, divergence).mean() * temperature**2


def topk_kd_loss(
    student_logits: torch.Tensor,
    teacher: TeacherTopK,
    mask: torch.Tensor,
    temperature: float,
    divergence: str = "forward",
) -> torch.Tensor:
    """`kd_loss` against a teacher known by its top-k logits and the log-sum-exp of the rest (`TeacherTopK`, already
    divided by T): the KL over the k kept tokens plus one outcome for all the others. It equals the full KL when the
    tail is empty and is below it by the tail's mass times the KL of the tail's normalised distributions otherwise.

    Args:
        student_logits: (batch, seq, vocab).
        teacher: top-k values and ids (batch, seq, k) and tail log-sum-exp (batch, seq), at temperature T.
        mask: (batch, seq) bool.
    """
    z = student_logits[mask].float() / temperature  # (n, vocab)
    values, ids, tail = teacher.values[mask].float(), teacher.ids[mask].long(), teacher.tail[mask].float()  # (n, k), (n, k), (n,)
    total = torch.logsumexp(torch.cat([values, tail[:, None]], dim=-1), dim=-1, keepdim=True)  # (n, 1)
    p_kept, p_tail = values - total, tail[:, None] - total  # log-probabilities (n, k), (n, 1)
    lse = torch.logsumexp(z, dim=-1, keepdim=True)  # (n, 1)
    q_kept = z.gather(-1, ids) - lse  # (n, k)
    q_tail = _student_tail(z, lse, ids, q_kept, torch.isneginf(tail))  # (n, 1)
    return _kl(torch.cat([p_kept, p_tail], -1), torch.cat([q_kept, q_tail], -1), divergence).mean() * temperature**2


TAIL_EXACT_BELOW = 1e-3  # a student tail mass below this is summed over the vocabulary, not taken as 1 - kept mass


def _student_tail(z: torch.Tensor, lse: torch.Tensor, ids: torch.Tensor, q_kept: torch.Tensor, empty: torch.Tensor) -> torch.Tensor:
    """log of the student's probability outside `ids` `(n, 1)` (`lse`: log-sum-exp of `z` per row):
    `log(1 - sum exp(q_kept))` from the k kept log-probabilities (no vocabulary-wide tensor), except where that mass
    is below `TAIL_EXACT_BELOW` (1 - S would lose its digits): those rows sum their other logits exactly. -inf where
    the tail is `empty` `(n,)`."""
    kept = torch.logsumexp(q_kept.double(), dim=-1, keepdim=True)  # log S, (n, 1)
    exact = (kept > math.log1p(-TAIL_EXACT_BELOW)).squeeze(1) & ~empty
    q_tail = torch.log(-torch.expm1(kept.clamp(max=math.log1p(-TAIL_EXACT_BELOW)))).float()  # log(1 - S)
    if bool(exact.any()):
        rows = exact.nonzero().squeeze(1)
        rest = z[rows].scatter(-1, ids[rows], float("-inf"))  # (r, vocab)
        q_tail = q_tail.index_put((rows,), torch.logsumexp(rest, -1, keepdim=True) - lse[rows])
    return q_tail.masked_fill(empty[:, None], float("-inf"))


def _kl(log_p: torch.Tensor, log_q: torch.Tensor, divergence: str) -> torch.Tensor:
    """Per row, KL(p || q) (forward: p is the teacher) or KL(q || p) (reverse); outcomes of probability 0 under the
    first distribution count 0 (and pass no NaN gradient)."""
    if divergence == "reverse":
        log_p, log_q = log_q, log_p
    kept = ~torch.isneginf(log_p)
    log_p, log_q = log_p.masked_fill(~kept, 0.0), log_q.masked_fill(~kept, 0.0)
    return (kept * log_p.exp() * (log_p - log_q)).sum(-1)


@dataclass
class TeacherTopK:
    """A teacher's logits at temperature T, kept in part: the k largest per position and the log-sum-exp of the rest.

    Args:
        values: (batch, seq, k) the k largest logits / T.
        ids: (batch, seq, k) their token ids.
        tail: (batch, seq) log-sum-exp of the other logits / T (-inf when k is the whole vocabulary).
    """

    values: torch.Tensor
    ids: torch.Tensor
    tail: torch.Tensor

    @classmethod
    def from_logits(cls, logits: torch.Tensor, k: int, temperature: float) -> TeacherTopK:
        """The top-k summary of full logits (batch, seq, vocab)."""
        scaled = logits.float() / temperature
        values, ids = scaled.topk(k, dim=-1)
        rest = scaled.scatter(-1, ids, float("-inf"))
        return cls(values, ids.to(torch.int32), torch.logsumexp(rest, dim=-1))


def cosine_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked positions of 1 - cos(student, teacher) (CosineEmbeddingLoss with target 1).

    Args:
        student_hidden, teacher_hidden: (batch, seq, hidden).
        mask: (batch, seq) bool.
    """
    student = student_hidden[mask].float()  # (n, hidden)
    teacher = teacher_hidden[mask].float()  # (n, hidden)
    return (1.0 - F.cosine_similarity(student, teacher, dim=-1)).mean()


@dataclass(frozen=True)
class LossWeights:
    """alpha_kd, alpha_lm, alpha_cos, the temperature T and the KL's direction."""

    kd: float = 5.0
    lm: float = 2.0
    cos: float = 1.0
    temperature: float = 2.0
    divergence: str = "forward"
    kd_ratio_end: float | None = None  # the KL's share of kd + lm at the last step (linear from kd / (kd + lm) at the first)

    @property
    def uses_kd(self) -> bool:
        """Whether any step of the run has a KL term."""
        return self.kd > 0 or bool(self.kd_ratio_end)

    def at(self, progress: float) -> tuple[float, float]:
        """(alpha_kd, alpha_lm) at `progress` (0 at the first step, 1 at the last): their sum stays kd + lm, and with
        `kd_ratio_end` the KL's share moves linearly from its share at the first step to `kd_ratio_end`."""
        if self.kd_ratio_end is None:
            return self.kd, self.lm
        total = self.kd + self.lm
        start = self.kd / total
        share = start + (self.kd_ratio_end - start) * min(max(progress, 0.0), 1.0)
        return share * total, (1.0 - share) * total


@dataclass(frozen=True)
class Masking:
    """How a masked LM corrupts its inputs."""

    special_ids: list[int]
    mask_token_id: int
    vocab_size: int
    probability: float = 0.15


class DistillLoss:
    """The loss function the trainer calls: `DistillLoss(...)(student, batch) -> LossOutput`.

    Args:
        teacher: the teacher, in eval mode, on the student's device; None with a cache (and no cosine loss).
        weights: loss weights, temperature and divergence.
        hidden_pairs: (student index, teacher index) pairs into `hidden_states` for the cosine loss.
        masking: set for a masked LM (BERT); None for a causal LM. Inputs are masked only for a loss on the
            logits (a bare encoder learns from its teacher's states on the text itself, as it is used).
        cache: a teacher cache (`llmslim.distill.cache.TeacherCache`) read by the batch's `block_index`.
    """

    def __init__(self, teacher, weights: LossWeights, hidden_pairs: list[tuple[int, int]], masking: Masking | None = None, cache=None):
        if cache is not None and (weights.cos > 0 or masking is not None):
            raise ValueError("a teacher cache holds logits of a causal LM only: pass --alpha-cos 0, or distill without --teacher-cache")
        self.teacher, self.weights, self.hidden_pairs, self.masking, self.cache = teacher, weights, hidden_pairs, masking, cache

    def __call__(self, student, batch: dict[str, torch.Tensor]) -> LossOutput:
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        inputs, labels = self._corrupt(input_ids)
        hidden = self.weights.cos > 0
        teacher_out = None
        if self.cache is None and (self.weights.uses_kd or hidden):  # an LM-only baseline never runs the teacher
            with torch.no_grad():
                teacher_out = self.teacher(input_ids=inputs, attention_mask=attention_mask, output_hidden_states=hidden)
        student_out = student(input_ids=inputs, attention_mask=attention_mask, output_hidden_states=hidden)
        positions = attention_mask.bool()  # (batch, seq)
        parts = {}
        w = self.weights
        alpha_kd, alpha_lm = w.at(batch.get("progress", 0.0))
        if w.uses_kd and self.cache is not None:
            cached = self.cache.read(batch["block_index"], student_out.logits.device)
            parts["kd"] = topk_kd_loss(student_out.logits, cached, positions, w.temperature, w.divergence)
        elif w.uses_kd:
            parts["kd"] = kd_loss(student_out.logits, teacher_out.logits, positions, w.temperature, w.divergence)
        if w.lm > 0 or w.kd_ratio_end is not None:
            parts["lm"] = (
                masked_lm_loss(student_out.logits, labels)
                if labels is not None
                else causal_lm_loss(student_out.logits, input_ids, attention_mask)
            )
        if hidden:
            pairs = [cosine_loss(student_out.hidden_states[s], teacher_out.hidden_states[t], positions) for s, t in self.hidden_pairs]
            parts["cos"] = torch.stack(pairs).mean()
        alphas = {"kd": alpha_kd, "lm": alpha_lm, "cos": w.cos}
        loss = sum(alphas[name] * value for name, value in parts.items())
        return LossOutput(loss, parts)

    def _corrupt(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.masking is None or not (self.weights.uses_kd or self.weights.lm > 0):
            return input_ids, None
        m = self.masking
        return mask_tokens(input_ids, special_tokens_mask(input_ids, m.special_ids), m.mask_token_id, m.vocab_size, m.probability)
