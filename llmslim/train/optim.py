"""Optimizer choice and the learning-rate schedule (linear warmup, then cosine decay)."""

from __future__ import annotations

import math

import torch

from llmslim.train.config import TrainConfig


def resolve_optimizer(name: str, device: torch.device) -> str:
    """The optimizer `"auto"` stands for on `device`: bitsandbytes 8-bit AdamW on CUDA, AdamW elsewhere."""
    if name != "auto":
        return name
    return "adamw8bit" if device.type == "cuda" else "adamw"


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in two groups: matrices decay, biases and norm weights (ndim < 2) do not."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters (requires_grad is False everywhere)")
    return [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]


def make_optimizer(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """The optimizer of `config` over the trainable parameters of `model`."""
    name = resolve_optimizer(config.optimizer, device)
    groups = parameter_groups(model, config.weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.999), eps=1e-8)
    if name == "adafactor":
        return torch.optim.Adafactor(groups, lr=config.lr)
    import bitsandbytes as bnb  # optional at import time of llmslim; needed only here

    cls = {"adamw8bit": bnb.optim.AdamW8bit, "paged_adamw8bit": bnb.optim.PagedAdamW8bit}[name]
    return cls(groups, lr=config.lr, betas=(0.9, 0.999), eps=1e-8)


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup to `lr`, cosine to `lr * min_lr_ratio`."""
    warmup = config.warmup
    if step < warmup:
        return config.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, config.steps - warmup - 1)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return config.lr * (config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr
