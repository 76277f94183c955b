"""One decode token's 4-bit matmuls on CPU: the integer-dot kernels against the 16-bit-table kernel, per projection.

For every projection of SmolLM2-135M and of the TinyLlama-1.1B shape (SmolLM2's 49,152-token head), random weights
(normal, std 0.02) quantized to NF4 (blocks of 64, double-quantized absmax, as `SlimConfig(weights="nf4")`) and to
llmslim int4 (groups of 64), one bf16 token times the weight through:

- `table`: `mm_4bit`, the codes looked up in a 16-entry table and multiplied in float32 (what decode runs today);
- `int-dot`: `mm_4bit_q8` (NF4) / `mm_int4_q8` (int4), the activations as two int8 rows per 32 elements (the value,
  then its rounding's remainder), NF4's values as int8 steps of 1/127, integer dot products per block.

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
BLOCK = 64


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds per kernel and shape, median taken (default 7)")
    p.add_argument("--calls", type=int, default=20, help="calls timed per round (default 20)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--results", default=str(RESULTS_DIR))
    return p.parse_args(argv)


def kernels_for(fmt: str, weight, x):
    """(table call, integer-dot call or None where it is not built here) for one weight."""
    import torch

    from llmslim.quant import formats, kernels

    n, k = weight.shape
    if fmt == "nf4":
        absmax, _, nested_absmax, nested_map, nested_offset = kernels._scale_args(weight)
        table = lambda: torch.ops.llmslim.mm_4bit(x, weight.codes, formats.code_4bit("nf4"), *kernels._scale_args(weight), n, BLOCK, k)  # noqa: E731
        if not kernels._nf4_q8_kernel():
            return table, None
        levels = kernels.NF4_INT8_LEVELS
        q8 = lambda: torch.ops.llmslim.mm_4bit_q8(x, weight.codes, levels, absmax, nested_absmax, nested_map, nested_offset, n, BLOCK)  # noqa: E731
        return table, q8
    lut, width = formats.int4_lut(), weight.groups * weight.group_size
    table = lambda: torch.ops.llmslim.mm_4bit(x, weight.codes, lut, weight.scale, weight.zero, None, None, None, n, BLOCK, width)  # noqa: E731
    if not kernels._int4_q8_kernel():
        return table, None
    return table, lambda: torch.ops.llmslim.mm_int4_q8(x, weight.codes, weight.scale, weight.zero, n, BLOCK)


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
    calls = dict(zip(("table", "int-dot"), kernels_for(fmt, weight, x), strict=True))
    times: dict[str, list[float]] = {name: [] for name, call in calls.items() if call is not None}
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
    labels, table, intdot = [], [], []
    for model, formats_ in result["per_token"].items():
        for fmt, row in formats_.items():
            labels.append(f"{model} {fmt}")
            table.append(row["table_ms"])
            intdot.append(row["int-dot_ms"] or 0.0)
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ys = range(len(labels))
    ax.barh([y - 0.2 for y in ys], table, height=0.4, label="table (mm_4bit)")
    ax.barh([y + 0.2 for y in ys], intdot, height=0.4, label="int-dot (two int8 rows)")
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
        "int-dot / table < 1 means the integer-dot kernel is faster.",
        "",
        "| model | projection (out x in) | format | table ms | int-dot ms | int-dot / table | table rel. error | int-dot rel. error |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for model, projections in result["rows"].items():
        for name, formats_ in projections.items():
            for fmt, row in formats_.items():
                q8 = row.get("int-dot")
                ratio = f"{q8['ms'] / row['table']['ms']:.2f}" if q8 else "not built"
                lines.append(
                    f"| {model} | {name} ({row['out_features']} x {row['in_features']}) | {fmt} | {row['table']['ms']:.3f} | "
                    + (
                        f"{q8['ms']:.3f} | {ratio} | {row['table']['rel_error']:.1e} | {q8['rel_error']:.1e} |"
                        if q8
                        else f" | {ratio} | {row['table']['rel_error']:.1e} | |"
                    )
                )
    lines += ["", "| model | format | table ms per token | int-dot ms per token | int-dot / table |", "|---|---|---:|---:|---:|"]
    for model, formats_ in result["per_token"].items():
        for fmt, row in formats_.items():
            q8 = row["int-dot_ms"]
            lines.append(
                f"| {model} | {fmt} | {row['table_ms']:.2f} | " + (f"{q8:.2f} | {q8 / row['table_ms']:.2f} |" if q8 else "| not built |")
            )
    return "\n".join(lines)


def per_token(rows: dict) -> dict:
    """Per model and format: ms of the 4-bit matmuls one decoded token runs, through each kernel."""
    out: dict = {}
    for model, projections in rows.items():
        for fmt in FORMATS:
            table = sum(SHAPES[model][name][2] * formats_[fmt]["table"]["ms"] for name, formats_ in projections.items())
            built = all("int-dot" in formats_[fmt] for formats_ in projections.values())
            q8 = sum(SHAPES[model][name][2] * formats_[fmt]["int-dot"]["ms"] for name, formats_ in projections.items()) if built else None
            out.setdefault(model, {})[fmt] = {"table_ms": table, "int-dot_ms": q8}
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
                        f"{model} {name} {fmt}: "
                        + ", ".join(f"{kind} {row[kind]['ms']:.3f} ms" for kind in ("table", "int-dot") if kind in row),
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
