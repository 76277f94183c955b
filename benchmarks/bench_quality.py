"""Perplexity of SmolLM2-135M-Instruct on WikiText-2 per weight format, llmslim vs transformers+bitsandbytes.

Convention of ../shared/data/README.md (first 20,000 tokens, 512-token windows). Writes
benchmarks/results/bench_quality.json and .png and the table in benchmarks/README.md between the
`bench_quality` markers. Bits per parameter count every code, scale and absmax of the quantized
layers (the float embedding and norms are reported separately through the footprint).

    python benchmarks/bench_quality.py [--tokens 20000] [--text PATH]
    python benchmarks/bench_quality.py --cases llmslim-nf4-head8 --merge   # add cases to the last results
    python benchmarks/bench_quality.py --cases llmslim-nf4-gptq --merge --calibration-cost smollm2,tinyllama

`-gptq` cases calibrate on the Tiny Shakespeare shipped in llmslim.data (never on the evaluation text; 65,536 tokens
in sequences of 512, seed 0). `--calibration-cost` times llmslim's GPTQ-NF4 load of each model in a fresh process
(peak RSS from wait4), next to the same model's round-to-nearest NF4 load.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

from _harness import GIB, RESULTS_DIR, finish_child, machine_info, publish, pyplot, read_json, run_child, save_figure, utc_now
from _models import DEFAULT_TINYLLAMA, bnb_config, load_bf16, load_quanto

README_BLOCKS = {"bench_quality": "bench_quality.json"}  # README marker -> the committed JSON it is rendered from (render.py)
README_SECTION = "## Perplexity per format (`benchmarks/bench_quality.py`)"
# llmslim-FORMAT[-gGROUP][-refine][-gptq][-tTHRESHOLD][-bBITS][-head8][-sdpa]: SlimConfig(weights=FORMAT, block_size=GROUP, refine=True,
# method="gptq", int8_threshold=THRESHOLD, bits_per_param=BITS; head8: exclude=[], int8_layers=["lm_head"], an int8 copy of the
# tied head); sdpa: the model switched back to transformers' SDPA attention (the opt-out of llmslim's prompt attention kernel,
# `llmslim.hf.attention`, which the other llmslim cases take where it is built). bnb-nf4-gptq-export: llmslim's GPTQ-NF4
# saved in bitsandbytes' layout, loaded by stock transformers + bitsandbytes.
CASES = (
    "bf16",
    "llmslim-int8",
    "llmslim-int8-t6",
    "llmslim-nf4",
    "llmslim-nf4-q8",
    "llmslim-nf4-head8",
    "llmslim-nf4-sdpa",
    "llmslim-fp4",
    "llmslim-int4-g32",
    "llmslim-int4-g64",
    "llmslim-int4-g64-q8",
    "llmslim-int4-g64-refine",
    "llmslim-int4-g128",
    "llmslim-int4-g128-refine",
    "llmslim-int4-g64-b5",
    "llmslim-int4-g64-refine-b5",
    "llmslim-int4-g128-refine-b4.6",
    "llmslim-int8-gptq",
    "llmslim-nf4-gptq",
    "llmslim-fp4-gptq",
    "llmslim-int4-g64-gptq",
    "llmslim-int4-g128-gptq",
    "llmslim-int4-g64-gptq-b5",
    "llmslim-int4-g128-refine-gptq-b4.6",
    "llmslim-int4-g64-gptq-b4.6",
    "llmslim-nf4-b4.6",
    "llmslim-nf4-gptq-b4.6",
    "llmslim-nf4-g32-gptq",
    "llmslim-nf4-g32-gptq-b4.6",
    "bnb-int8",
    "bnb-nf4",
    "bnb-nf4-gptq-export",
    "quanto-int8",
    "quanto-int4",
)
# Run only when --llmcompressor-python names a Python with llm-compressor 0.14 (it pins transformers <= 5.17, so it cannot
# share llmslim's environment): its GPTQ (int4, asymmetric, groups of 64) on llmslim's calibration ids, in a child process;
# its fake-quantized weights are scored in bf16 here like every other case.
LLMCOMPRESSOR_CASE = "llmcompressor-int4-g64-gptq"
LLMCOMPRESSOR_PYTHON: list[str] = []  # set from --llmcompressor-python


def slim_config(case: str):
    """The SlimConfig a `llmslim-...` case name stands for."""
    import llmslim

    weights, *options = case.removeprefix("llmslim-").split("-")
    kwargs = {}
    for option in options:
        if option == "refine":
            kwargs["refine"] = True
        elif option == "gptq":
            kwargs["method"] = "gptq"
        elif option.startswith("g") and option[1:].isdigit():
            kwargs["block_size"] = int(option[1:])
        elif option.startswith("b"):
            kwargs["bits_per_param"] = float(option[1:])
        elif option.startswith("t"):
            kwargs["int8_threshold"] = float(option[1:])
        elif option == "head8":
            kwargs.update(exclude=[], int8_layers=["lm_head"])
        elif option in ("q8", "sdpa"):
            pass  # not quantization settings: `measure` scores every token with decode's int8 activations; `load_case`
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
        model = llmslim.from_pretrained(path, slim_config(case), dtype=torch.bfloat16, progress=False)
        if case.endswith("-sdpa"):
            model.set_attn_implementation("sdpa")
        return model
    if case == "bnb-nf4-gptq-export":
        return load_gptq_export(path)
    if case == LLMCOMPRESSOR_CASE:
        return load_llmcompressor(path)
    if case.startswith("quanto-"):
        return load_quanto(path, bits=8 if case == "quanto-int8" else 4)
    if case == "bnb-int8":
        return AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb_config(8), dtype=torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb_config(4))


def load_gptq_export(path: Path):
    """llmslim's GPTQ-NF4 of `path`, saved in bitsandbytes' layout, then loaded by stock transformers + bitsandbytes."""
    import torch
    from transformers import AutoModelForCausalLM

    import llmslim

    model = llmslim.from_pretrained(path, slim_config("llmslim-nf4-gptq"), dtype=torch.bfloat16, progress=False)
    with tempfile.TemporaryDirectory(prefix="bench_quality-") as tmp:
        llmslim.save_pretrained(model, Path(tmp) / "bnb", format="bnb")
        del model
        config = json.loads((Path(tmp) / "bnb" / "config.json").read_text())["quantization_config"]
        assert config["quant_method"] == "bitsandbytes", config  # transformers' own bitsandbytes quantizer loads it
        return AutoModelForCausalLM.from_pretrained(Path(tmp) / "bnb", dtype=torch.bfloat16)


def load_llmcompressor(path: Path):
    """SmolLM2 quantized by llm-compressor's GPTQ in its own environment, loaded back as its dequantized bf16 weights."""
    import subprocess

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmslim.calibrate import calibration_ids

    if not LLMCOMPRESSOR_PYTHON:
        raise SystemExit("llmcompressor-int4-g64-gptq needs --llmcompressor-python: a Python with llmcompressor==0.14.0.1 installed")
    with tempfile.TemporaryDirectory(prefix="bench_quality-lc-") as tmp:
        torch.save(calibration_ids(AutoTokenizer.from_pretrained(path)), Path(tmp) / "ids.pt")
        script = Path(__file__).with_name("_llmcompressor_gptq.py")
        run = subprocess.run([LLMCOMPRESSOR_PYTHON[0], str(script), str(path), str(Path(tmp) / "ids.pt"), str(Path(tmp) / "out")])
        if run.returncode:
            raise SystemExit(f"llm-compressor's child exited with {run.returncode}")
        return AutoModelForCausalLM.from_pretrained(Path(tmp) / "out", dtype=torch.bfloat16)


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
        start = time.perf_counter()
        model = load_case(case, path)
        load_s = time.perf_counter() - start
        with torch.no_grad(), decode_numerics(case.endswith("-q8")):  # optimum-quanto's tensors fail under inference_mode
            result = perplexity(model, ids, progress=False)
        rows[case] = {
            "perplexity": result.perplexity,
            "bits_per_param_quantized_layers": quantized_bits_per_param(model),
            "footprint_mib": model_nbytes(model) / 2**20,
            "load_s": load_s,  # GPTQ cases: calibration included
        }
        print(f"{case:14s} perplexity {result.perplexity:.2f}", flush=True)
        del model
    base = rows.get("bf16", {}).get("perplexity")
    for row in rows.values():
        row["vs_bf16"] = row["perplexity"] / base if base else None
    return {"date": utc_now(), "tokens": tokens, "text": str(text), "cases": rows}


