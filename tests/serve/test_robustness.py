"""No request takes the server down: bad numbers, a failure inside one sequence, big bodies, slow
tokenization, lone surrogates, clients that leave. After each, /health is 200 and requests are served."""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import httpx
import pytest

from llmslim.serve import EngineConfig, SamplingParams
from llmslim.serve import engine as engine_module

from ._helpers import scrape_metrics, wait_until

MODEL_ID = "tiny-llama"
API_KEY = "test-key"
HEADERS = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
BAD_SEED = 666  # the request the injected failures pick
TIMEOUT_S = 30  # a request that takes longer has hung: the test fails instead of waiting forever


def post(server, path: str, body, **kwargs) -> httpx.Response:
    """POST `body` as ASCII JSON, so a lone surrogate travels as the escape `\\ud800` (and NaN as `NaN`)."""
    return httpx.post(f"{server.url}{path}", content=json.dumps(body), headers=HEADERS, timeout=TIMEOUT_S, **kwargs)


def completion(**fields) -> dict:
    return {"model": MODEL_ID, "prompt": "Hello there", "max_tokens": 4} | fields


def chat(**fields) -> dict:
    return {"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4} | fields


def openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def assert_serving(server) -> None:
    assert httpx.get(f"{server.url}/health", timeout=TIMEOUT_S).status_code == 200
    assert post(server, "/v1/completions", completion()).status_code == 200


def scrape(server) -> dict[str, float]:
    return scrape_metrics(server.url, HEADERS, timeout=TIMEOUT_S)


@contextmanager
def paused(engine, monkeypatch):
    """Hold the engine thread between two iterations; what is submitted meanwhile is admitted and decoded together."""
    parked, gate, drop_cancelled = threading.Event(), threading.Event(), engine._drop_cancelled

    def wait_then_drop() -> None:
        parked.set()
        gate.wait(TIMEOUT_S)
        drop_cancelled()

    monkeypatch.setattr(engine, "_drop_cancelled", wait_then_drop)
    assert parked.wait(TIMEOUT_S)
    try:
        yield
    finally:
        gate.set()


@pytest.fixture(scope="module")
def server(loaded, start_server):
    model, tokenizer = loaded
    running = start_server(model, tokenizer, MODEL_ID, API_KEY, EngineConfig(max_batch=8, max_queue=8, max_tokens=64))
    yield running
    running.stop()


# ----------------------------------------------------------------------------- numbers out of range


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("seed", 2**64),  # used to kill the engine thread: "Overflow when unpacking long long"
        ("seed", -(2**63) - 1),
        ("temperature", -0.5),
        ("temperature", float("nan")),
        ("top_p", 1.01),
        ("top_p", float("inf")),
        ("max_tokens", 0),
        ("presence_penalty", float("nan")),
    ],
)
def test_out_of_range_numbers_are_400_and_the_server_lives(server, field, value):
    for path, body in (("/v1/completions", completion(**{field: value})), ("/v1/chat/completions", chat(**{field: value}))):
        error = openai_error(post(server, path, body), 400)
        assert error["param"] == field and error["type"] == "invalid_request_error"
    assert_serving(server)


@pytest.mark.parametrize("seed", [2**64 - 1, -(2**63), 0])
def test_seeds_at_the_64_bit_limits_work(server, seed):
    assert post(server, "/v1/completions", completion(seed=seed, temperature=1.0)).status_code == 200


def test_tiny_temperature_is_greedy_not_a_500(server):
    def text(temperature: float) -> str:
        response = post(server, "/v1/completions", completion(temperature=temperature, max_tokens=8, ignore_eos=True))
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["text"]

    assert text(1e-45) == text(0)  # 1e-45 used to divide the logits into inf and nan


# ----------------------------------------------------------------------------- a failure inside one sequence


