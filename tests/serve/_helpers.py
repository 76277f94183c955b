"""Plain helpers the server tests share (fixtures live in conftest.py)."""

from __future__ import annotations

import time

import httpx


def scrape_metrics(url: str, headers: dict[str, str], timeout: float = 30.0) -> dict[str, float]:
    """The server's /metrics as {sample name with labels: value}."""
    text = httpx.get(f"{url}/metrics", headers=headers, timeout=timeout).text
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line and not line.startswith("#")}


def wait_until(condition, timeout: float = 20.0) -> bool:
    """Poll `condition` every 20 ms; whether it became true within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


SYSTEM = "You are a careful assistant. " + " ".join(f"Rule {i}: answer in plain words about topic {i}." for i in range(12))  # ~150 tokens


def ask(server, model_id: str, question: str, stream: bool = False, **kwargs) -> tuple[str, list[float]]:
    """A greedy 12-token chat answer to `question` under `SYSTEM` (with `ignore_eos`): its text and its tokens' logprobs."""
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    args = dict(model=model_id, messages=messages, max_tokens=12, temperature=0, logprobs=True, extra_body={"ignore_eos": True})
    client = server.client(api_key="unused")
    if not stream:
        choice = client.chat.completions.create(**args, **kwargs).choices[0]
        return choice.message.content, [e.logprob for e in choice.logprobs.content]
    text, logprobs = "", []
    for chunk in client.chat.completions.create(stream=True, **args, **kwargs):
        for choice in chunk.choices:
            text += choice.delta.content or ""
            logprobs += [e.logprob for e in (choice.logprobs.content if choice.logprobs else [])]
    return text, logprobs
