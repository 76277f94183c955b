"""Where a decoded token's time goes on CPU: llmslim's kernels, dense matmuls, attention, other operators, and outside them.

SmolLM2-135M (the embedded model) at batch 1, greedy: each setting is loaded, warmed up with one generation, timed
over `--tokens` new tokens without the profiler (median of `--repeats`), then one more generation runs under
`torch.profiler`, whose per-operator self times are summed by kind:

- llmslim kernels: `llmslim::*` operators (4-bit and int8 matmuls, the int8 decode head);
- dense matmuls: `aten::mm` / `addmm` / `bmm` / `_weight_int8pack_mm` (float heads and layers left in 16 bits);
- attention: `aten::scaled_dot_product_attention` and what it calls;
- other operators: every other `aten::` operator (norms, rotary, activations, copies, the cache, sampling);
- outside operators: the profiled wall time less all operator time (Python, dispatch, `generate`'s own logic;
  the profiler's own cost lands here too, so this share is an upper bound).

Each share is applied to the unprofiled ms/token. "first generation s" is the first `generate` call of `--tokens`
(with `compile_decode`, its compile). Settings: llmslim's defaults (`SlimConfig(weights="nf4")`, with
the int8 decode head), the same with `decode_head="float"`, and the defaults with `llmslim.compile_decode`.

Writes benchmarks/results/bench_token_time.json and .png, and the table into benchmarks/README.md.

    python benchmarks/bench_token_time.py
    python benchmarks/bench_token_time.py --tokens 16 --repeats 1 --results /tmp/tt   # quick
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from _harness import RESULTS_DIR, machine_info, publish, pyplot, save_figure

README_BLOCKS = {"bench_token_time": "bench_token_time.json"}  # README marker -> the committed JSON (render.py)
README_SECTION = (
    "## Where a decoded token's time goes (`benchmarks/bench_token_time.py`)\n\n"
    "SmolLM2-135M, batch 1, CPU: unprofiled ms per new token, split by the profiler's per-operator self times. "
    "Results: `benchmarks/results/bench_token_time.json` and `.png`."
)
SETTINGS = {
    "nf4 (defaults: int8 decode head)": {"weights": "nf4"},
    "nf4, float head": {"weights": "nf4", "decode_head": "float"},
    "nf4 (defaults), compile_decode": {"weights": "nf4", "compile": True},
}
KINDS = ("llmslim kernels", "dense matmuls", "attention", "other operators", "outside operators")
DENSE = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::_weight_int8pack_mm")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=64, help="new tokens per generation (default 64)")
    p.add_argument("--prompt-tokens", type=int, default=32, help="prompt length (default 32)")
    p.add_argument("--repeats", type=int, default=3, help="unprofiled timed generations, median taken (default 3)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--results", default=str(RESULTS_DIR))
    return p.parse_args(argv)


def kind_of(name: str) -> str | None:
    """The kind of a profiled operator, or None for what is not an operator (profiler annotations, Python scopes)."""
    if name.startswith("llmslim::"):
        return "llmslim kernels"
    if name in DENSE:
        return "dense matmuls"
    if "attention" in name or name.startswith("aten::_scaled_dot") or name.startswith("aten::_flash"):
        return "attention"
    if name.startswith(("aten::", "prims::", "inductor::", "quantized::")) or "Torch-Compiled Region" in name:
        return "other operators"
    return None


def measure(name: str, setting: dict, args: argparse.Namespace) -> dict:
    import torch

    import llmslim
    from llmslim import models

    options = dict(setting)
    compiled = options.pop("compile", False)
    model = llmslim.from_pretrained(models.resolve(None), llmslim.SlimConfig(**options), progress=False)
    if compiled:
        llmslim.compile_decode(model, max_cache_len=args.prompt_tokens + args.tokens + 8)
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))

    def generate(tokens: int) -> float:
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=tokens, eos_token_id=None, do_sample=False, pad_token_id=0)  # exactly `tokens`
        return time.perf_counter() - start

    with torch.inference_mode():
        warmup_s = generate(args.tokens)  # builds the decode head's copy; compiles (compile_decode)
        first = statistics.median(generate(1) for _ in range(args.repeats))  # the prompt and the first token
        total = statistics.median(generate(args.tokens) for _ in range(args.repeats))
        ms_per_token = 1000 * (total - first) / (args.tokens - 1)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            profiled_s = generate(args.tokens)
    self_us = dict.fromkeys(KINDS[:-1], 0.0)
    for event in prof.key_averages():
        kind = kind_of(event.key)
        if kind is not None:
            self_us[kind] += event.self_cpu_time_total
    operator_s = sum(self_us.values()) / 1e6
    seconds = {**{k: v / 1e6 for k, v in self_us.items()}, "outside operators": max(profiled_s - operator_s, 0.0)}
    shares = {k: v / profiled_s for k, v in seconds.items()}
    print(f"{name}: {ms_per_token:.2f} ms/token, " + ", ".join(f"{k} {100 * v:.0f}%" for k, v in shares.items()), flush=True)
    return {
        "setting": setting,
        "ms_per_token": ms_per_token,
        "tok_s": 1000 / ms_per_token,
        "first_token_s": first,
        "warmup_s": warmup_s,  # the first generation: with compile_decode, the compile
        "profiled_s": profiled_s,
        "shares": shares,
        "ms_per_token_by_kind": {k: v * ms_per_token for k, v in shares.items()},
    }


def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    names = list(result["rows"])
    fig, ax = plt.subplots(figsize=(8, 3.5))
    left = [0.0] * len(names)
    for kind in KINDS:
        values = [result["rows"][n]["ms_per_token_by_kind"][kind] for n in names]
        ax.barh(names, values, left=left, label=kind)
        left = [a + b for a, b in zip(left, values, strict=True)]
    ax.set_xlabel("ms per decoded token (SmolLM2-135M, batch 1)")
    ax.invert_yaxis()
    ax.legend(fontsize=7, loc="lower right")
    save_figure(fig, path)


def markdown(result: dict) -> str:
    lines = [
        f"Measured {result['machine']['date']} on {result['machine']['cpu']} ({', '.join(result['machine']['simd'])}), "
        f"{result['settings']['threads']} threads, {result['settings']['tokens']} new tokens after a "
        f"{result['settings']['prompt_tokens']}-token prompt.",
        "",
        "| setting | tok/s | ms/token | first generation s | " + " | ".join(KINDS) + " |",
        "|---|---:|---:|---:|" + "---:|" * len(KINDS),
    ]
    for name, row in result["rows"].items():
        parts = " | ".join(f"{row['ms_per_token_by_kind'][k]:.2f} ({100 * row['shares'][k]:.0f}%)" for k in KINDS)
        lines.append(f"| {name} | {row['tok_s']:.1f} | {row['ms_per_token']:.2f} | {row['warmup_s']:.1f} | {parts} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import torch

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = {name: measure(name, setting, args) for name, setting in SETTINGS.items()}
    machine = machine_info() | {"torch_threads": torch.get_num_threads()}
    result = {"rows": rows, "settings": {k: v for k, v in vars(args).items() if k != "results"}, "machine": machine}
    print(publish("bench_token_time", result, Path(args.results), markdown, plot, readme_section=README_SECTION, indent=1))


if __name__ == "__main__":
    main()