def test_a_failure_in_one_sequence_fails_only_that_request(server, monkeypatch):
    calls, sample_token = [], engine_module.sample_token

    def flaky(logits, params, generator):
        if params.seed == BAD_SEED:
            calls.append(1)
            if len(calls) > 1:  # after the prefill: inside a decode step the others share
                raise RuntimeError("injected sampling failure")
        return sample_token(logits, params, generator)

    monkeypatch.setattr(engine_module, "sample_token", flaky)
    bodies = [completion(seed=seed, temperature=1.0, max_tokens=8, ignore_eos=True) for seed in (1, 2, BAD_SEED, 3, 4)]
    with ThreadPoolExecutor(len(bodies)) as pool:
        with paused(server.engine, monkeypatch):
            futures = [pool.submit(post, server, "/v1/completions", body) for body in bodies]
            assert wait_until(lambda: server.engine.queue_depth == len(bodies))
        responses = [future.result() for future in futures]
    error = openai_error(responses.pop(2), 500)
    assert error["type"] == "server_error" and "injected sampling failure" in error["message"]
    assert [r.status_code for r in responses] == [200] * 4, [r.text for r in responses]
    assert all(r.json()["usage"]["completion_tokens"] == 8 for r in responses)
    assert_serving(server)


def test_a_failure_starting_a_sequence_fails_only_that_request(server, monkeypatch):
    generator = SamplingParams.generator

    def overflowing(params):
        if params.seed == BAD_SEED:
            raise RuntimeError("Overflow when unpacking long long")  # what an unchecked 2**64 seed raised
        return generator(params)

    monkeypatch.setattr(SamplingParams, "generator", overflowing)
    error = openai_error(post(server, "/v1/completions", completion(seed=BAD_SEED, temperature=1.0)), 500)
    assert "Overflow" in error["message"] and error["type"] == "server_error"
    assert_serving(server)


def test_the_engine_survives_a_failure_outside_any_sequence(server, monkeypatch):
    failures, drop_cancelled = [], server.engine._drop_cancelled

    def broken_once() -> None:
        if not failures:
            failures.append(1)
            raise RuntimeError("injected engine-loop failure")
        drop_cancelled()

    monkeypatch.setattr(server.engine, "_drop_cancelled", broken_once)
    assert wait_until(lambda: failures)
    assert_serving(server)


def test_a_stopped_engine_answers_503_at_once(loaded, start_server):
    model, tokenizer = loaded
    running = start_server(model, tokenizer, MODEL_ID, API_KEY, EngineConfig(max_batch=2, max_queue=2, max_tokens=8))
    try:
        running.engine.stop()  # as if its thread had died
        assert httpx.get(f"{running.url}/health", timeout=TIMEOUT_S).status_code == 503
        error = openai_error(post(running, "/v1/completions", completion()), 503)  # not queued for nobody, not 429 later
        assert error["code"] == "engine_stopped"
    finally:
        running.stop()


# ----------------------------------------------------------------------------- text that cannot be encoded


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", chat(messages=[{"role": "user", "content": "hi \ud800"}]), "messages.0.content"),
        ("/v1/chat/completions", chat(messages=[{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]), "messages.0.content"),
        ("/v1/completions", completion(prompt="\ud800"), "prompt"),
        ("/v1/completions", completion(prompt=["\ud800 x"]), "prompt"),
        ("/v1/completions", completion(stop=["\udc00"]), "stop"),
    ],
)
def test_a_lone_surrogate_is_400(server, path, body, param):
    error = openai_error(post(server, path, body), 400)
    assert error["param"].startswith(param) and "lone surrogate" in error["message"]
    assert_serving(server)


# ----------------------------------------------------------------------------- clients that leave


def test_a_non_stream_client_that_leaves_is_499_and_frees_its_slot(server, monkeypatch):
    status = 'llmslim_requests_total{{endpoint="/v1/completions",status="{}"}}'
    before = scrape(server)
    body = json.dumps(completion(max_tokens=64, ignore_eos=True)).encode()
    head = f"POST /v1/completions HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {API_KEY}\r\n"
    head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    host, port = server.url.removeprefix("http://").split(":")
    with paused(server.engine, monkeypatch):
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(head.encode() + body)
            assert wait_until(lambda: server.engine.queue_depth == 1)
        assert wait_until(lambda: server.engine._pending.queue[0].cancelled)  # the server saw the client leave
    assert wait_until(lambda: scrape(server).get(status.format(499), 0) == before.get(status.format(499), 0) + 1)
    assert scrape(server).get(status.format(500), 0) == before.get(status.format(500), 0)
    assert server.engine.active_count == 0 and server.engine.queue_depth == 0
    assert_serving(server)


