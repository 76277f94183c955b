"""Perplexity of SmolLM2-135M-Instruct on WikiText-2 per weight format, llmslim vs transformers+bitsandbytes.

Convention of ../shared/data/README.md (first 20,000 tokens, 512-token windows). Writes
benchmarks/results/bench_quality.json and .png and the table in benchmarks/README.md between the
`bench_quality` markers. Bits per parameter count every code, scale and absmax of the quantized
layers (the float embedding and norms are reported separately through the footprint).

    python benchmarks/bench_quality.py [--tokens 20000] [--text PATH]
    python benchmarks/bench_quality.py --cases llmslim-nf4-head8 --merge   # add cases to the last results
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _harness import RESULTS_DIR, publish, pyplot, read_json, save_figure, utc_now
from _models import bnb_config, load_bf16, load_quanto

README_BLOCKS = {"bench_quality": "bench_quality.json"}  # README marker -> the committed JSON it is rendered from (render.py)
README_SECTION = "## Perplexity per format (`benchmarks/bench_quality.py`)"
# llmslim-FORMAT[-gGROUP][-refine][-tTHRESHOLD][-bBITS][-head8]: SlimConfig(weights=FORMAT, block_size=GROUP, refine=True,
# int8_threshold=THRESHOLD, bits_per_param=BITS; head8: exclude=[], int8_layers=["lm_head"], an int8 copy of the tied head)
CASES = (
    "bf16",
    "llmslim-int8",
    "llmslim-int8-t6",
    "llmslim-nf4",
    "llmslim-nf4-head8",
    "llmslim-fp4",
    "llmslim-int4-g32",
    "llmslim-int4-g64",
    "llmslim-int4-g64-refine",
    "llmslim-int4-g128",
    "llmslim-int4-g128-refine",
    "llmslim-int4-g64-b5",
    "llmslim-int4-g64-refine-b5",
    "llmslim-int4-g128-refine-b4.6",
    "bnb-int8",
    "bnb-nf4",
    "quanto-int8",
    "quanto-int4",
)


def slim_config(case: str):
    """The SlimConfig a `llmslim-...` case name stands for."""
    import llmslim

    weights, *options = case.removeprefix("llmslim-").split("-")
    kwargs = {}
    for option in options:
        if option == "refine":
            kwargs["refine"] = True
        elif option.startswith("g") and option[1:].isdigit():
            kwargs["block_size"] = int(option[1:])
        elif option.startswith("b"):
            kwargs["bits_per_param"] = float(option[1:])
        elif option.startswith("t"):
            kwargs["int8_threshold"] = float(option[1:])
        elif option == "head8":
            kwargs.update(exclude=[], int8_layers=["lm_head"])
        else:
            raise ValueError(f"unknown option {option!r} in case {case!r}")
    return llmslim.SlimConfig(weights=weights, **kwargs)


def load_case(case: str, path: Path):
    import torch
    from transformers import AutoModelForCausalLM

    import llmslim

    if case == "bf16":
        return load_bf16(path)
    if case.startswith("llmslim-"):
        return llmslim.from_pretrained(path, slim_config(case), dtype=torch.bfloat16, progress=False)
    if case.startswith("quanto-"):
        return load_quanto(path, bits=8 if case == "quanto-int8" else 4)
    if case == "bnb-int8":
        return AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb_config(8), dtype=torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb_config(4))


def quantized_bits_per_param(model) -> float | None:
    """Bits per weight of the llmslim-quantized layers, scales and absmax included."""
    from llmslim.quant.modules import quantized_layers

    layers = [layer for _, layer in quantized_layers(model)]
    if not layers:
        return None
    params = sum(layer.in_features * layer.out_features for layer in layers)
    return 8 * sum(layer.quantized_nbytes() for layer in layers) / params


def measure(cases: tuple[str, ...], tokens: int, text: Path) -> dict:
    import torch
    from transformers import AutoTokenizer

    from llmslim import models
    from llmslim.evaluate import load_tokens, perplexity
    from llmslim.stats import model_nbytes

    path = models.resolve(None)
    ids = load_tokens(AutoTokenizer.from_pretrained(path), text, tokens)
    rows = {}
    for case in cases:
        model = load_case(case, path)
        with torch.no_grad():  # optimum-quanto's tensors fail under inference_mode
            result = perplexity(model, ids, progress=False)
        rows[case] = {
            "perplexity": result.perplexity,
            "bits_per_param_quantized_layers": quantized_bits_per_param(model),
            "footprint_mib": model_nbytes(model) / 2**20,
        }
        print(f"{case:14s} perplexity {result.perplexity:.2f}", flush=True)
        del model
    base = rows.get("bf16", {}).get("perplexity")
    for row in rows.values():
        row["vs_bf16"] = row["perplexity"] / base if base else None
    return {"date": utc_now(), "tokens": tokens, "text": str(text), "cases": rows}


def markdown(result: dict) -> str:
    lines = [
        f"SmolLM2-135M-Instruct, WikiText-2 test, first {result['tokens']} tokens, 512-token windows; measured {result['date']}.",
        "",
        "| case | perplexity | × bf16 | bits/param (quantized layers) | footprint MiB |",
        "|---|---:|---:|---:|---:|",
    ]
    for case, row in result["cases"].items():
        bits = row["bits_per_param_quantized_layers"]
        ratio = row["vs_bf16"]
        lines.append(
            f"| {case} | {row['perplexity']:.2f} | {ratio:.3f} | {'' if bits is None else f'{bits:.2f}'} | {row['footprint_mib']:.1f} |"
        )
    for again in result.get("remeasured", []):  # later partial runs merged in (`--merge`), each with its own bf16
        cases = ", ".join(again["cases"])
        lines += ["", f"Measured {again['date']}: {cases} (bf16 in that run: {again['bf16_same_run']:.2f}). {again['note']}"]
    lines += [
        "",
        "Bits/param of bitsandbytes' and optimum-quanto's layers are not counted here (their quant state is not in the module's tensors).",
        "",
        "Caveat: SmolLM2's weights reached us as GGUF Q4_1 (int4, group 32, min/max), so `int4-g32` reproduces them almost",
        "exactly and says little about int4 itself; quote int4 at group 64 or 128. `-refine` is `SlimConfig(refine=True)`",
        "(HQQ zero-point optimisation, then a least-squares refit of scale and zero); `int8-t6` is `int8_threshold=6`",
        "(the default, 1.5, keeps more activation columns in float in the CPU LLM.int8 prompt path).",
    ]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Perplexity per case."""
    plt = pyplot()
    cases = list(result["cases"])
    fig, ax = plt.subplots(figsize=(8, 4))
    bars = ax.bar(cases, [result["cases"][c]["perplexity"] for c in cases], color="tab:blue")
    ax.bar_label(bars, fmt="%.2f")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title(f"SmolLM2-135M-Instruct, WikiText-2 ({result['tokens']} tokens)")
    fig.autofmt_xdate(rotation=20)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=20_000)
    parser.add_argument("--text", type=Path, default=None, help="WikiText-2's wiki.test.raw (default: the copy shipped in llmslim.data)")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma list of {', '.join(CASES)}")
    parser.add_argument("--merge", action="store_true", help="measure --cases (and bf16) and merge them into the saved results")
    args = parser.parse_args()
    if args.text is None:
        from llmslim.data import WIKITEXT2_TEST  # shipped with llmslim (= ../shared/data, byte for byte)

        args.text = WIKITEXT2_TEST
    if not args.text.exists():
        raise SystemExit(f"{args.text} does not exist: pass --text with WikiText-2's wiki.test.raw")
    cases = tuple(args.cases.split(","))
    if args.merge:
        result = merged(cases, args)
    else:
        result = measure(cases, args.tokens, args.text)
    print(publish("bench_quality", result, RESULTS_DIR, markdown, plot, README_SECTION))


