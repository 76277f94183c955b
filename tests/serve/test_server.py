"""The OpenAI-compatible server over real HTTP, driven by the official `openai` client."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from llmslim.serve import EngineConfig

from ._helpers import scrape_metrics, wait_until

MODEL_ID = "tiny-llama"
API_KEY = "test-key"

PROMPTS = [
    "Hello",
    "The capital of France is",
    "Once upon a time, in a land far away, there lived",
    "1 2 3 4 5 6 7 8",
    "def fibonacci(n):",
    "A haiku about the sea:",
    "Why is the sky blue? Explain it to a child in two sentences, please.",
    "Translate to French: good morning",
]
FIXED = {"ignore_eos": True}  # vLLM-style extension: exactly max_tokens tokens, whatever the random model says


def greedy(client: openai.OpenAI, prompt: str, max_tokens: int = 24, **kwargs):
    return client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=max_tokens, temperature=0, extra_body=FIXED, **kwargs)


def chat_messages(text: str) -> list[dict]:
    return [{"role": "system", "content": "You are brief."}, {"role": "user", "content": text}]


def scrape(server) -> dict[str, float]:
    return scrape_metrics(server.url, {"Authorization": f"Bearer {API_KEY}"})


@pytest.fixture(scope="module")
def server(loaded, start_server):
    """The main test server: API key required, 8 slots, a queue of 8, at most 256 new tokens."""
    model, tokenizer = loaded
    running = start_server(model, tokenizer, MODEL_ID, API_KEY, EngineConfig(max_batch=8, max_queue=8, max_tokens=256))
    yield running
    running.stop()


@pytest.fixture
def client(server) -> openai.OpenAI:
    return server.client(api_key=API_KEY)


# ----------------------------------------------------------------------------- the happy paths


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list()] == [MODEL_ID]
    assert client.models.retrieve(MODEL_ID).id == MODEL_ID
    health = httpx.get(f"{server.url}/health").json()  # no key needed
    assert health["status"] == "ok" and health["model"] == MODEL_ID


def test_completion_counts_usage(client, loaded):
    _, tokenizer = loaded
    prompt = PROMPTS[2]
    result = greedy(client, prompt, max_tokens=12)
    assert result.object == "text_completion" and result.model == MODEL_ID
    assert result.choices[0].finish_reason == "length"
    assert result.usage.prompt_tokens == len(tokenizer(prompt).input_ids)
    assert result.usage.completion_tokens == 12
    assert result.usage.total_tokens == result.usage.prompt_tokens + 12
    assert result.choices[0].text  # a random model still says something


def test_chat_uses_the_chat_template(client, loaded):
    _, tokenizer = loaded
    messages = chat_messages("What is the capital of France?")
    result = client.chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=10, temperature=0, extra_body=FIXED)
    expected_prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert result.object == "chat.completion"
    assert result.choices[0].message.role == "assistant" and result.choices[0].message.content
    assert result.usage.prompt_tokens == len(expected_prompt)
    assert result.usage.completion_tokens == 10


@pytest.mark.parametrize("kind", ["completion", "chat"])
def test_stream_concatenates_to_the_greedy_answer(client, kind):
    common = dict(model=MODEL_ID, max_tokens=30, temperature=0, extra_body=FIXED)
    if kind == "chat":
        create, args = client.chat.completions.create, dict(messages=chat_messages("Tell me a story."), **common)
    else:
        create, args = client.completions.create, dict(prompt=PROMPTS[4], **common)
    full = create(**args)
    chunks = list(create(stream=True, stream_options={"include_usage": True}, **args))
    pieces = [c.choices[0].delta.content if kind == "chat" else c.choices[0].text for c in chunks if c.choices]
    answer = full.choices[0].message.content if kind == "chat" else full.choices[0].text
    assert "".join(p or "" for p in pieces) == answer
    assert len([p for p in pieces if p]) > 1  # really streamed, not one blob
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens == 30
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_stop_sequence_ends_the_text_before_it(client):
    text = greedy(client, PROMPTS[1], max_tokens=40).choices[0].text
    start = len(text) // 2
    stop = next(text[i : i + 3] for i in range(start, len(text) - 3) if text[i : i + 3].strip() and "\ufffd" not in text[i : i + 3])
    expected = text[: text.find(stop)]
    result = greedy(client, PROMPTS[1], max_tokens=40, stop=[stop, "never-appears-xyz"])
    assert result.choices[0].text == expected
    assert result.choices[0].finish_reason == "stop"
    assert result.usage.completion_tokens < 40
    streamed = "".join(c.choices[0].text for c in greedy(client, PROMPTS[1], max_tokens=40, stop=stop, stream=True))
    assert streamed == expected


def test_seed_makes_sampling_reproducible(client):
    def sample(seed):
        args = dict(model=MODEL_ID, prompt=PROMPTS[0], max_tokens=16, temperature=1.0, top_p=0.9, seed=seed, extra_body=FIXED)
        return client.completions.create(**args).choices[0].text

    assert sample(1234) == sample(1234)


def test_max_tokens_is_capped_by_the_server(client):
    result = greedy(client, PROMPTS[0], max_tokens=100_000)
    assert result.usage.completion_tokens == 256  # EngineConfig(max_tokens=256) of the test server
    assert result.choices[0].finish_reason == "length"


def test_eight_concurrent_greedy_requests_equal_sequential(server, client):
    sequential = [greedy(client, p).choices[0].text for p in PROMPTS]
    before = scrape(server)
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        concurrent = list(pool.map(lambda p: greedy(client, p).choices[0].text, PROMPTS))
    after = scrape(server)
    assert concurrent == sequential
    steps = after["llmslim_decode_steps_total"] - before["llmslim_decode_steps_total"]
    tokens = after["llmslim_decoded_tokens_total"] - before["llmslim_decoded_tokens_total"]
    assert tokens > steps  # decode steps were shared: on average more than one sequence per forward pass


def test_metrics_are_prometheus_text(server, client):
    greedy(client, PROMPTS[0], max_tokens=4)
    response = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = scrape(server)
    assert samples['llmslim_requests_total{endpoint="/v1/completions",status="200"}'] >= 1
    assert samples["llmslim_generation_tokens_total"] >= 4
    assert samples['llmslim_request_latency_seconds_bucket{endpoint="/v1/completions",le="+Inf"}'] >= 1
    assert "llmslim_queue_depth" in samples and "llmslim_active_sequences" in samples


# ----------------------------------------------------------------------------- errors


def test_missing_or_wrong_api_key_is_401(server):
    with pytest.raises(openai.AuthenticationError, match="Authorization: Bearer") as err:
        greedy(server.client(api_key="wrong-key"), PROMPTS[0])
    assert err.value.code == "invalid_api_key"
    missing = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL_ID, "prompt": "hi"})
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/metrics").status_code == 401


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError, match="serves 'tiny-llama'") as err:
        client.completions.create(model="gpt-4o", prompt="hi", max_tokens=2)
    assert err.value.code == "model_not_found" and err.value.param == "model"


def test_prompt_longer_than_the_context_is_400(client):
    with pytest.raises(openai.BadRequestError, match="maximum context length is 512 tokens") as err:
        client.completions.create(model=MODEL_ID, prompt=" hello" * 600, max_tokens=2)
    assert err.value.code == "context_length_exceeded"


def test_invalid_field_is_400_with_param(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL_ID, prompt="hi", max_tokens=2, temperature=5)
    assert err.value.param == "temperature" and err.value.type == "invalid_request_error"


def test_malformed_json_is_400_openai_style(server):
    response = httpx.post(
        f"{server.url}/v1/chat/completions",
        content=b'{"model": "tiny-llama", "messages": [',
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and "not valid JSON" in error["message"]


def test_unknown_route_is_404_openai_style(server):
    response = httpx.get(f"{server.url}/v1/nothing-here", headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.status_code == 404 and set(response.json()["error"]) == {"message", "type", "param", "code"}


# ----------------------------------------------------------------------------- slots, queue, disconnects


def test_client_disconnect_cancels_and_frees_the_slot(server, client):
    before = scrape(server)['llmslim_generations_total{reason="cancelled"}']
    stream = greedy(client, PROMPTS[2], max_tokens=256, stream=True)
    for _, _chunk in zip(range(3), stream, strict=False):
        pass
    stream.close()  # the client goes away mid-generation
    assert wait_until(lambda: server.engine.active_count == 0)
    assert scrape(server)['llmslim_generations_total{reason="cancelled"}'] == before + 1
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    assert greedy(client, PROMPTS[0], max_tokens=3).usage.completion_tokens == 3


@pytest.fixture(scope="module")
def one_slot_server(loaded, start_server):
    """One generation slot and room for one waiting request: the third concurrent request is refused."""
    model, tokenizer = loaded
    running = start_server(model, tokenizer, MODEL_ID, API_KEY, EngineConfig(max_batch=1, max_queue=1, max_tokens=400))
    yield running
    running.stop()


def test_full_queue_is_429_and_recovers(one_slot_server):
    client = one_slot_server.client(api_key=API_KEY)
    running = greedy(client, PROMPTS[2], max_tokens=400, stream=True)
    next(iter(running))  # it holds the only slot
    waiting = greedy(client, PROMPTS[3], max_tokens=400, stream=True)  # headers are back: it is queued
    assert one_slot_server.engine.queue_depth == 1
    with pytest.raises(openai.RateLimitError, match="requests are already waiting") as err:
        greedy(client, PROMPTS[0], max_tokens=2)
    assert err.value.code == "queue_full" and err.value.status_code == 429
    running.close()
    waiting.close()
    assert wait_until(lambda: one_slot_server.engine.active_count == 0 and one_slot_server.engine.queue_depth == 0)
    assert greedy(client, PROMPTS[0], max_tokens=2).usage.completion_tokens == 2