# ----------------------------------------------------------------------------- big bodies, slow tokenization


@pytest.fixture(scope="module")
def small_body_server(loaded, start_server):
    model, tokenizer = loaded
    running = start_server(model, tokenizer, MODEL_ID, API_KEY, EngineConfig(max_batch=2, max_queue=4, max_tokens=8, max_body_bytes=4096))
    yield running
    running.stop()


def test_a_body_over_the_limit_is_413(small_body_server):
    error = openai_error(post(small_body_server, "/v1/completions", completion(prompt="x" * 5000)), 413)
    assert error["code"] == "request_too_large" and "4096 bytes" in error["message"] and "--max-body-bytes" in error["message"]
    assert post(small_body_server, "/v1/completions", completion(user="x" * 3800)).status_code == 200  # just under the limit
    assert scrape(small_body_server)['llmslim_requests_total{endpoint="/v1/completions",status="413"}'] == 1


def test_a_chunked_body_over_the_limit_is_413(small_body_server):
    data = json.dumps(completion(prompt="y" * 6000)).encode()
    chunks = (data[i : i + 1000] for i in range(0, len(data), 1000))  # no Content-Length: counted as it arrives
    response = httpx.post(f"{small_body_server.url}/v1/completions", content=chunks, headers=HEADERS, timeout=TIMEOUT_S)
    assert openai_error(response, 413)["code"] == "request_too_large"
    assert_serving(small_body_server)


class SlowTokenizer:
    """The real tokenizer, except that encoding waits until `release` is set."""

    def __init__(self, tokenizer):
        self._tokenizer, self.started, self.release = tokenizer, threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def __call__(self, *args, **kwargs):
        return self._slowly(self._tokenizer, *args, **kwargs)

    def apply_chat_template(self, *args, **kwargs):
        return self._slowly(self._tokenizer.apply_chat_template, *args, **kwargs)

    def _slowly(self, encode, *args, **kwargs):
        self.started.set()
        self.release.wait(TIMEOUT_S)
        return encode(*args, **kwargs)


@pytest.mark.parametrize(("path", "body"), [("/v1/completions", completion()), ("/v1/chat/completions", chat())])
def test_health_answers_while_a_prompt_is_tokenized(loaded, start_server, path, body):
    model, tokenizer = loaded
    slow = SlowTokenizer(tokenizer)
    running = start_server(model, slow, MODEL_ID, API_KEY, EngineConfig(max_batch=2, max_queue=2, max_tokens=4))
    try:
        with ThreadPoolExecutor(1) as pool:
            big = pool.submit(post, running, path, body)
            assert slow.started.wait(TIMEOUT_S)
            health = httpx.get(f"{running.url}/health", timeout=TIMEOUT_S)
            assert health.status_code == 200 and not big.done()  # answered while the prompt was still being tokenized
            slow.release.set()
            assert big.result().status_code == 200
    finally:
        slow.release.set()
        running.stop()


@pytest.mark.parametrize(
    "raw",
    [
        b'{"model": "tiny-llama", "prompt": "hi", "user": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",  # too deep for the JSON parser
        b"[" * 900 + b"]" * 900,  # deep, but parsed: the error message must not recurse through it
        b'{"model": "tiny-llama", "prompt": "hi", "seed": ' + b"9" * 5000 + b"}",  # more digits than Python parses
        b'{"model": "tiny-llama", "prompt": "hi", "max_tokens": 1e999}',
        b"\xff\xfe not utf-8",
    ],
)
def test_pathological_bodies_are_400(server, raw):
    response = httpx.post(f"{server.url}/v1/completions", content=raw, headers=HEADERS, timeout=TIMEOUT_S)
    openai_error(response, 400)
    assert_serving(server)


# ----------------------------------------------------------------------------- n choices and embedding jobs


