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
