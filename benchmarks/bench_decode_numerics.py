"""What decode's numerics cost in perplexity: SmolLM2 scored one token at a time through the KV cache, as `generate` runs.

Perplexity tables (bench_quality) score windows of tokens in one forward, which never takes the decode-only paths:
the int8 decode head (`SlimConfig.decode_head`) and the lean decode step (`llmslim.hf.decode`, on AVX-512 BF16 its
fused operators). Here each window of `--window` tokens of WikiText-2 (the first `--tokens`) is fed one token per
forward with a DynamicCache, and every next token is scored from that step's logits, for:

- `standard layers, float head`: transformers' layer forward, the bf16 head (the reference);
- `standard layers, row-wise int8 head`: the int8 head with one absmax per row, as where llmslim's AVX-512 kernel is
  not built (PyTorch's weight-only int8 kernel), and as the default was before 2026-12-05;
- `standard layers, int8 head`: the default head alone (one absmax per row and block of 128 columns where the AVX-512
  kernel runs);
- `lean step, int8 head`: llmslim's defaults (what `generate` runs);
- on a CPU where llmslim's AVX2 kernels are built, first `standard layers, float head, table kernel`: the 4-bit
  layers on the table kernel (`mm_4bit`: bf16 levels, float32 sums; `kernels.I16_4BIT_MAX_TOKENS = 0`), the reference
  there, against which the other rows show what `mm_4bit_i16` (16-bit integer levels and activations) changes.

One process, one nf4 model, the settings switched in place (`use_standard_layers` / `use_lean_layers`,
`use_float_head` / `use_int8_decode_head`). Writes benchmarks/results/bench_decode_numerics.json and .png and the table
into benchmarks/README.md.

    python benchmarks/bench_decode_numerics.py                       # 20480 tokens, ~32 min on 2 cores
    python benchmarks/bench_decode_numerics.py --tokens 1024 --results /tmp/dn   # quick
"""

from __future__ import annotations

import argparse
import math
import time
from contextlib import contextmanager
from pathlib import Path

from _harness import RESULTS_DIR, machine_info, publish, pyplot, save_figure

README_BLOCKS = {"bench_decode_numerics": "bench_decode_numerics.json"}  # README marker -> the committed JSON (render.py)
README_SECTION = (
    "## Decode's numerics in perplexity (`benchmarks/bench_decode_numerics.py`)\n\n"
    "SmolLM2-135M nf4, WikiText-2, every token scored from a one-token decode step through the KV cache. "
    "Results: `benchmarks/results/bench_decode_numerics.json` and `.png`."
)
ROW_WISE = "standard layers, row-wise int8 head"
TABLE_KERNEL = "standard layers, float head, table kernel"
SETTINGS = ("standard layers, float head", ROW_WISE, "standard layers, int8 head", "lean step, int8 head")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=20480, help="WikiText-2 tokens scored (default 20480, as issue 21 asks)")
    p.add_argument("--window", type=int, default=1024, help="tokens per cache (default 1024)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip", default="", help="semicolon list of settings not to run (the first one run is the reference)")
    p.add_argument("--results", default=str(RESULTS_DIR))
    return p.parse_args(argv)


def stepwise_nll(model, ids, window: int) -> tuple[float, int]:
    """Summed negative log-likelihood of each next token, each from a one-token step through a fresh cache per window."""
    import torch
    from transformers import DynamicCache

    total, count = 0.0, 0
    for start in range(0, ids.numel() - 1, window):
        chunk = ids[start : start + window + 1]
        cache = DynamicCache(config=model.config)
        for i in range(chunk.numel() - 1):
            logits = model(chunk[i : i + 1].view(1, 1), past_key_values=cache, use_cache=True).logits[0, -1].float()
            total += float(torch.logsumexp(logits, -1) - logits[chunk[i + 1]])
            count += 1
    return total, count