@contextlib.contextmanager
def decode_numerics(on: bool):
    """With `on`, every token of an int4 or NF4 window through the integer-dot decode kernels (activations rounded to
    int8 per 32, NF4's values to int8 steps, as a decoded token is): the perplexity cost of that rounding, which
    scoring a window would not pay."""
    from llmslim.quant import kernels

    names = ("DECODE_MAX_TOKENS", "INT4_Q8_MAX_TOKENS", "NF4_Q8_MAX_TOKENS")  # a window is decode-sized, then integer-dot
    previous = {name: getattr(kernels, name) for name in names}
    if on:
        for name in names:
            setattr(kernels, name, 1 << 40)
    try:
        yield
    finally:
        for name, value in previous.items():
            setattr(kernels, name, value)


def calibration_cost(model_dir: Path, timeout: float, tokens: int) -> dict:
    """Seconds and peak RSS of llmslim's GPTQ-NF4 and round-to-nearest NF4 loads of `model_dir`, each in a fresh process.

    A checkpoint without a tokenizer (the random 1.1B shape) is calibrated through a folder of links to its files
    beside a byte-level BPE tokenizer trained on the calibration text, no larger than the model's vocabulary."""
    out = {"model": str(model_dir), "calibration_tokens": tokens}
    with tempfile.TemporaryDirectory() as tmp:
        folder = with_tokenizer(model_dir, Path(tmp))
        for method in ("rtn", "gptq"):
            run = run_child(Path(__file__), ["--child-calibrate", method, str(folder), "--calibration-tokens", str(tokens)], timeout)
            out[method] = run.merged(peak_rss_gib=run.peak_rss_bytes / GIB)
            print(f"[calibration] {method}: {out[method]}", file=sys.stderr, flush=True)
    return out


