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

`--vs-bnb`: QLoRA written the usual way, TRL's `SFTTrainer` + peft LoRA (r 8, alpha 16, every linear
layer but the head, gradient checkpointing), on SmolLM2 quantized to NF4 with double quantization by
llmslim (`quantization_config=SlimConfig(weights="nf4")`) and by transformers + bitsandbytes
(`BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)`),
each with its defaults (both compute in float32 while training on a CPU without bf16 GEMMs), the same
data (Tiny Shakespeare's first 90%, pre-tokenized rows of --sft-seq-len tokens in one seeded order),
steps and settings; each case in a fresh process: median step time and tokens/s, peak RSS of the
whole process (`wait4`), perplexity on the first --eval-tokens of the held-out 10% after the run.
Targets: llmslim's peak memory <= bitsandbytes', its tokens/s >= bitsandbytes', eval perplexity
within 2%. Writes bench_finetune_sft.json / .png and the README block.

    python benchmarks/bench_finetune.py --steps 200           # the full run (about 30 minutes here)
    python benchmarks/bench_finetune.py --steps 2 --batch-size 1 --block-size 64 --eval-tokens 256 \
        --measure-block 64 --results /tmp/bf   # smoke test
    python benchmarks/bench_finetune.py --vs-bnb               # SFTTrainer: llmslim vs bitsandbytes
    python benchmarks/bench_finetune.py --vs-bnb --sft-steps 2 --sft-seq-len 32 --eval-tokens 256 --results /tmp/bf
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from _harness import RESULTS_DIR, finish_child, machine_info, publish, pyplot, ratio, recording_errors, run_child, save_figure, torch_info

if TYPE_CHECKING:
    import torch

# the --vs-bnb table; the plain run's table is printed only
README_BLOCKS: dict[str, str] = {"bench_finetune_sft": "bench_finetune_sft.json"}
SFT_CASES = ("llmslim", "bitsandbytes")
SFT_SECTION = "## QLoRA with TRL's SFTTrainer: llmslim vs transformers + bitsandbytes (bench_finetune.py --vs-bnb)"


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
    p.add_argument("--vs-bnb", action="store_true", help="SFTTrainer QLoRA: llmslim nf4 vs transformers + bitsandbytes nf4")
    p.add_argument("--sft-steps", type=int, default=40)
    p.add_argument("--sft-batch-size", type=int, default=4)
    p.add_argument("--sft-seq-len", type=int, default=256)
    p.add_argument("--sft-lr", type=float, default=5e-4)
    p.add_argument("--threads", type=int, default=2, help="torch threads of each --vs-bnb case")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per --vs-bnb case")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
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


# ----------------------------------------------------------------------------- --vs-bnb: SFTTrainer, llmslim vs bitsandbytes


def sft_child(args: argparse.Namespace) -> int:
    """One --vs-bnb case in this fresh process: load, SFTTrainer steps, held-out perplexity."""
    import torch

    torch.set_num_threads(args.threads)
    result: dict = {"case": args.child}
    with recording_errors(result):
        result.update(sft_case(args.child, args))
    return finish_child(result, args.result)


def sft_data(tokenizer, args: argparse.Namespace):
    """Training rows (the first 90% of the text, --sft-seq-len tokens each, seeded order) and held-out eval tokens."""
    import torch
    from datasets import Dataset

    text = Path(args.train).read_text(encoding="utf-8")
    cut = int(len(text) * 0.9)
    ids = tokenizer(text[:cut], add_special_tokens=False).input_ids
    rows = torch.tensor(ids[: len(ids) // args.sft_seq_len * args.sft_seq_len]).view(-1, args.sft_seq_len)
    needed = args.sft_steps * args.sft_batch_size
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0))[:needed]
    held_out = tokenizer(text[cut:], add_special_tokens=False, return_tensors="pt").input_ids[0][: args.eval_tokens]
    return Dataset.from_dict({"input_ids": rows[order].tolist()}), held_out


def sft_case(case: str, args: argparse.Namespace) -> dict:
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    import llmslim
    from llmslim import models
    from llmslim.evaluate import perplexity
    from llmslim.stats import model_nbytes

    path = models.resolve(args.base)
    tokenizer = AutoTokenizer.from_pretrained(path)
    data, held_out = sft_data(tokenizer, args)
    if case == "llmslim":  # each library's defaults otherwise (compute dtype: float32 in both while training on this CPU)
        quantization = llmslim.SlimConfig(weights="nf4")
    else:
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization, dtype=torch.bfloat16, device_map="cpu")
    load_s = time.perf_counter() - start
    footprint = model_nbytes(model)
    steps: list[float] = []

    class StepTimes(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.t0 = time.perf_counter()

        def on_step_end(self, *_, **__):
            steps.append(time.perf_counter() - self.t0)

    config = SFTConfig(
        output_dir=tempfile.mkdtemp(prefix="bench-sft-"),
        max_steps=args.sft_steps,
        per_device_train_batch_size=args.sft_batch_size,
        learning_rate=args.sft_lr,
        lr_scheduler_type="constant",
        gradient_checkpointing=True,
        max_length=args.sft_seq_len,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        bf16=False,
    )
    lora = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=config, train_dataset=data, processing_class=tokenizer, peft_config=lora)
    trainer.add_callback(StepTimes())
    before = perplexity(trainer.model.eval(), held_out, window=args.block_size, progress=False).perplexity
    trainer.train()
    after = perplexity(trainer.model.eval(), held_out, window=args.block_size, progress=False).perplexity
    timed = steps[1:] or steps  # the first step builds caches and warms up
    step_s = statistics.median(timed)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {
        "load_s": load_s,
        "footprint_bytes": footprint,
        "step_s": step_s,
        "tokens_per_s": args.sft_batch_size * args.sft_seq_len / step_s,
        "eval_perplexity_before": before,
        "eval_perplexity_after": after,
        "losses": losses,
        "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
    }


