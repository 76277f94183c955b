"""The one training loop of llmslim (distillation and fine-tuning), on accelerate.

Each optimizer step: set the scheduled learning rate; for each micro-step, seed the random
generators from (seed, step, micro-step, rank), take this rank's slice of the step's batch, run
the task's loss function and back-propagate (gradients synchronised across processes only on the
last micro-step); clip, step, zero. Batches and random draws depend only on the seed and the step,
so a run resumed from a checkpoint continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from llmslim.train import checkpoint as ckpt
from llmslim.train.config import TrainConfig
from llmslim.train.optim import lr_at, make_optimizer, resolve_optimizer, set_lr

logger = logging.getLogger(__name__)

LOG_FILE = "log.jsonl"


@dataclass
class LossOutput:
    """What a task's loss function returns: the loss to minimise and its parts (for the log)."""

    loss: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)


LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor]], LossOutput]
EvalFn = Callable[[torch.nn.Module], dict[str, float]]


@dataclass
class TrainResult:
    """The end of a run.

    Args:
        step: optimizer steps done.
        history: the JSON-lines log records (training and evaluation), oldest first.
        final_eval: metrics of the last evaluation ({} without an eval function).
        resumed_from: the checkpoint the run started from, if any.
    """

    step: int
    history: list[dict]
    final_eval: dict[str, float]
    resumed_from: Path | None = None


def make_accelerator(config: TrainConfig):
    """An `accelerate.Accelerator` for `config` (CPU processes use gloo; mixed precision where supported)."""
    from accelerate import Accelerator

    cuda = torch.cuda.is_available()
    return Accelerator(mixed_precision=resolve_mixed_precision(config.mixed_precision, cuda), cpu=not cuda)


def resolve_mixed_precision(name: str, cuda: bool) -> str:
    """What `"auto"` means: bf16 on CUDA that supports it, fp16 on other CUDA, none on CPU."""
    if name != "auto":
        return name
    if not cuda:
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def batch_indices(n_blocks: int, step: int, micro: int, rank: int, world: int, config: TrainConfig) -> torch.Tensor:
    """Block indices of one rank's micro-batch: a fresh seeded permutation per pass over the data."""
    per_step = config.batch_size * config.grad_accum * world
    first = step * per_step + (micro * world + rank) * config.batch_size
    positions = torch.arange(first, first + config.batch_size)  # (batch,)
    epochs, offsets = positions // n_blocks, positions % n_blocks
    out = torch.empty_like(positions)
    for epoch in epochs.unique().tolist():
        order = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(config.seed * 1_000_003 + epoch))
        chosen = epochs == epoch
        out[chosen] = order[offsets[chosen]]
    return out


def run_fingerprint(task: dict, config: TrainConfig, accelerator, n_blocks: int) -> dict:
    """Everything a resumed run must share with its checkpoint: task values, loop values, processes, data size."""
    loop = config.fingerprint()
    loop["optimizer"] = resolve_optimizer(config.optimizer, accelerator.device)
    loop["mixed_precision"] = accelerator.mixed_precision
    return {**task, **loop, "num_processes": accelerator.num_processes, "n_blocks": int(n_blocks)}


def seed_micro_step(seed: int, step: int, micro: int, rank: int) -> None:
    """Seed torch's generators for one micro-step (dropout, masking) independently of history."""
    torch.manual_seed(((seed * 1_000_003 + step) * 1_009 + micro) * 101 + rank)


