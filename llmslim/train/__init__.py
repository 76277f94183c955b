"""The shared training core of `llmslim distill` and `llmslim finetune`.

    data = prepare_data(tokenizer, load_splits("input.txt"), block_size=256)
    trainer = Trainer(model, TrainConfig(steps=100, run_dir="run/"), data.train, loss_fn, eval_fn=eval_fn)
    result = trainer.fit(resume=None)

`loss_fn(model, batch) -> LossOutput` is the only task-specific part of the loop.
"""

from __future__ import annotations

from llmslim.train.checkpoint import check_resume, find_checkpoint, load_checkpoint, save_checkpoint
from llmslim.train.config import TrainConfig
from llmslim.train.data import TextSplits, TokenData, load_splits, pack_blocks, prepare_data, read_documents
from llmslim.train.loop import LossOutput, Trainer, TrainResult, make_accelerator
from llmslim.train.objectives import causal_lm_loss, mask_tokens, masked_lm_loss, masked_perplexity

__all__ = [
    "LossOutput",
    "TextSplits",
    "TokenData",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "causal_lm_loss",
    "check_resume",
    "find_checkpoint",
    "load_checkpoint",
    "load_splits",
    "make_accelerator",
    "mask_tokens",
    "masked_lm_loss",
    "masked_perplexity",
    "pack_blocks",
    "prepare_data",
    "read_documents",
    "save_checkpoint",
]