def sft_comparison(args: argparse.Namespace) -> dict:
    """Both --vs-bnb cases, each in a fresh process (peak RSS from wait4)."""
    passed = ["--vs-bnb", "--train", args.train, "--eval-tokens", str(args.eval_tokens), "--block-size", str(args.block_size)]
    passed += ["--sft-steps", str(args.sft_steps), "--sft-batch-size", str(args.sft_batch_size), "--sft-seq-len", str(args.sft_seq_len)]
    passed += ["--sft-lr", str(args.sft_lr), "--rank", str(args.rank), "--alpha", str(args.alpha), "--threads", str(args.threads)]
    if args.base:
        passed += ["--base", args.base]
    cases = {}
    for case in SFT_CASES:
        run = run_child(Path(__file__), [*passed, "--child", case], args.timeout)
        cases[case] = run.merged(peak_rss_bytes=run.peak_rss_bytes)
        print(json.dumps({case: {k: v for k, v in cases[case].items() if k not in ("losses", "traceback")}}), file=sys.stderr)
    settings = {k: getattr(args, k) for k in ("sft_steps", "sft_batch_size", "sft_seq_len", "sft_lr", "rank", "alpha", "eval_tokens")}
    settings |= {"threads": args.threads, "eval_window": args.block_size, "base": args.base or "embedded SmolLM2-135M-Instruct"}
    return {"kind": "sft_vs_bnb", "cases": cases, "settings": settings, "machine": machine_info(["trl", "peft", "bitsandbytes"])}


def sft_targets(report: dict) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) of each --vs-bnb target."""
    ours, theirs = report["cases"]["llmslim"], report["cases"]["bitsandbytes"]
    if "error" in ours or "error" in theirs:
        return [("both cases ran", "no: " + (ours.get("error") or theirs.get("error")), False)]
    memory = ratio(ours["peak_rss_bytes"], theirs["peak_rss_bytes"])
    speed = ratio(ours["tokens_per_s"], theirs["tokens_per_s"])
    quality = ours["eval_perplexity_after"] / theirs["eval_perplexity_after"] - 1
    return [
        ("peak memory <= bitsandbytes'", f"{memory:.3f}x", memory <= 1),
        ("tokens/s >= bitsandbytes'", f"{speed:.2f}x", speed >= 1),
        ("eval perplexity within 2%", f"{100 * quality:+.2f}%", abs(quality) <= 0.02),
    ]


def sft_markdown(report: dict) -> str:
    rows = [
        "| base (nf4 + double quant) | step s | tokens/s | peak RSS GiB | footprint MiB | eval ppl before → after |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for case, r in report["cases"].items():
        if "error" in r:
            rows.append(f"| {case} | failed: {r['error']} | | | | |")
            continue
        rows.append(
            f"| {case} | {r['step_s']:.2f} | {r['tokens_per_s']:.0f} | {r['peak_rss_bytes'] / 2**30:.2f} | "
            f"{r['footprint_bytes'] / 2**20:.0f} | {r['eval_perplexity_before']:.2f} → {r['eval_perplexity_after']:.2f} |"
        )
    s = report["settings"]
    rows += [
        "",
        f"TRL SFTTrainer, LoRA r {s['rank']} alpha {s['alpha']:g} on every linear layer but the head, gradient checkpointing, "
        f"{s['sft_steps']} steps of {s['sft_batch_size']} x {s['sft_seq_len']} tokens, lr {s['sft_lr']:g}, {s['threads']} threads; "
        f"eval: {s['eval_tokens']} held-out Tiny Shakespeare tokens in windows of {s['eval_window']}.",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    rows += [f"| {target} | {value} | {'yes' if met else 'no'} |" for target, value, met in sft_targets(report)]
    return "\n".join(rows)


def sft_plot(report: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for case, r in report["cases"].items():
        if r.get("losses"):
            ax.plot(range(1, len(r["losses"]) + 1), r["losses"], label=case)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("SmolLM2-135M nf4 QLoRA, TRL SFTTrainer")
    ax.legend()
    save_figure(fig, path)


def markdown(result: dict) -> str:
    """The --vs-bnb table, or the plain run's: perplexity drop, trainable share, memory against full bf16 fine-tuning."""
    if result.get("kind") == "sft_vs_bnb":
        return sft_markdown(result)
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return sft_child(args)
    if args.vs_bnb:
        report = sft_comparison(args)
        print(publish("bench_finetune_sft", report, Path(args.results), markdown, sft_plot, readme_section=SFT_SECTION, indent=1))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        training = train_run(args, Path(tmp) / "adapter")
    result = {"training": training, "memory": memory_comparison(args), "settings": {k: v for k, v in vars(args).items() if k != "results"}}
    result["machine"] = torch_info()
    print(publish("bench_finetune", result, Path(args.results), markdown, plot, readme_section=None, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
