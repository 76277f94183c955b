"""Chunked prefill over real HTTP with the official `openai` client: a prompt computed a chunk at a time answers as a
whole-prompt prefill does, and the running sequences keep decoding while a long prompt is computed."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import AutoTokenizer

import llmslim
from llmslim.serve import EngineConfig

from ._helpers import SYSTEM, wait_until
from ._helpers import ask as ask_as

MODEL_ID = "tiny-llama"
QUESTIONS = ["Tell me about the sea.", "What is a cat?"]
TOLERANCE = 1e-4  # float32: chunks multiply smaller matrices than one whole prompt
CHUNK = 8


@pytest.fixture(scope="module")
def servers(tiny_chat_model, start_server):
    """The same float32 model served with 8-token chunks and with whole prompts (prefix caching off in both)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_model)

    def serve(chunk: int):
        model = llmslim.from_pretrained(tiny_chat_model, llmslim.SlimConfig(weights="nf4"), dtype=torch.float32, progress=False)
        return start_server(model, tokenizer, MODEL_ID, None, EngineConfig(max_tokens=1024, prefix_cache_mib=0, prefill_chunk=chunk))

    chunked, whole = serve(CHUNK), serve(0)
    yield chunked, whole
    chunked.stop()
    whole.stop()


def ask(server, question: str, stream: bool = False, **kwargs):
    return ask_as(server, MODEL_ID, question, stream, **kwargs)


def test_chunks_answer_as_a_whole_prompt_does(servers):
    chunked, whole = servers
    prefilled = chunked.engine.stats.prefill_tokens
    for i, question in enumerate(QUESTIONS):
        text, logprobs = ask(chunked, question, stream=i == 1)
        expected_text, expected = ask(whole, question)
        assert text == expected_text
        assert logprobs == pytest.approx(expected, abs=TOLERANCE)
    assert chunked.engine.stats.prefill_tokens - prefilled > 2 * 100  # the ~150-token prompts were computed, in chunks
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTIONS[0]}]
    args = dict(model=MODEL_ID, messages=messages, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    result = chunked.client(api_key="unused").chat.completions.create(n=2, **args)  # n choices wait for their one prefill
    assert [c.message.content for c in result.choices] == [ask(whole, QUESTIONS[0])[0]] * 2


@pytest.mark.parametrize("chunk", [CHUNK, 0], ids=["chunked", "whole"])
def test_running_sequences_decode_while_a_long_prompt_is_computed(servers, chunk, monkeypatch):
    server = servers[0] if chunk else servers[1]
    engine = server.engine
    calls: list[tuple[int, int]] = []  # (rows, tokens per row) of each forward of the engine, in order
    forward = engine._forward

    def recording(kvs, ids, positions):
        calls.append(tuple(ids.shape))
        return forward(kvs, ids, positions)

    stop = threading.Event()

    def long_running() -> None:  # streams until told to stop
        stream = server.client(api_key="unused").chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": "Go"}], max_tokens=1000, stream=True, extra_body={"ignore_eos": True}
        )
        for _ in stream:
            if stop.is_set():
                stream.close()
                return

    runner = threading.Thread(target=long_running)
    before = engine.stats.decode_steps
    runner.start()
    try:
        assert wait_until(lambda: engine.active_count == 1 and engine.stats.decode_steps > before + 5)  # past its prompt
        monkeypatch.setattr(engine, "_forward", recording)
        ask(server, "Hi")
        assert engine.active_count >= 1  # the long request was running all along
    finally:
        stop.set()
        runner.join(60)
    prompts = [tokens for _, tokens in calls if tokens > 1]  # recorded from after the long request's prompt: only "Hi"'s
    prompt = sum(prompts)
    assert prompt > 100
    if chunk:  # chunks of at most CHUNK tokens, each followed by a decode step of the running request
        assert all(tokens <= CHUNK for tokens in prompts) and len(prompts) == -(-prompt // CHUNK)
        chunk_calls = [i for i, (_, tokens) in enumerate(calls) if tokens > 1]
        assert all(b - a >= 2 for a, b in zip(chunk_calls, chunk_calls[1:], strict=False))  # a decode step between chunks
    else:  # the whole prompt at once: the running request waited for all of it
        assert prompts == [prompt]
