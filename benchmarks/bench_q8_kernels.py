"""One decode token's 4-bit matmuls on CPU: the integer-dot kernels against the 16-bit-table kernel, per projection.

For every projection of SmolLM2-135M and of the TinyLlama-1.1B shape (SmolLM2's 49,152-token head), random weights
(normal, std 0.02) quantized to NF4 (blocks of 64, double-quantized absmax, as `SlimConfig(weights="nf4")`) and to
llmslim int4 (groups of 64), one bf16 token times the weight through:

- `table`: `mm_4bit`, the codes looked up in a 16-entry table and multiplied in float32 (what decode runs today);
- `int-dot`: `mm_4bit_q8` (NF4) / `mm_int4_q8` (int4), the activations as two int8 rows per 32 elements (the value,
  then its rounding's remainder), NF4's values as int8 steps of 1/127, integer dot products per block;
- `i16` (NF4, AVX2 build): `mm_4bit_i16`, NF4's values as 16-bit integer levels (x 8191) times the activations as
  int16 per 64 columns, exact products summed in int32 per 64 columns (what NF4 decode runs on AVX2 since 2026-12-06).

Each kernel is called in rounds interleaved with the other (the machine is shared and noisy), median ms per call;
"per token" sums a model's projections as one decoded token calls them (every layer, and the head). The relative
error is against the float32 product with the dequantized weight. Issue 21 wants the integer-dot path where it is
faster and costs <= 0.1% perplexity (bench_quality's `-q8` cases measure the perplexity).

Writes benchmarks/results/bench_q8_kernels.json and .png, and the table into benchmarks/README.md.

    python benchmarks/bench_q8_kernels.py
    python benchmarks/bench_q8_kernels.py --rounds 3 --calls 3 --results /tmp/q8k   # quick
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from _harness import RESULTS_DIR, machine_info, publish, pyplot, save_figure

README_BLOCKS = {"bench_q8_kernels": "bench_q8_kernels.json"}  # README marker -> the committed JSON (render.py)
README_SECTION = (
    "## Integer-dot 4-bit decode kernels against the table kernel (`benchmarks/bench_q8_kernels.py`)\n\n"
    "One bf16 token times each projection's 4-bit weight, CPU, ms per call (median of interleaved rounds). "
    "Results: `benchmarks/results/bench_q8_kernels.json` and `.png`."
)
# model -> projection -> (out_features, in_features, calls per decoded token)
SHAPES = {
    "SmolLM2-135M": {
        "q/o": (576, 576, 2 * 30),
        "k/v": (192, 576, 2 * 30),
        "gate/up": (1536, 576, 2 * 30),
        "down": (576, 1536, 30),
        "head": (49152, 576, 1),
    },
    "1.1B shape": {
        "q/o": (2048, 2048, 2 * 22),
        "k/v": (256, 2048, 2 * 22),
        "gate/up": (5632, 2048, 2 * 22),
        "down": (2048, 5632, 22),
        "head": (49152, 2048, 1),
    },
}
FORMATS = ("nf4", "int4")
KERNELS = ("table", "int-dot", "i16")
BLOCK = 64


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds per kernel and shape, median taken (default 7)")
    p.add_argument("--calls", type=int, default=20, help="calls timed per round (default 20)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--results", default=str(RESULTS_DIR))
    return p.parse_args(argv)


def kernels_for(fmt: str, weight, x) -> dict:
    """{kernel: call} for one weight, the kernels of KERNELS built here for its format."""
    import torch

    from llmslim.quant import formats, kernels

    n, k = weight.shape
    if fmt == "nf4":
        absmax, _, nested_absmax, nested_map, nested_offset = kernels._scale_args(weight)
        lut, levels = formats.code_4bit("nf4"), kernels.NF4_INT8_LEVELS
        calls = {"table": lambda: torch.ops.llmslim.mm_4bit(x, weight.codes, lut, *kernels._scale_args(weight), n, BLOCK, k)}
        if kernels._nf4_q8_kernel():
            calls["int-dot"] = lambda: torch.ops.llmslim.mm_4bit_q8(
                x, weight.codes, levels, absmax, nested_absmax, nested_map, nested_offset, n, BLOCK
            )
        if kernels._i16_kernel():
            calls["i16"] = lambda: torch.ops.llmslim.mm_4bit_i16(
                x, weight.codes, lut, absmax, nested_absmax, nested_map, nested_offset, n, BLOCK
            )
        return calls
    lut, width = formats.int4_lut(), weight.groups * weight.group_size
    calls = {"table": lambda: torch.ops.llmslim.mm_4bit(x, weight.codes, lut, weight.scale, weight.zero, None, None, None, n, BLOCK, width)}
    if kernels._int4_q8_kernel():
        calls["int-dot"] = lambda: torch.ops.llmslim.mm_int4_q8(x, weight.codes, weight.scale, weight.zero, n, BLOCK)
    return calls


def measure_shape(fmt: str, n: int, k: int, args: argparse.Namespace) -> dict:
    import torch

    from llmslim.quant import formats, kernels

    torch.manual_seed(0)
    dense = torch.randn(n, k) * 0.02
    if fmt == "nf4":
        weight = kernels.quantize_4bit(dense, "nf4", BLOCK, double_quant=True)
        reference = formats.dequantize_4bit(weight, torch.float32)
    else:
        weight = kernels.quantize_int4(dense, BLOCK, refine=False)
        reference = formats.dequantize_int4(weight, torch.float32)
    x = torch.randn(1, k).bfloat16()
    exact = x.float() @ reference.T
    calls = kernels_for(fmt, weight, x)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for name in times:
        calls[name]()  # warm-up
    for _ in range(args.rounds):
        for name in times:
            start = time.perf_counter()
            for _ in range(args.calls):
                calls[name]()
            times[name].append(1000 * (time.perf_counter() - start) / args.calls)
    row = {"out_features": n, "in_features": k}
    for name in times:
        row[name] = {
            "ms": statistics.median(times[name]),
            "rel_error": ((calls[name]().float() - exact).norm() / exact.norm()).item(),
        }
    row["weight_bytes"] = formats.quantized_nbytes([weight.codes])
    return row


def plot(result: dict, path: Path) -> None:
    plt = pyplot()
    labels = [f"{model} {fmt}" for model, formats_ in result["per_token"].items() for fmt in formats_]
    names = {"table": "table (mm_4bit)", "int-dot": "int-dot (two int8 rows)", "i16": "i16 (mm_4bit_i16)"}
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ys = range(len(labels))
    for i, kernel in enumerate(KERNELS):
        ms = [row.get(f"{kernel}_ms") or 0.0 for formats_ in result["per_token"].values() for row in formats_.values()]
        ax.barh([y - 0.27 + 0.27 * i for y in ys], ms, height=0.27, label=names[kernel])
    ax.set_yticks(list(ys), labels)
    ax.set_xlabel("ms of 4-bit matmuls per decoded token (batch 1)")
    ax.invert_yaxis()
    ax.legend(fontsize=7)
    save_figure(fig, path)


def markdown(result: dict) -> str:
    machine = result["machine"]
    lines = [
        f"Measured {machine['date']} on {machine['cpu']} ({', '.join(machine['simd'])}), {result['settings']['threads']} threads, "
        f"median of {result['settings']['rounds']} interleaved rounds of {result['settings']['calls']} calls. "
        "A kernel / table < 1 means that kernel is faster; an empty cell: not built here, or not for that format.",
        "",
        "| model | projection (out x in) | format | table ms | int-dot ms | i16 ms | int-dot / table | i16 / table "
        "| table rel. error | int-dot rel. error | i16 rel. error |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for model, projections in result["rows"].items():
        for name, formats_ in projections.items():
            for fmt, row in formats_.items():
                base = row["table"]["ms"]
                ms = [f"{row[k]['ms']:.3f}" if k in row else "" for k in KERNELS]
                ratios = [f"{row[k]['ms'] / base:.2f}" if k in row else "" for k in KERNELS[1:]]
                errors = [f"{row[k]['rel_error']:.1e}" if k in row else "" for k in KERNELS]
                lines.append(
                    f"| {model} | {name} ({row['out_features']} x {row['in_features']}) | {fmt} | "
                    + " | ".join(ms + ratios + errors)
                    + " |"
                )
    lines += [
        "",
        "| model | format | table ms per token | int-dot ms per token | i16 ms per token | int-dot / table | i16 / table |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for model, formats_ in result["per_token"].items():
        for fmt, row in formats_.items():
            ms = [row.get(f"{k}_ms") for k in KERNELS]
            cells = [f"{v:.2f}" if v else "" for v in ms] + [f"{v / ms[0]:.2f}" if v else "" for v in ms[1:]]
            lines.append(f"| {model} | {fmt} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_token(rows: dict) -> dict:
    """Per model and format: ms of the 4-bit matmuls one decoded token runs, through each kernel."""
    out: dict = {}
    for model, projections in rows.items():
        for fmt in FORMATS:
            for kernel in KERNELS:
                built = all(kernel in formats_[fmt] for formats_ in projections.values())
                total = (
                    sum(SHAPES[model][name][2] * formats_[fmt][kernel]["ms"] for name, formats_ in projections.items()) if built else None
                )
                out.setdefault(model, {}).setdefault(fmt, {})[f"{kernel}_ms"] = total
    return out


def main(argv: list[str] | None = None) -> None:
    import torch

    from llmslim.quant import native

    args = parse_args(argv)
    if not native.load_ops():
        raise SystemExit("llmslim's CPU operators are not built here: this benchmark times them")
    torch.set_num_threads(args.threads)
    rows: dict = {}
    with torch.inference_mode():
        for model, projections in SHAPES.items():
            for name, (n, k, _) in projections.items():
                for fmt in FORMATS:
                    row = measure_shape(fmt, n, k, args)
                    rows.setdefault(model, {}).setdefault(name, {})[fmt] = row
                    print(
                        f"{model} {name} {fmt}: " + ", ".join(f"{kind} {row[kind]['ms']:.3f} ms" for kind in KERNELS if kind in row),
                        flush=True,
                    )
    machine = machine_info() | {"torch_threads": torch.get_num_threads()}
    result = {
        "rows": rows,
        "per_token": per_token(rows),
        "settings": {k: v for k, v in vars(args).items() if k != "results"},
        "machine": machine,
    }
    print(publish("bench_q8_kernels", result, Path(args.results), markdown, plot, readme_section=README_SECTION, indent=1))


if __name__ == "__main__":
    main()