def apply(model, setting: str) -> None:
    from llmslim.hf.decode import use_lean_layers, use_standard_layers
    from llmslim.quant.head import use_float_head, use_int8_decode_head

    (use_lean_layers if setting.startswith("lean") else use_standard_layers)(model)
    use_float_head(model)  # drops the int8 copy: the setting's first decode step builds the one it asks for
    if setting.endswith("int8 head"):
        use_int8_decode_head(model)


@contextmanager
def table_kernel(on: bool):
    """While `on`, 4-bit decode rows take the table kernel (`mm_4bit`) instead of `mm_4bit_i16`."""
    from llmslim.quant import kernels

    limit = kernels.I16_4BIT_MAX_TOKENS
    if on:
        kernels.I16_4BIT_MAX_TOKENS = 0
    try:
        yield
    finally:
        kernels.I16_4BIT_MAX_TOKENS = limit


@contextmanager
def row_wise_head(on: bool):
    """While `on`, an int8 head copy built is row-wise (`kernels.int8_blocks_usable` says no), as without the AVX-512
    kernel."""
    from llmslim.quant import kernels

    usable = kernels.int8_blocks_usable
    if on:
        kernels.int8_blocks_usable = lambda weight: False
    try:
        yield
    finally:
        kernels.int8_blocks_usable = usable


def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    names = list(result["rows"])
    fig, ax = plt.subplots(figsize=(7, 2.8))
    ax.barh(names, [result["rows"][n]["vs_reference_pct"] for n in names])
    ax.set_xlabel(f"perplexity vs {names[0]} (%)")
    ax.invert_yaxis()
    save_figure(fig, path)


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [
        f"Measured {result['machine']['date']} on {result['machine']['cpu']} ({', '.join(result['machine']['simd'])}), "
        f"{s['threads']} threads; the first {result['scored']} next tokens of WikiText-2, windows of {s['window']}.",
        "",
        "| setting | perplexity | vs reference | ms per step |",
        "|---|---:|---:|---:|",
    ]
    for name, row in result["rows"].items():
        lines.append(f"| {name} | {row['perplexity']:.4f} | {row['vs_reference_pct']:+.3f}% | {row['ms_per_step']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import torch
    from transformers import AutoTokenizer

    import llmslim
    from llmslim import models
    from llmslim.data import WIKITEXT2_TEST
    from llmslim.evaluate import load_tokens
    from llmslim.quant import kernels, native

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    path = models.resolve(None)
    ids = load_tokens(AutoTokenizer.from_pretrained(path), WIKITEXT2_TEST, args.tokens)
    model = llmslim.from_pretrained(path, llmslim.SlimConfig(weights="nf4"), progress=False)
    rows = {}
    order = ((TABLE_KERNEL,) if native.load_ops() and kernels._i16_kernel() else ()) + SETTINGS
    skipped = {name.strip() for name in args.skip.split(";") if name.strip()}
    unknown = skipped - set(order)
    if unknown:
        raise SystemExit(f"--skip names no setting: {sorted(unknown)}; the settings here: {list(order)}")
    order = tuple(name for name in order if name not in skipped)
    with torch.inference_mode():
        for setting in order:
            apply(model, setting.removesuffix(", table kernel"))
            start = time.perf_counter()
            with row_wise_head(setting == ROW_WISE), table_kernel(setting == TABLE_KERNEL):
                nll, count = stepwise_nll(model, ids, args.window)
            rows[setting] = {"perplexity": math.exp(nll / count), "ms_per_step": 1000 * (time.perf_counter() - start) / count}
            print(f"{setting}: {rows[setting]['perplexity']:.4f}", flush=True)
    reference = rows[order[0]]["perplexity"]
    for row in rows.values():
        row["vs_reference_pct"] = 100 * (row["perplexity"] / reference - 1)
    machine = machine_info() | {"torch_threads": torch.get_num_threads()}
    settings = {k: v for k, v in vars(args).items() if k != "results"}
    result = {"rows": rows, "scored": count, "settings": settings, "machine": machine}
    print(publish("bench_decode_numerics", result, Path(args.results), markdown, plot, readme_section=README_SECTION, indent=1))


if __name__ == "__main__":
    main()
