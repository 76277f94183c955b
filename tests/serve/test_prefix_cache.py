"""Prefix caching: the cache's bookkeeping (longest match, LRU eviction within its bytes), and over real HTTP with the
official `openai` client, that a hit computes only the rest of the prompt and answers exactly as a miss does."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import AutoTokenizer

import llmslim
from llmslim.serve import EngineConfig
from llmslim.serve.kvcache import SequenceKV
from llmslim.serve.prefixcache import PrefixCache

from ._helpers import SYSTEM, scrape_metrics
from ._helpers import ask as ask_as

MODEL_ID = "tiny-llama"
QUESTIONS = ["Tell me about the sea.", "What is a cat?", "Why is the sky blue?"]
TOLERANCE = 1e-4


def kv_of(tokens: int, layers: int = 2) -> SequenceKV:
    kv = SequenceKV(layers)
    for layer in range(layers):
        kv.append(layer, torch.randn(1, 2, tokens, 4), torch.randn(1, 2, tokens, 4))  # (1, kv_heads, tokens, head_dim)
    return kv


# ----------------------------------------------------------------------------- the cache itself


def test_the_longest_whole_block_prefix_is_reused_and_never_the_whole_prompt():
    cache = PrefixCache(max_bytes=10**6, block=4)
    prompt = list(range(10))
    kv = kv_of(10)
    cache.store(prompt, kv)  # keeps 8 tokens (two blocks)
    assert cache.lookup(list(range(7)) + [99])[1] == 4  # shares 7 tokens: one whole block
    hit, length = cache.lookup(list(range(9)))  # shares 8 (all 9 but the last, which must be computed)
    assert length == 8 and hit.length == 8
    assert all(torch.equal(hit._keys[i], kv._keys[i][:, :, :8]) for i in range(2))
    hit._keys[0].zero_()  # a copy: the cached keys stay as they were
    assert torch.equal(cache.lookup(list(range(9)))[0]._keys[0], kv._keys[0][:, :, :8])
    assert cache.lookup(list(range(8)))[1] == 4  # an 8-token prompt reuses at most 7 tokens: one block
    assert cache.lookup([5, 1, 2, 3, 4])[1] == 0
    assert (cache.stats.lookups, cache.stats.hits, cache.stats.hit_tokens) == (5, 4, 4 + 8 + 8 + 4)


def test_memory_stays_bounded_least_recently_used_out():
    one = kv_of(8).prefix(8).nbytes
    cache = PrefixCache(max_bytes=2 * one, block=4)
    for first in (100, 200, 300):
        cache.store([first, *range(8)], kv_of(9))  # 8 tokens kept of each
        assert cache.nbytes <= 2 * one
    assert len(cache) == 2 and cache.stats.evictions == 1
    assert cache.lookup([100, *range(8)])[1] == 0  # the oldest went
    assert cache.lookup([200, *range(8)])[1] == 8  # now the most recently used
    cache.store([400, *range(8)], kv_of(9))
    assert cache.lookup([200, *range(8)])[1] == 8 and cache.lookup([300, *range(8)])[1] == 0


def test_an_entry_that_extends_another_replaces_it():
    cache = PrefixCache(max_bytes=10**6, block=4)
    cache.store(list(range(5)), kv_of(5))
    cache.store(list(range(13)), kv_of(13))
    assert len(cache) == 1 and cache.lookup(list(range(20)))[1] == 12
    cache.store(list(range(6)), kv_of(6))  # already held inside the longer entry
    assert len(cache) == 1
    assert PrefixCache(0).lookup(list(range(20))) == (None, 0)
    with pytest.raises(ValueError, match="max_bytes must be >= 0"):
        PrefixCache(-1)


# ----------------------------------------------------------------------------- over HTTP


def load(folder):
    return llmslim.from_pretrained(folder, llmslim.SlimConfig(weights="nf4"), dtype=torch.float32, progress=False)


@pytest.fixture(scope="module")
def servers(tiny_chat_model, start_server):
    """The same float32 model served twice: with prefix caching, and without (the reference)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_model)
    cached = start_server(load(tiny_chat_model), tokenizer, MODEL_ID, None, EngineConfig(max_tokens=32))
    plain = start_server(load(tiny_chat_model), tokenizer, MODEL_ID, None, EngineConfig(max_tokens=32, prefix_cache_mib=0))
    yield cached, plain
    cached.stop()
    plain.stop()


def ask(server, question: str, stream: bool = False, **kwargs):
    return ask_as(server, MODEL_ID, question, stream, **kwargs)


def test_hits_answer_as_misses_do(servers):
    cached, plain = servers
    before = scrape_metrics(cached.url, {})
    prefilled, plain_prefilled = cached.engine.stats.prefill_tokens, plain.engine.stats.prefill_tokens
    for i, question in enumerate(QUESTIONS):
        text, logprobs = ask(cached, question, stream=i == 1)
        expected_text, expected = ask(plain, question)
        assert text == expected_text
        assert logprobs == pytest.approx(expected, abs=TOLERANCE)
    after = scrape_metrics(cached.url, {})
    hits = after["llmslim_prefix_cache_hits_total"] - before["llmslim_prefix_cache_hits_total"]
    reused = after["llmslim_prefix_cache_hit_tokens_total"] - before["llmslim_prefix_cache_hit_tokens_total"]
    assert hits >= len(QUESTIONS) - 1  # every question after the first shares the system prompt
    assert reused >= (len(QUESTIONS) - 1) * 100  # the system prompt is ~150 tokens
    computed, prompts = cached.engine.stats.prefill_tokens - prefilled, plain.engine.stats.prefill_tokens - plain_prefilled
    assert computed + reused == prompts  # what was reused was not computed again
    assert plain.engine.prefix_cache.stats.hits == 0 and "llmslim_prefix_cache_hits_total 0" in _metrics_text(plain)


def test_hits_with_n_choices_and_concurrent_requests(servers):
    cached, plain = servers
    ask(cached, QUESTIONS[0])  # the system prompt is cached
    expected = [ask(plain, q)[0] for q in QUESTIONS]
    got: dict[int, str] = {}

    def run(i: int) -> None:
        got[i] = ask(cached, QUESTIONS[i])[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(QUESTIONS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert [got[i] for i in range(len(QUESTIONS))] == expected
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"}]
    args = dict(model=MODEL_ID, messages=messages, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    result = cached.client(api_key="unused").chat.completions.create(n=2, **args)  # one prefill (of the uncached rest), two choices
    assert [c.message.content for c in result.choices] == [ask(plain, "Hi")[0]] * 2


def test_the_cache_stays_within_its_memory(tiny_chat_model, start_server):
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_model)
    cap_mib = 0.1  # float32, 2 layers, 2 kv heads of 16: 512 bytes a token, so about one ~180-token prompt
    server = start_server(load(tiny_chat_model), tokenizer, MODEL_ID, None, EngineConfig(max_tokens=8, prefix_cache_mib=cap_mib))
    try:
        for i in range(4):
            system = f"Persona {i}. " + SYSTEM  # prompts that differ from the first token on
            client = server.client(api_key="unused")
            client.chat.completions.create(model=MODEL_ID, max_tokens=2, messages=[{"role": "system", "content": system}])
            metrics = scrape_metrics(server.url, {})
            assert 0 < metrics["llmslim_prefix_cache_bytes"] <= cap_mib * 2**20
        assert metrics["llmslim_prefix_cache_evictions_total"] >= 2
    finally:
        server.stop()


def _metrics_text(server) -> str:
    import httpx

    return httpx.get(f"{server.url}/metrics", timeout=30).text
