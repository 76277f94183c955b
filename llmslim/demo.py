"""`make demo`: the main job on the embedded default model, end to end."""

from __future__ import annotations

import time
from pathlib import Path

from llmslim import SlimConfig, models
from llmslim.evaluate import load_tokens, perplexity
from llmslim.generate import generate_reply
from llmslim.load import from_pretrained
from llmslim.stats import model_nbytes, rss_bytes

QUESTION = "What is the capital of France? Answer in one sentence."


def _mib(n: int) -> str:
    return f"{n / 2**20:7.1f} MiB"


def run_demo(weights: str, n_tokens: int, text_file: Path) -> None:
    """Load the default model in bf16 and in `weights`, compare memory and perplexity, answer a question."""
    from transformers import AutoTokenizer

    path = models.resolve(None)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokens = load_tokens(tokenizer, text_file, n_tokens) if text_file.is_file() else None
    print(f"model: {models.DEFAULT_NAME} ({path})")
    results = {}
    for fmt in (None, weights):
        start = time.perf_counter()
        model = from_pretrained(path, SlimConfig(weights=fmt), progress=False)
        seconds = time.perf_counter() - start
        ppl = perplexity(model, tokens, progress=False).perplexity if tokens is not None else float("nan")
        results[fmt or "bf16"] = (model_nbytes(model), ppl)
        print(f"{fmt or 'bf16':>5}: weights {_mib(model_nbytes(model))}, process RSS {_mib(rss_bytes())}, loaded in {seconds:.1f} s")
        if fmt is not None:
            answer = generate_reply(model, tokenizer, QUESTION, max_new_tokens=40)
        del model
    (base_bytes, base_ppl), (slim_bytes, slim_ppl) = results["bf16"], results[weights]
    print(f"memory: {_mib(base_bytes)} -> {_mib(slim_bytes)} ({base_bytes / slim_bytes:.2f}x smaller)")
    if tokens is None:
        print(f"perplexity: skipped ({text_file} not found)")
    else:
        print(f"perplexity on {tokens.numel()} tokens of WikiText-2: bf16 {base_ppl:.2f} -> {weights} {slim_ppl:.2f}")
    print(f"Q: {QUESTION}\nA: {answer}")
