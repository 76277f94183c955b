"""QLoRA fine-tuning benchmark: SmolLM2-135M, nf4 base + LoRA on every linear layer, Tiny Shakespeare.

One run of `llmslim.finetune.run.finetune` (the last 10% of Tiny Shakespeare held out; the first
--eval-tokens of it scored before and after) under a fixed step budget, then the memory of a
training step against full bf16 fine-tuning of the same model:
  - computed from tensor sizes: weights (as stored) + gradients + optimizer states (AdamW: two
    float32 moments per trainable weight; Adafactor: factored rows + columns) + activations (the
    planner's formula: checkpointing as used vs none for full fine-tuning);
  - measured on CPU: the peak of one forward + backward + optimizer step above the loaded model
    (`llmslim.memory.measure.peak_memory`), plus the bytes of the model itself.
Targets: eval perplexity drops by >= 20%; trainable parameters < 2%; training memory <= 30% of
full bf16 fine-tuning.

Writes benchmarks/results/bench_finetune.json and .png (eval perplexity over steps) and prints a table.

    python benchmarks/bench_finetune.py --steps 200           # the full run (about 30 minutes here)
    python benchmarks/bench_finetune.py --steps 2 --batch-size 1 --block-size 64 --eval-tokens 256 \
        --measure-block 64 --results /tmp/bf   # smoke test
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from _harness import RESULTS_DIR, publish, pyplot, save_figure, torch_info

if TYPE_CHECKING:
    import torch

README_BLOCKS: dict[str, str] = {}  # its table is printed; benchmarks/README.md has no bench_finetune block


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default=None, help="base folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--train", default=None, help="training text (default: Tiny Shakespeare, shipped with llmslim)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rank", type=int, default=8, help="r 8 on every linear layer: 1.75%% of the parameters")
    p.add_argument("--alpha", type=float, default=16.0)
    p.add_argument("--checkpointing", default="all")
    p.add_argument("--optimizer", default="adamw", choices=("adamw", "adafactor", "paged_adamw8bit", "adamw8bit"))
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--eval-every", type=int, default=0, help="curve points (default: steps / 5)")
    p.add_argument("--measure-block", type=int, default=256, help="tokens per block of the memory measurement (batch 1)")
    p.add_argument("--results", default=str(RESULTS_DIR))
    args = p.parse_args(argv)
    if args.train is None:
        from llmslim.data import TINY_SHAKESPEARE

        args.train = str(TINY_SHAKESPEARE)
    return args


def train_run(args: argparse.Namespace, out: Path) -> dict:
    from llmslim.finetune.config import FinetuneConfig
    from llmslim.finetune.run import finetune
    from llmslim.train.config import TrainConfig

    config = FinetuneConfig(
        out=out,
        base=args.base,
        rank=args.rank,
        alpha=args.alpha,
        dropout=0.05,
        train=args.train,
        block_size=args.block_size,
        eval_tokens=args.eval_tokens,
        dtype="bfloat16",
    )
    train = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        optimizer=args.optimizer,
        checkpointing=args.checkpointing,
        eval_every=args.eval_every or max(1, args.steps // 5),
        log_every=max(1, args.steps // 20),
        mixed_precision="no",
    )
    result = finetune(config, train, progress=True)
    before, after = result.metrics["eval_perplexity_before"], result.metrics["eval_perplexity"]
    curve = [(0, before)] + [(r["step"], r["eval_perplexity"]) for r in result.history if "eval_perplexity" in r]
    return {
        "eval_perplexity_before": before,
        "eval_perplexity_after": after,
        "perplexity_drop": 1 - after / before,
        "trainable_params": result.trainable_params,
        "total_params": result.total_params,
        "trainable_share": result.trainable_params / result.total_params,
        "curve": curve,
    }


def optimizer_state_bytes(params: list[torch.nn.Parameter], name: str) -> int:
    """Bytes of optimizer state: AdamW two float32 moments; 8-bit AdamW two bytes; Adafactor rows + columns."""
    if name == "adafactor":
        return sum(4 * (p.shape[0] + p.shape[1]) if p.ndim == 2 else 4 * p.numel() for p in params)
    per = 2 if "8bit" in name else 8
    return sum(per * p.numel() for p in params)


def computed_memory(model, hf_config, args: argparse.Namespace, full: bool) -> dict:
    """Weights + gradients + optimizer + activations (bytes), from tensor sizes and the planner's formula."""
    import torch

    from llmslim.memory.activations import activation_costs

    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    dtype = torch.bfloat16 if full else torch.float32
    costs = activation_costs(hf_config, 1, args.measure_block, dtype=dtype)
    parts = {
        "weights": sum(p.numel() * p.element_size() for p in params) + sum(b.numel() * b.element_size() for b in model.buffers()),
        "gradients": sum(p.numel() * p.element_size() for p in trainable),
        "optimizer": optimizer_state_bytes(trainable, "adamw" if full else args.optimizer),
        "activations": costs.peak("none" if full else args.checkpointing),
    }
    return {**parts, "total": sum(parts.values())}


