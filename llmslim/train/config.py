"""TrainConfig: the options of the shared training loop, validated at construction."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

OPTIMIZERS = ("auto", "adamw", "adamw8bit", "paged_adamw8bit", "adafactor")
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")
CHECKPOINTING = ("none", "all", "sqrt")  # or a number of segments k >= 1
# Fields that change the arithmetic of a run: a checkpoint resumes only under the same values.
_MATH_FIELDS = (
    "steps",
    "batch_size",
    "grad_accum",
    "lr",
    "weight_decay",
    "warmup_steps",
    "min_lr_ratio",
    "max_grad_norm",
    "optimizer",
    "mixed_precision",
    "seed",
)


@dataclass
class TrainConfig:
    """Options of `Trainer` (one loop for distillation and fine-tuning).

    Args:
        steps: optimizer steps of the whole run.
        batch_size: blocks per process per micro-step.
        grad_accum: micro-steps per optimizer step (gradient accumulation).
        lr: peak learning rate, reached after warmup, then cosine decay to `lr * min_lr_ratio`.
        weight_decay: AdamW weight decay (not applied to biases and norm weights).
        warmup_steps: linear warmup steps; None means 5% of `steps`.
        min_lr_ratio: final learning rate as a fraction of `lr`.
        max_grad_norm: gradient clipping norm; None disables clipping.
        optimizer: `"auto"` (bitsandbytes 8-bit AdamW on CUDA, torch AdamW elsewhere), `"adamw"`,
            `"adamw8bit"`, `"paged_adamw8bit"` or `"adafactor"` (torch's Adafactor: factored second
            moments, no first moment; the memory-lean choice on CPU).
        mixed_precision: `"auto"` (bf16 on CUDA when supported, fp16 on other CUDA, none on CPU),
            `"no"`, `"bf16"` or `"fp16"`.
        checkpointing: activation checkpointing (`llmslim.enable_checkpointing`): `"none"`, `"all"`
            (every block), `"sqrt"` (~sqrt(n) segments) or a number of segments k.
        offload: keep the tensors saved for the backward pass outside checkpointed segments in CPU memory.
        eval_every: evaluate every N steps (and always at the end); 0 evaluates only at the end.
        save_every: write a resumable checkpoint every N steps; 0 never does.
        keep_checkpoints: how many of the newest checkpoints to keep.
        log_every: write a training record to the JSON-lines log every N steps.
        seed: seed of data order, masking, dropout and initialisation.
        run_dir: folder for `checkpoints/` and `log.jsonl`; None keeps nothing on disk.
    """

    steps: int = 1000
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 2e-4
    weight_decay: float = 0.01
    warmup_steps: int | None = None
    min_lr_ratio: float = 0.1
    max_grad_norm: float | None = 1.0
    optimizer: str = "auto"
    mixed_precision: str = "auto"
    checkpointing: str | int = "none"
    offload: bool = False
    eval_every: int = 0
    save_every: int = 0
    keep_checkpoints: int = 2
    log_every: int = 10
    seed: int = 0
    run_dir: Path | None = None

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "keep_checkpoints", "log_every"):
            _check_positive_int(name, getattr(self, name))
        for name in ("eval_every", "save_every"):
            _check_non_negative_int(name, getattr(self, name))
        if self.warmup_steps is not None:
            _check_non_negative_int("warmup_steps", self.warmup_steps)
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None (no clipping), got {self.max_grad_norm!r}")
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISION)
        from llmslim.memory.checkpointing import check_policy

        self.checkpointing = check_policy(self.checkpointing)
        if not isinstance(self.offload, bool):
            raise ValueError(f"offload must be True or False, got {self.offload!r}")
        if self.run_dir is not None:
            self.run_dir = Path(self.run_dir)
        elif self.save_every:
            raise ValueError(f"save_every={self.save_every} needs a run_dir to write checkpoints to: set run_dir (--run-dir)")

    @property
    def warmup(self) -> int:
        """Warmup steps actually used."""
        return self.warmup_steps if self.warmup_steps is not None else max(1, round(0.05 * self.steps))

    def fingerprint(self) -> dict:
        """The values a resumed run must share with its checkpoint."""
        values = asdict(self)
        return {name: values[name] for name in _MATH_FIELDS}


def _check_positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_non_negative_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")


def _check_choice(name: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
