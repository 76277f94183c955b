"""`finetune()`: QLoRA-style fine-tuning of a quantized, frozen base on the shared trainer.

Checked before a weight is loaded: LoRA targets (against a meta-device skeleton), data length,
output folder, resume configuration. Then: base loaded by llmslim with exactly the adapted layers
quantized, peft LoRA adapters (float32) on them, `Trainer.fit` with the causal-LM loss, held-out
perplexity before and after, adapter saved atomically in peft's format with the tokenizer and a
record of how the base was quantized (`llmslim merge` reads it).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoModelForCausalLM

from llmslim import models
from llmslim.evaluate import perplexity
from llmslim.finetune.config import FinetuneConfig
from llmslim.finetune.lora import register_slim_layers, resolve_targets
from llmslim.save import atomic_directory, check_output
from llmslim.train.checkpoint import check_resume, check_run_dir
from llmslim.train.config import TrainConfig
from llmslim.train.data import TokenData, load_splits, prepare_data
from llmslim.train.loop import LossOutput, Trainer, make_accelerator, run_fingerprint
from llmslim.train.objectives import causal_lm_loss

logger = logging.getLogger(__name__)

RECORD_FILE = "llmslim_finetune.json"


@dataclass
class FinetuneResult:
    """The end of a fine-tuning run.

    Args:
        out: the adapter folder.
        metrics: `eval_perplexity_before` and `eval_perplexity` (after).
        history: the training log records.
        trainable_params / total_params: parameter counts (the base counted as stored).
        model: the trained PEFT model.
        is_main: whether this is the main process (the one that saved and should print).
    """

    out: Path
    metrics: dict[str, float]
    history: list[dict]
    trainable_params: int
    total_params: int
    model: torch.nn.Module
    is_main: bool


def finetune(config: FinetuneConfig, train: TrainConfig, *, resume: str | Path | None = None, progress: bool = True) -> FinetuneResult:
    """Train LoRA adapters on a frozen quantized base and save them to `config.out`."""
    check_output(config.out, overwrite=config.overwrite, inputs={"base model": config.base}, name="--out")
    check_run_dir(train.run_dir, config.out)
    path = models.resolve(config.base)
    targets = resolve_targets(_skeleton(path), config.targets, config.exclude)
    tokenizer = models.load_tokenizer(path, needed_for="fine-tuning")
    data = prepare_data(tokenizer, load_splits(config.train, config.eval, config.eval_fraction, config.text_field), config.block_size)
    accelerator = make_accelerator(train)
    fingerprint = config.fingerprint()
    if resume is not None:
        check_resume(resume, run_fingerprint(fingerprint, train, accelerator, data.train.shape[0]))
    model = add_lora(load_base(path, config, accelerator.device), config, targets)
    eval_fn = make_eval_fn(data, config.eval_tokens)
    trainer = Trainer(
        model, train, data.train, lm_loss, eval_fn=eval_fn, fingerprint=fingerprint, accelerator=accelerator, progress=progress
    )
    before = _eval_before(trainer, eval_fn, accelerator)
    result = trainer.fit(resume)
    peft_model = trainer.unwrapped_model()
    if accelerator.is_main_process:
        save_adapter(peft_model, tokenizer, config, path)
    accelerator.wait_for_everyone()
    metrics = {**before, **result.final_eval}
    trainable, total = count_parameters(peft_model)
    return FinetuneResult(config.out, metrics, result.history, trainable, total, peft_model, accelerator.is_main_process)


def base_slim_config(config: FinetuneConfig):
    """The SlimConfig of the base: every linear layer but the head quantized (QLoRA)."""
    from llmslim.config import SlimConfig

    weights = None if config.weights == "none" else config.weights
    return SlimConfig(weights=weights, block_size=config.block_size_quant)


def load_base(path: Path, config: FinetuneConfig, device: torch.device) -> torch.nn.Module:
    """The frozen base on `device`, its linear layers quantized per `config.weights`."""
    import llmslim

    dtype = config.dtype or "auto"
    if config.weights == "none":
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    else:
        model = llmslim.from_pretrained(path, base_slim_config(config), dtype=config.dtype, device_map=str(device), progress=False)
    return model.to(device).requires_grad_(False)


def add_lora(model: torch.nn.Module, config: FinetuneConfig, targets: list[str]) -> torch.nn.Module:
    """`model` wrapped by peft with float32 LoRA adapters on `targets`."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=targets, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, register_slim_layers(lora))
    for param in peft_model.parameters():
        if param.requires_grad:
            param.data = param.data.float()  # adapters train in float32 whatever the base's dtype
    return peft_model


def lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> LossOutput:
    """Next-token cross-entropy of the batch."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return LossOutput(causal_lm_loss(logits, batch["input_ids"], batch["attention_mask"]))


def make_eval_fn(data: TokenData, eval_tokens: int):
    """The trainer's eval function: held-out perplexity over the first `eval_tokens` tokens, in blocks."""
    eval_ids = data.eval_ids[:eval_tokens]  # (tokens,)
    window = data.eval.shape[1]

    def evaluate(model) -> dict[str, float]:
        return {"eval_perplexity": perplexity(model, eval_ids, window=window, progress=False).perplexity}

    return evaluate


def save_adapter(peft_model: torch.nn.Module, tokenizer, config: FinetuneConfig, base_path: Path) -> Path:
    """Write the adapter (peft's format), the tokenizer and how the base was quantized, atomically."""
    record = {"base": str(base_path), **{k: v for k, v in config.fingerprint().items() if k not in ("base", "train", "eval")}}
    with atomic_directory(config.out, config.overwrite, inputs={"base model folder": base_path}, name="--out") as tmp:
        peft_model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / RECORD_FILE).write_text(json.dumps(record, indent=1, default=str))
    return config.out


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts; a packed 4-bit tensor counts two weights per byte."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() * (2 if p.dtype == torch.uint8 else 1) for p in model.parameters())
    return trainable, total


def _skeleton(path: Path) -> torch.nn.Module:
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))


def _eval_before(trainer: Trainer, eval_fn, accelerator) -> dict[str, float]:
    """Held-out perplexity of the base with the fresh (zero) adapters: the run's starting point."""
    metrics: dict[str, float] = {}
    if accelerator.is_main_process:
        model = trainer.model
        model.eval()
        with torch.no_grad():
            metrics = {"eval_perplexity_before": eval_fn(model)["eval_perplexity"]}
        model.train()
    accelerator.wait_for_everyone()
    return metrics