def test_a_failure_in_one_choice_fails_only_its_request(server, monkeypatch):
    calls, sample_token = [], engine_module.sample_token

    def flaky(logits, params, generator):
        if params.seed == BAD_SEED:
            calls.append(1)
            if len(calls) == 5:  # one choice, mid-decode, while the other choices and requests share the step
                raise RuntimeError("injected choice failure")
        return sample_token(logits, params, generator)

    monkeypatch.setattr(engine_module, "sample_token", flaky)
    bodies = [completion(seed=seed, temperature=1.0, max_tokens=6, ignore_eos=True, n=3) for seed in (1, BAD_SEED, 2)]
    with ThreadPoolExecutor(len(bodies)) as pool:
        with paused(server.engine, monkeypatch):
            futures = [pool.submit(post, server, "/v1/completions", body) for body in bodies]
            assert wait_until(lambda: server.engine.queue_depth == len(bodies))
        responses = [future.result() for future in futures]
    assert "injected choice failure" in openai_error(responses.pop(1), 500)["message"]
    assert [r.status_code for r in responses] == [200, 200], [r.text for r in responses]
    assert all(r.json()["usage"]["completion_tokens"] == 18 and len(r.json()["choices"]) == 3 for r in responses)
    assert server.engine.active_count == 0  # the failed request's other choices were ended with it
    assert_serving(server)


def test_a_cancelled_n_stream_frees_all_its_slots(server):
    before = scrape(server)['llmslim_generations_total{reason="cancelled"}']
    body = completion(max_tokens=64, ignore_eos=True, n=3, stream=True)
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, headers=HEADERS, timeout=TIMEOUT_S) as response:
        lines = response.iter_lines()
        for _ in range(4):
            next(lines)
    assert wait_until(lambda: server.engine.active_count == 0)
    assert scrape(server)['llmslim_generations_total{reason="cancelled"}'] == before + 3
    assert_serving(server)


@pytest.fixture(scope="module")
def two_slot_server(loaded, start_server):
    model, tokenizer = loaded
    running = start_server(model, tokenizer, MODEL_ID, API_KEY, EngineConfig(max_batch=2, max_queue=4, max_tokens=400))
    yield running
    running.stop()


def test_n_choices_wait_for_n_free_slots(two_slot_server, monkeypatch):
    server, batch_logits = two_slot_server, two_slot_server.engine._batch_logits

    def slow(batch):  # 400 steps take seconds: the stream holds its slot while the test looks
        time.sleep(0.02)
        return batch_logits(batch)

    monkeypatch.setattr(server.engine, "_batch_logits", slow)
    running_body = completion(max_tokens=400, ignore_eos=True, stream=True)
    with httpx.stream("POST", f"{server.url}/v1/completions", json=running_body, headers=HEADERS, timeout=TIMEOUT_S) as running:
        lines = running.iter_lines()  # kept: a dropped iterator closes the stream
        next(lines)  # it holds one of the two slots
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(post, server, "/v1/completions", completion(n=2, max_tokens=3, ignore_eos=True))
            assert wait_until(lambda: server.engine._waiting is not None)  # one slot is free, but it needs two
            assert server.engine.active_count == 1 and server.engine.queue_depth == 1
    response = waiting.result()  # the stream closed: both slots freed
    assert response.status_code == 200 and len(response.json()["choices"]) == 2
    error = openai_error(post(server, "/v1/completions", completion(n=3)), 400)  # more than --max-batch can ever hold
    assert error["param"] == "n" and "at most 2" in error["message"]


def test_a_failed_embedding_job_fails_only_that_request(server, monkeypatch):
    def broken(ids):
        raise RuntimeError("injected embedding failure")

    with monkeypatch.context() as patch:
        patch.setattr(server.engine, "hidden_states", broken)
        error = openai_error(post(server, "/v1/embeddings", {"model": MODEL_ID, "input": ["a", "b"]}), 500)
    assert "injected embedding failure" in error["message"] and error["type"] == "server_error"
    assert_serving(server)
    assert post(server, "/v1/embeddings", {"model": MODEL_ID, "input": "a"}).status_code == 200
