"""Activation checkpointing benchmark: one training step of a deep decoder under each policy.

A random Llama-shaped decoder (default 24 layers, hidden 512, 8 heads, seq 1024, eager attention,
float32), weights frozen and the input embeddings requiring grad so that the step's memory is its
activations. For policies none / all / sqrt / k segments (and with offload on CUDA):
  - peak activation memory over the whole step, recomputation included: the profiler's CPU
    allocation timeline (`llmslim.memory.measure.peak_memory`), or the CUDA allocator's peak;
  - step time (median of --repeats runs, measured without the profiler);
  - the planner's formula (`llmslim.memory.activations`) and its error against the measurement.
Targets: sqrt <= 1/3 of none's memory at <= 1.4x its time; the formula within 15%; on a GPU the
best policy with offload <= 1/10 of none's device memory.

Writes benchmarks/results/bench_checkpointing.json and .png, and prints a markdown table
(`python benchmarks/render.py` puts it in benchmarks/README.md; a CUDA run's JSON is committed as
bench_checkpointing_cuda.json).

    python benchmarks/bench_checkpointing.py                    # the full run (quiet machine)
    python benchmarks/bench_checkpointing.py --layers 4 --seq 64 --hidden 64 --repeats 1 --results /tmp/bc   # smoke test
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING

from _harness import RESULTS_DIR, publish, pyplot, save_figure, torch_info

if TYPE_CHECKING:
    import torch

# README marker -> the committed JSON it is rendered from (render.py)
README_BLOCKS = {"bench_checkpointing": "bench_checkpointing.json", "bench_checkpointing_cuda": "bench_checkpointing_cuda.json"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--vocab", type=int, default=1024, help="small, so that the blocks dominate")
    p.add_argument(
        "--segments", type=int, nargs="*", default=None, help="k values besides none/all/sqrt (default: 2 and the planner's best)"
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--results", default=str(RESULTS_DIR))
    return p.parse_args(argv)


def build(args: argparse.Namespace):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=int(2.75 * args.hidden),
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        vocab_size=args.vocab,
        max_position_embeddings=args.seq,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").to(args.device).requires_grad_(False)
    return model, config


def make_step(model, ids: torch.Tensor):
    import torch

    def step() -> None:
        embeds = model.get_input_embeddings()(ids).requires_grad_(True)
        logits = model(inputs_embeds=embeds, use_cache=False).logits
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()

    return step


def step_time(step, device: str, repeats: int) -> float:
    import torch

    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cases(args: argparse.Namespace, best: int) -> list[tuple[str | int, bool]]:
    from llmslim.memory import n_segments

    ks = args.segments if args.segments is not None else sorted({2, best} - {args.layers, n_segments("sqrt", args.layers)})
    policies: list[str | int] = ["none", "all", "sqrt", *ks]
    offloads = (False, True) if args.device == "cuda" else (False,)  # offload moves nothing on CPU
    return [(policy, offload) for offload in offloads for policy in policies]


def run(args: argparse.Namespace) -> dict:
    import torch

    from llmslim.memory import enable_checkpointing, n_segments
    from llmslim.memory.activations import activation_costs
    from llmslim.memory.measure import peak_memory

    model, config = build(args)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).to(args.device)
    step = make_step(model, ids)
    costs = activation_costs(config, args.batch, args.seq)
    rows = []
    for policy, offload in cases(args, costs.best_segments()):
        enable_checkpointing(model, policy, offload)
        step()  # warm-up
        seconds = step_time(step, args.device, args.repeats)  # before the profiler runs, which slows what follows
        _, peak = peak_memory(step, args.device)
        predicted = None if offload else costs.peak(policy)
        rows.append(
            {
                "policy": str(policy),
                "offload": offload,
                "segments": n_segments(policy, args.layers),
                "peak_bytes": peak,
                "step_s": seconds,
                "predicted_bytes": predicted,
                "formula_error": None if predicted is None else predicted / peak - 1,
            }
        )
    base = next(r for r in rows if r["policy"] == "none" and not r["offload"])
    for row in rows:
        row["memory_vs_none"] = row["peak_bytes"] / base["peak_bytes"]
        row["time_vs_none"] = row["step_s"] / base["step_s"]
    return {"rows": rows, "costs": vars(costs), "best_segments": costs.best_segments()}


def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for row in result["rows"]:
        label = row["policy"] + (" +offload" if row["offload"] else "")
        ax.scatter(row["time_vs_none"], row["peak_bytes"] / 2**20, label=label)
    ax.set_xlabel("step time / none")
    ax.set_ylabel("peak activation memory (MiB)")
    ax.set_title("activation checkpointing: memory vs time")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def markdown(result: dict) -> str:
    lines = ["| policy | offload | segments | peak MiB | vs none | step s | vs none | formula MiB | formula error |", "|---" * 9 + "|"]
    for r in result["rows"]:
        formula = "" if r["predicted_bytes"] is None else f"{r['predicted_bytes'] / 2**20:.1f}"
        error = "" if r["formula_error"] is None else f"{100 * r['formula_error']:+.1f}%"
        lines.append(
            f"| {r['policy']} | {r['offload']} | {r['segments']} | {r['peak_bytes'] / 2**20:.1f} | {r['memory_vs_none']:.3f} | "
            f"{r['step_s']:.3f} | {r['time_vs_none']:.2f}x | {formula} | {error} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = run(args)
    result["settings"] = {k: v for k, v in vars(args).items() if k != "results"}
    result["machine"] = torch_info()
    print(publish("bench_checkpointing", result, Path(args.results), markdown, plot, readme_section=None, indent=1))
    print(f"planner's best number of segments: {result['best_segments']} of {args.layers}")


if __name__ == "__main__":
    main()