def measured_memory(model, args: argparse.Namespace, optimizer_name: str) -> int:
    """Model bytes + the CPU peak of one training step (forward, backward, optimizer step) at batch 1."""
    import torch

    from llmslim.finetune.run import lm_loss
    from llmslim.memory.measure import peak_memory
    from llmslim.train.config import TrainConfig
    from llmslim.train.optim import make_optimizer

    ids = torch.randint(0, model.config.vocab_size, (1, args.measure_block), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    optimizer = make_optimizer(model, TrainConfig(optimizer=optimizer_name, lr=1e-4), torch.device("cpu"))

    def step() -> None:
        lm_loss(model, batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    _, peak = peak_memory(step)
    stored = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    return stored + peak


def memory_comparison(args: argparse.Namespace) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmslim import models
    from llmslim.finetune.config import FinetuneConfig
    from llmslim.finetune.run import add_lora, load_base
    from llmslim.memory import enable_checkpointing

    path = models.resolve(args.base)
    hf_config = AutoConfig.from_pretrained(path)
    config = FinetuneConfig(out=Path("unused"), base=args.base, rank=args.rank, alpha=args.alpha, dtype="bfloat16")
    qlora = add_lora(load_base(path, config, torch.device("cpu")), config, _targets(path))
    enable_checkpointing(qlora, args.checkpointing)
    qlora.train()
    full = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).train()
    result = {
        "qlora_computed": computed_memory(qlora, hf_config, args, full=False),
        "full_bf16_computed": computed_memory(full, hf_config, args, full=True),
        "qlora_measured": measured_memory(qlora, args, args.optimizer),
        "full_bf16_measured": measured_memory(full, args, "adamw"),
    }
    result["computed_ratio"] = result["qlora_computed"]["total"] / result["full_bf16_computed"]["total"]
    result["measured_ratio"] = result["qlora_measured"] / result["full_bf16_measured"]
    return result


def _targets(path: Path) -> list[str]:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmslim.finetune.lora import resolve_targets

    with init_empty_weights(include_buffers=False):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    return resolve_targets(skeleton, None, ["lm_head"])


def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    steps, ppl = zip(*result["training"]["curve"], strict=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, ppl, marker="o")
    ax.set_xlabel("step")
    ax.set_ylabel("held-out perplexity")
    ax.set_title("SmolLM2-135M nf4 + LoRA on Tiny Shakespeare")
    save_figure(fig, path)


def markdown(result: dict) -> str:
    """The perplexity drop, the trainable share and the memory against full bf16 fine-tuning."""
    m, t = result["memory"], result["training"]
    before, after, drop = t["eval_perplexity_before"], t["eval_perplexity_after"], 100 * t["perplexity_drop"]
    computed = (m["qlora_computed"]["total"] / 2**20, m["full_bf16_computed"]["total"] / 2**20, 100 * m["computed_ratio"])
    measured = (m["qlora_measured"] / 2**20, m["full_bf16_measured"] / 2**20, 100 * m["measured_ratio"])
    return "\n".join(
        [
            "| metric | value |\n|---|---|",
            f"| eval perplexity before / after | {before:.2f} / {after:.2f} ({drop:.1f}% drop) |",
            f"| trainable parameters | {t['trainable_params']:,} ({100 * t['trainable_share']:.2f}%) |",
            "| memory vs full bf16, computed | {:.0f} / {:.0f} MiB ({:.1f}%) |".format(*computed),
            "| memory vs full bf16, measured | {:.0f} / {:.0f} MiB ({:.1f}%) |".format(*measured),
        ]
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        training = train_run(args, Path(tmp) / "adapter")
    result = {"training": training, "memory": memory_comparison(args), "settings": {k: v for k, v in vars(args).items() if k != "results"}}
    result["machine"] = torch_info()
    print(publish("bench_finetune", result, Path(args.results), markdown, plot, readme_section=None, indent=1))


if __name__ == "__main__":
    main()
