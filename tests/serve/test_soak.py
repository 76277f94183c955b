"""Soak: the real `llmslim serve` process under a few hundred mixed requests, then SIGTERM.

Valid, invalid, over the body cap, cancelled mid-stream, abandoned before the answer, all concurrent.
Afterwards the server is healthy, holds no slot, never answered 500, and exits promptly on SIGTERM.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from llmslim.serve.server import free_port

from ._helpers import scrape_metrics

pytestmark = pytest.mark.slow

MODEL_ID = "tiny-chat"
MAX_BODY = 32_768
REQUESTS = 300
BUDGET_S = 45  # the mix stops early if the machine is slow; it is a budget, not an assertion
WORKERS = 8
STARTUP_S = 180  # importing torch and loading the model in the child


def start(folder, port: int, log) -> subprocess.Popen:
    args = ["--port", str(port), "--model-name", MODEL_ID, "--max-batch", "4", "--max-queue", "16", "--max-tokens", "12"]
    command = [sys.executable, "-m", "llmslim", "serve", str(folder), *args, "--max-body-bytes", str(MAX_BODY)]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"`llmslim serve` did not start (exit code {process.poll()})")


@pytest.fixture(scope="module")
def served(tiny_chat_model, tmp_path_factory):
    """(base URL, process, log file) of a real server on a free loopback port; the log's tail is printed at the end."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("soak") / "server.log"
    with open(log_path, "wb") as log:
        process = start(tiny_chat_model, port, log)
        try:
            yield f"http://127.0.0.1:{port}", process, log_path
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            print(log_path.read_text(errors="replace")[-5000:])


def completion(rng: random.Random, **fields) -> dict:
    return {"model": MODEL_ID, "prompt": rng.choice(["Hello", "Once upon a time", "1 2 3"]), "max_tokens": rng.randint(1, 12)} | fields


def chat(rng: random.Random, **fields) -> dict:
    return {"model": MODEL_ID, "messages": [{"role": "user", "content": "Tell me a story."}], "max_tokens": rng.randint(1, 12)} | fields


def send(url: str, path: str, body, timeout: float = 60) -> httpx.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(url + path, content=data, headers={"Content-Type": "application/json"}, timeout=timeout)


def one_request(url: str, seed: int) -> tuple[str, int]:
    """One request of a random kind; returns (kind, status), status -1 for a request the client abandoned."""
    rng = random.Random(seed)
    kind = rng.choice(["completion", "chat", "stream", "invalid", "surrogate", "bad_json", "huge", "cancel", "abandon", "unknown_model"])
    if kind == "completion":
        sampling = {"temperature": rng.choice([0, 0.7, 1e-45]), "seed": rng.randint(0, 2**64 - 1)}
        return kind, send(url, "/v1/completions", completion(rng, **sampling)).status_code
    if kind == "chat":
        return kind, send(url, "/v1/chat/completions", chat(rng, ignore_eos=True)).status_code
    if kind == "invalid":
        bad = rng.choice([{"seed": 2**64}, {"temperature": -1}, {"top_p": 2}, {"max_tokens": 0}, {"n": 100}, {"stop": ["a"] * 9}])
        return kind, send(url, "/v1/completions", completion(rng, **bad)).status_code
    if kind == "surrogate":
        return kind, send(url, "/v1/chat/completions", chat(rng, messages=[{"role": "user", "content": "x\ud800"}])).status_code
    if kind == "bad_json":
        return kind, send(url, "/v1/completions", b'{"model": "tiny-chat", "prompt": [').status_code
    if kind == "huge":
        return kind, send(url, "/v1/completions", completion(rng, prompt="word " * (MAX_BODY // 4))).status_code
    if kind == "unknown_model":
        return kind, send(url, "/v1/completions", completion(rng, model="gpt-4o")).status_code
    if kind == "abandon":  # the client gives up before the answer (or gets it, if the server was quicker)
        try:
            return kind, send(url, "/v1/completions", completion(rng, max_tokens=12, ignore_eos=True), timeout=0.01).status_code
        except httpx.TimeoutException:
            return kind, -1
    stream_body = completion(rng, stream=True, max_tokens=12, ignore_eos=True)
    with httpx.stream("POST", url + "/v1/completions", json=stream_body, timeout=60) as response:
        lines = response.iter_lines()
        if kind == "cancel":  # read a little, then hang up mid-stream
            next(lines, None)
            return kind, response.status_code
        text = "\n".join(lines).strip()
    assert text.endswith("data: [DONE]") and "server_error" not in text, text
    return kind, response.status_code


EXPECTED = {  # 429 is allowed wherever the queue could be full
    "completion": {200, 429},
    "chat": {200, 429},
    "stream": {200, 429},
    "cancel": {200, 429},
    "abandon": {-1, 200, 429},
    "invalid": {400},
    "surrogate": {400},
    "bad_json": {400},
    "huge": {413},
    "unknown_model": {404},
}


def scrape(url: str) -> dict[str, float]:
    return scrape_metrics(url, {}, timeout=10)


def test_mixed_load_leaves_a_healthy_server_that_stops_on_sigterm(served):
    url, process, log_path = served
    deadline = time.monotonic() + BUDGET_S
    with ThreadPoolExecutor(WORKERS) as pool:
        futures = [pool.submit(lambda s: one_request(url, s) if time.monotonic() < deadline else None, seed) for seed in range(REQUESTS)]
        outcomes = [f.result() for f in futures]
    outcomes = [o for o in outcomes if o is not None]
    assert len(outcomes) >= 50, "too few requests ran to call this a soak"
    unexpected = [(kind, status) for kind, status in outcomes if status not in EXPECTED[kind]]
    assert not unexpected
    assert {kind for kind, _ in outcomes} == set(EXPECTED)

    assert httpx.get(f"{url}/health", timeout=10).status_code == 200
    for _ in range(100):  # cancelled sequences are dropped before the engine's next step
        metrics = scrape(url)
        if metrics["llmslim_active_sequences"] == 0 and metrics["llmslim_queue_depth"] == 0:
            break
        time.sleep(0.1)
    assert metrics["llmslim_active_sequences"] == 0 and metrics["llmslim_queue_depth"] == 0  # no leaked slot
    assert not [name for name, count in metrics.items() if 'status="5' in name and count], "a request got a 5xx"
    assert metrics['llmslim_generations_total{reason="error"}'] == 0

    body = completion(random.Random(0), stream=True, max_tokens=12, ignore_eos=True)
    with httpx.Client(base_url=url) as idle, httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as open_stream:
        assert idle.get("/health").status_code == 200  # an idle keep-alive connection, and a stream read only in part:
        next(open_stream.iter_lines())  # neither may hold the shutdown up
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once it has shut down
    assert "stopped: every open request has been answered or ended" in log_path.read_text(errors="replace")  # a clean shutdown
