"""DistilBERT-style distillation: a shallower student initialised from the teacher's layers,
trained with the triple loss (soft targets, language modelling, hidden-state cosine) on the shared
trainer core (`llmslim.train`)."""

from __future__ import annotations

from llmslim.distill.config import DistillConfig
from llmslim.distill.losses import DistillLoss, LossWeights, cosine_loss, kd_loss
from llmslim.distill.run import DistillResult, distill
from llmslim.distill.student import distilbert_layer_map, find_block_list, init_student

__all__ = [
    "DistillConfig",
    "DistillLoss",
    "DistillResult",
    "LossWeights",
    "cosine_loss",
    "distilbert_layer_map",
    "distill",
    "find_block_list",
    "init_student",
    "kd_loss",
]
