"""DistilBERT's triple loss: soft-target KL, language modelling, hidden-state cosine.

    loss = alpha_kd * T^2 * KL(softmax(teacher / T) || softmax(student / T))
         + alpha_lm * (causal or masked) LM cross-entropy
         + alpha_cos * (1 - cos(student hidden, teacher hidden))

Each term averages over the non-padding positions. The teacher runs under `torch.no_grad()` on
each batch; its logits are never kept beyond the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from llmslim.train.loop import LossOutput
from llmslim.train.objectives import causal_lm_loss, mask_tokens, masked_lm_loss, special_tokens_mask


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * mean over masked positions of KL(softmax(teacher / T) || softmax(student / T)).

    Args:
        student_logits, teacher_logits: (batch, seq, vocab).
        mask: (batch, seq) bool, True at the positions that count.
        temperature: T.
    """
    student = student_logits[mask].float() / temperature  # (n, vocab)
    teacher = teacher_logits[mask].float() / temperature  # (n, vocab)
    kl = F.kl_div(F.log_softmax(student, dim=-1), F.log_softmax(teacher, dim=-1), log_target=True, reduction="batchmean")
    return kl * temperature**2


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
    """alpha_kd, alpha_lm, alpha_cos and the temperature T."""

    kd: float = 5.0
    lm: float = 2.0
    cos: float = 1.0
    temperature: float = 2.0


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
        teacher: the teacher, in eval mode, on the student's device.
        weights: loss weights and temperature.
        hidden_pairs: (student index, teacher index) pairs into `hidden_states` for the cosine loss.
        masking: set for a masked LM (BERT); None for a causal LM.
    """

    def __init__(self, teacher, weights: LossWeights, hidden_pairs: list[tuple[int, int]], masking: Masking | None = None):
        self.teacher, self.weights, self.hidden_pairs, self.masking = teacher, weights, hidden_pairs, masking

    def __call__(self, student, batch: dict[str, torch.Tensor]) -> LossOutput:
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        inputs, labels = self._corrupt(input_ids)
        hidden = self.weights.cos > 0
        teacher_out = None
        if self.weights.kd > 0 or hidden:  # an LM-only baseline never runs the teacher
            with torch.no_grad():
                teacher_out = self.teacher(input_ids=inputs, attention_mask=attention_mask, output_hidden_states=hidden)
        student_out = student(input_ids=inputs, attention_mask=attention_mask, output_hidden_states=hidden)
        positions = attention_mask.bool()  # (batch, seq)
        parts = {}
        if self.weights.kd > 0:
            parts["kd"] = kd_loss(student_out.logits, teacher_out.logits, positions, self.weights.temperature)
        if self.weights.lm > 0:
            parts["lm"] = (
                masked_lm_loss(student_out.logits, labels)
                if labels is not None
                else causal_lm_loss(student_out.logits, input_ids, attention_mask)
            )
        if hidden:
            pairs = [cosine_loss(student_out.hidden_states[s], teacher_out.hidden_states[t], positions) for s, t in self.hidden_pairs]
            parts["cos"] = torch.stack(pairs).mean()
        alphas = {"kd": self.weights.kd, "lm": self.weights.lm, "cos": self.weights.cos}
        loss = sum(alphas[name] * value for name, value in parts.items())
        return LossOutput(loss, parts)

    def _corrupt(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.masking is None:
            return input_ids, None
        m = self.masking
        return mask_tokens(input_ids, special_tokens_mask(input_ids, m.special_ids), m.mask_token_id, m.vocab_size, m.probability)
