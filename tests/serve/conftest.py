"""Fixtures for the server tests: a tiny random Llama with the real SmolLM2 tokenizer, served over real HTTP."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import write_chat_llama
from transformers import AutoTokenizer

import llmslim
from llmslim.serve import Engine, EngineConfig, create_app
from llmslim.serve.server import free_port

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")


@dataclass
class Server:
    """A running server: its base URL, the engine behind it, and the uvicorn instance."""

    url: str
    engine: Engine | None  # None: a server for an encoder
    uvicorn: uvicorn.Server
    thread: threading.Thread

    def client(self, api_key: str = "test-key", **kwargs) -> openai.OpenAI:
        """The official client, without retries (a 429 must reach the test)."""
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=60, **kwargs)

    def stop(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(30)


def _start_server(model, tokenizer, model_id: str, api_key: str | None, config: EngineConfig) -> Server:
    """Run the app with uvicorn in a thread on a free loopback port; return once it accepts connections."""
    engine = Engine(model, tokenizer, config)
    return _start_app(create_app(engine, model_id, api_key), engine)


def _start_app(app, engine: Engine | None = None) -> Server:
    """Run `app` with uvicorn in a thread on a free loopback port; return once it accepts connections."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"the test server on port {port} did not start")
        time.sleep(0.02)
    return Server(f"http://127.0.0.1:{port}", engine, server, thread)


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory) -> Path:
    """A 2-layer random Llama (hidden 64) saved with the embedded model's real tokenizer and chat template."""
    # spread-out logits: a random model that still says varied things
    return write_chat_llama(tmp_path_factory.mktemp("tiny-chat"), initializer_range=0.2)


@pytest.fixture(scope="module")
def loaded(tiny_chat_model):
    """The tiny model quantized to nf4 through llmslim, and its tokenizer."""
    model = llmslim.from_pretrained(tiny_chat_model, llmslim.SlimConfig(weights="nf4"), progress=False)
    return model, AutoTokenizer.from_pretrained(tiny_chat_model)


@pytest.fixture(scope="session")
def start_server():
    """`start_server(model, tokenizer, model_id, api_key, engine_config) -> Server`; the caller stops it."""
    return _start_server


@pytest.fixture(scope="session")
def start_app():
    """`start_app(app, engine=None) -> Server` for an app built otherwise (an encoder's); the caller stops it."""
    return _start_app