class Trainer:
    """Train `model` on packed token blocks with a task-supplied loss.

    Args:
        model: the model to train; only parameters with `requires_grad` are optimised and saved
            in checkpoints (so a PEFT model checkpoints its adapters only).
        config: loop options.
        blocks: training blocks, (n_blocks, block_size) token ids.
        loss_fn: `loss_fn(model, batch) -> LossOutput`; `batch` holds `input_ids` and
            `attention_mask`, on the accelerator's device, the blocks' `block_index` and the run's `progress`
            (a float, 0 at the first step and 1 at the last, for a loss whose weights follow a schedule).
        eval_fn: `eval_fn(model) -> {metric: value}`, run without gradients in eval mode.
        fingerprint: task values (model, data, loss weights) a resumed run must share; the loop's
            own values and the number of processes are added.
        accelerator: an `accelerate.Accelerator`; default `make_accelerator(config)`.
        progress: show a tqdm bar (main process only).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        config: TrainConfig,
        blocks: torch.Tensor,
        loss_fn: LossFn,
        *,
        eval_fn: EvalFn | None = None,
        fingerprint: dict | None = None,
        accelerator=None,
        progress: bool = True,
    ) -> None:
        if blocks.ndim != 2 or blocks.shape[0] == 0:
            raise ValueError(f"blocks must be a non-empty (n_blocks, block_size) tensor, got shape {tuple(blocks.shape)}")
        self.config, self.blocks, self.loss_fn, self.eval_fn = config, blocks, loss_fn, eval_fn
        self.accelerator = accelerator or make_accelerator(config)
        self.progress = progress
        self.fingerprint = run_fingerprint(fingerprint or {}, config, self.accelerator, blocks.shape[0])
        self.model = _prepare_model(model, config, self.accelerator.device)
        self.optimizer = make_optimizer(self.model, config, self.accelerator.device)
        self.history: list[dict] = []

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def fit(self, resume: str | Path | None = None) -> TrainResult:
        """Train for `config.steps` optimizer steps (continuing from `resume`, a checkpoint or run folder)."""
        found = ckpt.check_resume(resume, self.fingerprint) if resume is not None else None
        start = self._restore(found) if found is not None else 0
        model, optimizer = self.accelerator.prepare(self.model, self.optimizer)
        model.train()
        final_eval: dict[str, float] = {}
        bar = tqdm(total=self.config.steps, initial=start, desc="train", unit="step", disable=not (self.progress and self.is_main))
        started = time.perf_counter()
        for step in range(start, self.config.steps):
            record = self._train_step(model, optimizer, step)
            done = step + 1
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.4f}")
            if done % self.config.log_every == 0 or done == self.config.steps:
                self._log({**record, "elapsed_s": round(time.perf_counter() - started, 3)})
            if self.eval_fn is not None and (done == self.config.steps or (self.config.eval_every and done % self.config.eval_every == 0)):
                final_eval = self._evaluate(done)
            if self.config.save_every and done % self.config.save_every == 0:
                self._save(done)
        bar.close()
        self.accelerator.wait_for_everyone()
        return TrainResult(self.config.steps, self.history, final_eval, found)

    def unwrapped_model(self) -> torch.nn.Module:
        """The trained model without its distributed wrapper."""
        return self.accelerator.unwrap_model(self.model)

    def _train_step(self, model, optimizer, step: int) -> dict:
        lr = lr_at(step, self.config)
        set_lr(optimizer, lr)
        sums: dict[str, torch.Tensor] = {}
        accum = self.config.grad_accum
        for micro in range(accum):
            seed_micro_step(self.config.seed, step, micro, self.accelerator.process_index)
            batch = self._batch(step, micro)
            sync = nullcontext() if micro == accum - 1 else self.accelerator.no_sync(model)
            with sync:
                with self.accelerator.autocast():
                    out = self.loss_fn(model, batch)
                self.accelerator.backward(out.loss / accum)
            for name, value in {"loss": out.loss, **out.parts}.items():
                sums[name] = sums.get(name, 0.0) + value.detach().float() / accum
        if self.config.max_grad_norm is not None:
            self.accelerator.clip_grad_norm_(model.parameters(), self.config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        means = self.accelerator.reduce(torch.stack(list(sums.values())), reduction="mean")  # (n_parts,)
        tokens = (step + 1) * self.blocks.shape[1] * self.config.batch_size * accum * self.accelerator.num_processes
        return {"step": step + 1, **dict(zip(sums, means.tolist(), strict=True)), "lr": lr, "tokens": tokens}

    def _batch(self, step: int, micro: int) -> dict[str, torch.Tensor]:
        index = batch_indices(
            self.blocks.shape[0], step, micro, self.accelerator.process_index, self.accelerator.num_processes, self.config
        )
        input_ids = self.blocks[index].to(self.accelerator.device)  # (batch, block)
        progress = step / max(1, self.config.steps - 1)  # 0 at the first step, 1 at the last: for loss schedules
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "block_index": index, "progress": progress}

    def _evaluate(self, step: int) -> dict[str, float]:
        model = self.unwrapped_model()
        metrics: dict[str, float] = {}
        if self.is_main:
            model.eval()
            with torch.no_grad():
                metrics = self.eval_fn(model)
            model.train()
            self._log({"step": step, **metrics})
        self.accelerator.wait_for_everyone()
        return metrics

    def _save(self, step: int) -> None:
        if self.is_main and self.config.run_dir is not None:
            scaler = getattr(self.accelerator, "scaler", None)
            ckpt.save_checkpoint(
                self.config.run_dir, step, self.unwrapped_model(), self.optimizer, self.fingerprint, scaler, self.config.keep_checkpoints
            )
        self.accelerator.wait_for_everyone()

    def _restore(self, found: Path) -> int:
        state = ckpt.load_checkpoint(found)
        ckpt.restore_weights(self.model, state.weights)
        self.optimizer.load_state_dict(state.optimizer)
        scaler = getattr(self.accelerator, "scaler", None)
        if scaler is not None and state.scaler is not None:
            scaler.load_state_dict(state.scaler)
        self.history = self._read_log(state.step)
        logger.info("resumed from %s at step %d", found, state.step)
        return state.step

    def _log(self, record: dict) -> None:
        if not self.is_main:
            return
        self.history.append(record)
        if self.config.run_dir is not None:
            self.config.run_dir.mkdir(parents=True, exist_ok=True)
            with open(self.config.run_dir / LOG_FILE, "a") as log:
                log.write(json.dumps(record) + "\n")

    def _read_log(self, step: int) -> list[dict]:
        """The log records up to `step`; the log file is cut there so the resumed run appends cleanly."""
        path = None if self.config.run_dir is None else self.config.run_dir / LOG_FILE
        if path is None or not path.is_file():
            return []
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        kept = [r for r in records if r.get("step", 0) <= step]
        if self.is_main:
            path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        return kept if self.is_main else []


def _prepare_model(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> torch.nn.Module:
    """Move `model` to `device` and switch on activation checkpointing if asked."""
    if next(model.parameters()).device != device:
        model.to(device)
    if config.checkpointing != "none" or config.offload:
        _enable_checkpointing(model, config)
    return model


def _enable_checkpointing(model: torch.nn.Module, config: TrainConfig) -> None:
    """llmslim's block checkpointing (per block, sqrt(n) or k segments; optional CPU offload)."""
    from llmslim.memory.checkpointing import enable_checkpointing

    enable_checkpointing(model, config.checkpointing, config.offload)
