"""`llmslim serve`'s default: the embedded SmolLM2-135M-Instruct in nf4, answering through the openai client."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

import llmslim
from llmslim import models
from llmslim.serve import EngineConfig


@pytest.mark.real_model
@pytest.mark.slow
def test_default_model_answers_and_streams_the_same(start_server):
    try:
        path = models.resolve(None)
    except FileNotFoundError as err:
        pytest.skip(str(err))
    model = llmslim.from_pretrained(path, llmslim.SlimConfig(weights="nf4"), progress=False)
    server = start_server(model, AutoTokenizer.from_pretrained(path), models.DEFAULT_NAME, None, EngineConfig(max_batch=4))
    try:
        client = server.client(api_key="unused")
        args = dict(
            model=models.DEFAULT_NAME,
            messages=[{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
            max_tokens=12,
            temperature=0,
        )
        answer = client.chat.completions.create(**args).choices[0].message.content
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **args))
    finally:
        server.stop()
    assert "Paris" in answer
    assert streamed == answer