MERGE_NOTES = {
    "llmslim-int8": (
        "int8 after the LLM.int8 prompt path started computing every column in 16 bits when more than half are outliers "
        "(17 of SmolLM2's 210 matmuls on a 512-token window)."
    ),
    "llmslim-nf4-head8": (
        "`-head8`: the tied output head as its own int8 copy (the embedding stays bf16; the copy is counted in the footprint)."
    ),
}


def merged(cases: tuple[str, ...], args: argparse.Namespace) -> dict:
    """Measure `cases` with bf16 in the same run and merge them into the existing bench_quality.json."""
    previous = read_json(RESULTS_DIR / "bench_quality.json")
    if previous["tokens"] != args.tokens:
        raise SystemExit(f"--merge needs the same --tokens as the saved results ({previous['tokens']}), got {args.tokens}")
    run = measure(tuple(dict.fromkeys(("bf16", *cases))), args.tokens, args.text)
    base = previous["cases"]["bf16"]["perplexity"]
    for case in cases:
        previous["cases"][case] = {**run["cases"][case], "vs_bf16": run["cases"][case]["perplexity"] / base}
    notes = " ".join(MERGE_NOTES.get(case, "") for case in cases).strip()
    entry = {"date": run["date"], "cases": list(cases), "bf16_same_run": run["cases"]["bf16"]["perplexity"], "note": notes}
    previous.setdefault("remeasured", []).append(entry)
    return previous


if __name__ == "__main__":
    main()