def with_tokenizer(model_dir: Path, tmp: Path) -> Path:
    """`model_dir` if it has a tokenizer; else a folder in `tmp` linking its files, with a BPE tokenizer written beside."""
    if any((model_dir / name).exists() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return model_dir
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoConfig, PreTrainedTokenizerFast

    from llmslim.data import TINY_SHAKESPEARE

    folder = tmp / model_dir.name
    folder.mkdir()
    for file in model_dir.iterdir():
        (folder / file.name).symlink_to(file.resolve())
    vocab = min(AutoConfig.from_pretrained(model_dir).vocab_size, 8192)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train([str(TINY_SHAKESPEARE)], trainers.BpeTrainer(vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(folder)
    return folder


def child_calibrate(method: str, model_dir: str, tokens: int, result_file: str) -> int:
    """Load `model_dir` in NF4 with `method` (GPTQ on `tokens` of the default calibration text) and write the time, the
    footprint, and what the bounded calibration may add to it: one decoder block in float32 and the hidden states of
    the calibration sequences at a block boundary, twice (a block's inputs and outputs)."""
    import torch

    import llmslim
    from llmslim.memory.blocks import find_blocks
    from llmslim.quant.modules import SlimLinear
    from llmslim.stats import model_nbytes

    start = time.perf_counter()
    model = llmslim.from_pretrained(
        model_dir, llmslim.SlimConfig(weights="nf4", method=method), dtype=torch.bfloat16, progress=False, calibration_tokens=tokens
    )
    seconds = time.perf_counter() - start
    _, blocks = find_blocks(model)
    block_f32 = 4 * sum(m.in_features * m.out_features for m in blocks[0].modules() if isinstance(m, (SlimLinear, torch.nn.Linear)))
    hidden_f32 = (tokens // 512) * 512 * model.config.hidden_size * 4
    return finish_child(
        {
            "seconds": seconds,
            "footprint_gib": model_nbytes(model) / GIB,
            "block_f32_gib": block_f32 / GIB,
            "hidden_states_gib": hidden_f32 / GIB,
            "threads": torch.get_num_threads(),
        },
        result_file,
    )


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
        bf16 = "bf16 not measured again" if again["bf16_same_run"] is None else f"bf16 in that run: {again['bf16_same_run']:.2f}"
        lines += ["", f"Measured {again['date']}: {cases} ({bf16}). {again['note']}"]
    for cost in result.get("calibration", []):
        rtn, gptq = cost["rtn"], cost["gptq"]
        if "error" in gptq or "error" in rtn:
            lines += ["", f"Calibration cost of {cost['name']}: {gptq.get('error') or rtn.get('error')}"]
            continue
        lines += [
            "",
            f"Calibration cost, {cost['name']} (measured {cost['date']} on {cost.get('machine', 'an unrecorded CPU')}, {gptq['threads']} "
            "threads, fresh process, peak RSS from wait4): "
            f"GPTQ-NF4 load {gptq['seconds']:.0f} s at {gptq['peak_rss_gib']:.2f} GiB peak RSS, vs round-to-nearest NF4 "
            f"{rtn['seconds']:.1f} s at {rtn['peak_rss_gib']:.2f} GiB (footprint {gptq['footprint_gib']:.3f} GiB); "
            f"calibrated on {cost.get('calibration_tokens', 65536)} tokens.",
        ]
        if "block_f32_gib" in gptq:
            bound = gptq["block_f32_gib"] + 2 * gptq["hidden_states_gib"]
            lines[-1] += (
                f" GPTQ's peak over round-to-nearest's: {gptq['peak_rss_gib'] - rtn['peak_rss_gib']:.2f} GiB, against one float32 "
                f"block ({gptq['block_f32_gib']:.2f} GiB) + the hidden states twice ({2 * gptq['hidden_states_gib']:.2f} GiB) "
                f"= {bound:.2f} GiB."
            )
    lines += targets(result)
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


def targets(result: dict) -> list[str]:
    """Issue 18's targets, met or not, from the cases measured."""
    rows = result["cases"]
    if "bf16" not in rows or not any("-gptq" in case for case in rows):
        return []

    def rise(case: str) -> float:
        return rows[case]["perplexity"] / rows["bf16"]["perplexity"] - 1

    def verdict(ok: bool) -> str:
        return "**met**" if ok else "**not met**"

    lines = ["", "Targets (issue 18):", ""]
    if "bnb-nf4-gptq-export" in rows:
        value = rise("bnb-nf4-gptq-export")
        lines.append(f"- GPTQ-NF4 through stock transformers + bitsandbytes within 15% of bf16: {value:+.1%} {verdict(value <= 0.15)}")
    small = [c for c, r in rows.items() if c.startswith("llmslim-") and (r["bits_per_param_quantized_layers"] or 99) <= 4.6]
    if small:
        best = min(small, key=rise)
        bits = rows[best]["bits_per_param_quantized_layers"]
        value = rise(best)
        setting = f"{best} ({bits:.2f} bits)"
        lines.append(f"- best setting at ≤ 4.6 bits/param within 10% of bf16: {setting} {value:+.1%} {verdict(value <= 0.10)}")
    for case in ("llmslim-int8", "llmslim-int8-gptq"):
        if case in rows:
            lines.append(f"- {case} within 0.3% of bf16: {rise(case):+.2%} {verdict(rise(case) <= 0.003)}")
    for cost in result.get("calibration", []):
        limit = {"smollm2": 300, "tinyllama": 1800}.get(cost["name"])
        seconds = cost["gptq"].get("seconds")
        on = f" ({cost['machine'].split(' (')[0]})" if "machine" in cost else ""
        if limit and seconds is not None:
            lines.append(f"- calibration of {cost['name']}{on} ≤ {limit // 60} min: {seconds / 60:.1f} min {verdict(seconds <= limit)}")
        if cost["name"] == "tinyllama" and "block_f32_gib" in cost["gptq"]:  # issue 18: footprint + one block + activations
            over = cost["gptq"]["peak_rss_gib"] - cost["rtn"]["peak_rss_gib"]
            bound = cost["gptq"]["block_f32_gib"] + 2 * cost["gptq"]["hidden_states_gib"]
            lines.append(
                f"- calibration of {cost['name']}{on}: peak RSS over round-to-nearest's ≤ one float32 block + the hidden states twice: "
                f"{over:.2f} vs {bound:.2f} GiB {verdict(over <= bound)}"
            )
    return lines


def plot(result: dict, path: Path) -> None:
    """Perplexity per case; perplexity against bits/param of llmslim's cases, round-to-nearest vs GPTQ."""
    plt = pyplot()
    cases = list(result["cases"])
    fig, (bars_ax, bits_ax) = plt.subplots(1, 2, figsize=(14, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    bars = bars_ax.bar(cases, [result["cases"][c]["perplexity"] for c in cases], color="tab:blue")
    bars_ax.bar_label(bars, fmt="%.1f", fontsize=6)
    bars_ax.set_ylabel("perplexity (lower is better)")
    bars_ax.set_title(f"SmolLM2-135M-Instruct, WikiText-2 ({result['tokens']} tokens)")
    bars_ax.tick_params(axis="x", labelrotation=60, labelsize=6)
    for method, color in (("rtn", "tab:orange"), ("gptq", "tab:green")):
        points = [
            (row["bits_per_param_quantized_layers"], row["perplexity"], case)
            for case, row in result["cases"].items()
            if case.startswith("llmslim-") and row["bits_per_param_quantized_layers"] and ("-gptq" in case) == (method == "gptq")
        ]
        if points:
            xs, ys, _ = zip(*points, strict=True)
            bits_ax.scatter(xs, ys, color=color, label=method)
    if "bf16" in result["cases"]:
        bits_ax.axhline(result["cases"]["bf16"]["perplexity"], color="gray", linestyle="--", label="bf16")
    bits_ax.set(xlabel="bits/param (quantized layers)", ylabel="perplexity", title="round-to-nearest vs GPTQ")
    bits_ax.legend(fontsize=8)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=20_000)
    parser.add_argument("--text", type=Path, default=None, help="WikiText-2's wiki.test.raw (default: the copy shipped in llmslim.data)")
    parser.add_argument("--cases", default=None, help=f"comma list of {', '.join(CASES)}, {LLMCOMPRESSOR_CASE}")
    parser.add_argument("--merge", action="store_true", help="measure --cases (and bf16) and merge them into the saved results")
    parser.add_argument("--no-bf16", action="store_true", help="with --merge: do not measure bf16 again (ratios use the saved one)")
    parser.add_argument(
        "--calibration-cost", default="", help="comma list of smollm2 or model folders: time and peak RSS of their GPTQ-NF4 load"
    )
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per calibration-cost child (default 3600)")
    parser.add_argument(
        "--calibration-tokens", type=int, default=65536, help="calibration tokens of --calibration-cost's GPTQ loads (default 65536)"
    )
    parser.add_argument(
        "--llmcompressor-python", default=None, help=f"a Python with llmcompressor 0.14: adds {LLMCOMPRESSOR_CASE} to the default cases"
    )
    parser.add_argument("--child-calibrate", nargs=2, help=argparse.SUPPRESS)  # child: METHOD MODEL_DIR
    parser.add_argument("--result", help=argparse.SUPPRESS)  # child: where to write its result
    args = parser.parse_args()
    if args.llmcompressor_python:
        LLMCOMPRESSOR_PYTHON.append(args.llmcompressor_python)
    if args.child_calibrate:
        raise SystemExit(child_calibrate(*args.child_calibrate, args.calibration_tokens, args.result))
    if args.text is None:
        from llmslim.data import WIKITEXT2_TEST  # shipped with llmslim (= ../shared/data, byte for byte)

        args.text = WIKITEXT2_TEST
    if not args.text.exists():
        raise SystemExit(f"{args.text} does not exist: pass --text with WikiText-2's wiki.test.raw")
    if args.cases is None:
        args.cases = ",".join((*CASES, *([LLMCOMPRESSOR_CASE] if args.llmcompressor_python else [])))
    cases = tuple(filter(None, args.cases.split(",")))
    if args.merge and not cases:  # only --calibration-cost: the saved perplexities are kept as they are
        result = read_json(RESULTS_DIR / "bench_quality.json")
    elif args.merge:
        result = merged(cases, args)
    else:
        result = measure(cases, args.tokens, args.text)
    for name in filter(None, args.calibration_cost.split(",")):
        cost = calibration_cost(resolve_model(name), args.timeout, args.calibration_tokens)
        info = machine_info()
        machine = f"{info['cpu']} ({', '.join(info['simd']) or 'no SIMD flags'}), {info['nproc']} cores"
        costs = [c for c in result.get("calibration", []) if (c["name"], c.get("machine")) != (name, machine)]  # one per machine
        result["calibration"] = [*costs, {"name": name, "date": utc_now(), "machine": machine, **cost}]
    print(publish("bench_quality", result, RESULTS_DIR, markdown, plot, README_SECTION))


def resolve_model(name: str) -> Path:
    """smollm2 (the embedded default model), tinyllama (the random 1.1B checkpoint of scripts/make_random_checkpoint.py)
    or a model folder."""
    from llmslim import models

    if name == "tinyllama":
        if not (DEFAULT_TINYLLAMA / "config.json").exists():
            raise SystemExit(f"{DEFAULT_TINYLLAMA} does not exist: run `python scripts/make_random_checkpoint.py` first")
        return DEFAULT_TINYLLAMA
    return Path(models.resolve(None if name == "smollm2" else name))


MERGE_NOTES = {
    "llmslim-int8": (
        "int8 measured on a CPU with hardware bf16 GEMMs (an AMX Xeon; since 2026-12-06 a Zen 5 EPYC with AVX-512 BF16), "
        "where int8 prompts multiply bf16 activations with the weight in bf16 (`kernels.int8_prompt_matmul_bf16`: no "
        "activation rounded, so the threshold changes nothing; since 2026-12-06 17:35 the weight dequantized to bf16, "
        "before that the codes with each output column scaled after the GEMM: 28.87 on the Zen 5; -t6 measured on the "
        "Xeon); through LLM.int8 (CPUs with neither) SmolLM2 read 28.92 at threshold 1.5 and 29.32 at 6."
    ),
    "llmslim-nf4-gptq": (
        "`-gptq`: GPTQ calibrated on the shipped Tiny Shakespeare (65,536 tokens of 512, seed 0) with the defaults: damp 0.25, "
        "act_order, balance (AWQ-style input-channel scales folded into the norms and up projections); the blocks computed in "
        "bf16 while calibrated (this CPU multiplies bf16 natively; the Hessians add up in float32); "
        "`bnb-nf4-gptq-export` is that model saved in bitsandbytes' layout and loaded by stock transformers + bitsandbytes."
    ),
    "llmcompressor-int4-g64-gptq": (
        "`llmcompressor-int4-g64-gptq`: llm-compressor 0.14.0.1's GPTQModifier (its defaults; scheme int4, asymmetric, groups "
        "of 64, lm_head left out) on the same calibration ids as llmslim's -gptq cases, in its own environment (it pins "
        "transformers <= 5.17: `--llmcompressor-python`), its fake-quantized weights scored in bf16."
    ),
    "llmslim-int4-g64-q8": (
        "`-q8`: every token scored with decode's numerics, the activations as two int8 rows per 32 elements (the value, then "
        "its rounding's remainder) for the integer-dot int4 kernel (`mm_int4_q8`; one int8 row gave 41.90), against the "
        "same weights with 16-bit activations (`llmslim-int4-g64`)."
    ),
    "llmslim-nf4-q8": (
        "`llmslim-nf4-q8`: every token scored with decode's numerics on a CPU with AVX2 (`mm_4bit_q8`: NF4's values as "
        "int8 steps of 1/127, the activations as two int8 rows per 32 elements as for int4; with one row it was 37.81), "
        "against the same weights with 16-bit activations (`llmslim-nf4`)."
    ),
    "llmslim-nf4-head8": (
        "`-head8`: the tied output head as its own int8 copy (the embedding stays bf16; the copy is counted in the footprint)."
    ),
    "llmslim-nf4-sdpa": (
        "`-sdpa`: the same nf4 model with transformers' SDPA attention instead of llmslim's prompt attention kernel "
        "(`llmslim.hf.attention`, AVX-512 BF16; the other llmslim rows of this run take it where it is built)."
    ),
}


def merged(cases: tuple[str, ...], args: argparse.Namespace) -> dict:
    """Measure `cases` with bf16 in the same run and merge them into the existing bench_quality.json."""
    previous = read_json(RESULTS_DIR / "bench_quality.json")
    if previous["tokens"] != args.tokens:
        raise SystemExit(f"--merge needs the same --tokens as the saved results ({previous['tokens']}), got {args.tokens}")
    run = measure(tuple(dict.fromkeys((*(() if args.no_bf16 else ("bf16",)), *cases))), args.tokens, args.text)
    base = previous["cases"]["bf16"]["perplexity"]
    for case in cases:
        previous["cases"][case] = {**run["cases"][case], "vs_bf16": run["cases"][case]["perplexity"] / base}
    notes = " ".join(MERGE_NOTES.get(case, "") for case in cases).strip()
    bf16_same_run = run["cases"]["bf16"]["perplexity"] if "bf16" in run["cases"] else None  # None: --no-bf16
    entry = {"date": run["date"], "cases": list(cases), "bf16_same_run": bf16_same_run, "note": notes}
    kept = [e for e in previous.get("remeasured", []) if not set(e["cases"]) <= set(cases)]  # notes of rows now replaced go
    previous["remeasured"] = [*kept, entry]
    return previous


if __name__ == "__main__":
    main()
