"""Running the app: bind-address safety, port checks, the served model's name, uvicorn."""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
from pathlib import Path

from llmslim import models
from llmslim.serve.engine import Engine, EngineConfig

logger = logging.getLogger(__name__)

API_KEY_ENV = "LLMSLIM_API_KEY"
GRACEFUL_SHUTDOWN_S = 5  # on SIGTERM, open requests get this long to finish; then they are cancelled and the engine stops


def compute_threads(threads: int | None = None) -> int:
    """Threads the model's operators get in a server process: `threads`, else torch's count (OMP_NUM_THREADS where set)
    less one core left to the HTTP side.

    Every operator splits its work over all its threads and waits for the last one, so one thread descheduled by the
    event loop (or by clients on the same machine) stalls them all. Measured on 2 cores (SmolLM2 nf4, one streaming
    client): 22 tok/s with both cores computing, 37 with one; 16 clients 119 against 162 tok/s. vLLM's CPU backend
    reserves a core for its front end the same way.
    """
    import torch

    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be a whole number >= 1, got {threads!r}")
        return threads
    if os.environ.get("OMP_NUM_THREADS"):  # the user chose
        return torch.get_num_threads()
    return max(1, torch.get_num_threads() - 1)


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or a name) only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_key: str | None, insecure: bool = False) -> None:
    """Refuse to expose an unauthenticated server beyond this machine.

    Raises:
        ValueError: `host` is not a loopback address, no API key is set and `insecure` is False.
    """
    if is_loopback(host) or api_key or insecure:
        return
    raise ValueError(
        f"refusing to bind {host!r} without an API key: anyone who can reach it could use the model. "
        f"Pass --api-key KEY (or set {API_KEY_ENV}), bind 127.0.0.1, or pass --insecure if this network is trusted"
    )


def check_port(host: str, port: int) -> None:
    """Fail before the model loads if the server could not listen on `host:port`.

    Raises:
        ValueError: the port is out of range, already in use, or cannot be bound on `host`.
    """
    if not 1 <= port <= 65535:
        raise ValueError(f"port must be between 1 and 65535, got {port}: pass another --port")
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: a port in TIME_WAIT is free
            sock.bind((host, port))
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            raise ValueError(f"port {port} on {host} is already in use (another server?): stop it or pass another --port") from None
        raise ValueError(f"cannot listen on {host}:{port} ({err.strerror or err}): pass another --host or --port") from None


def model_id(model_arg: str | None, path: Path) -> str:
    """The name clients use for the model: the default model's name, else the folder or GGUF file name."""
    if model_arg in (None, "default"):
        return models.DEFAULT_NAME
    return Path(model_arg).expanduser().resolve().stem if str(model_arg).endswith(".gguf") else path.resolve().name


def serve(
    model,
    tokenizer,
    name: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    config: EngineConfig | None = None,
    threads: int | None = None,
) -> None:
    """Serve `model` over HTTP until interrupted (Ctrl-C or SIGTERM: requests still open after `GRACEFUL_SHUTDOWN_S` are cancelled).

    Args:
        model: a loaded causal LM (completions, chat and embeddings), or an encoder such as a BertModel
            (embeddings only).
        tokenizer: its tokenizer (with a chat template for /v1/chat/completions).
        name: the model id clients send.
        host: address to bind; see `check_bind`.
        port: TCP port.
        api_key: when set, requests need `Authorization: Bearer <api_key>`.
        config: engine limits (and the request body cap, `max_body_bytes`).
        threads: threads of the model's operators, for the whole process (default: `compute_threads`).
    """
    import torch
    import uvicorn

    torch.set_num_threads(compute_threads(threads))

    app = build_app(model, tokenizer, name, api_key, config)
    # our middleware logs one line per request, so uvicorn's access log and logging setup stay off
    uvicorn.run(app, host=host, port=port, log_config=None, access_log=False, timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S)


def build_app(model, tokenizer, name: str, api_key: str | None = None, config: EngineConfig | None = None):
    """The FastAPI app for `model`: a generation engine for a causal LM, an embedder alone for an encoder."""
    from llmslim.serve.app import create_app
    from llmslim.serve.embeddings import encoder_embedder

    if model.can_generate():
        return create_app(Engine(model, tokenizer, config), name, api_key)
    config = config or EngineConfig()
    logger.info("%s cannot generate text: serving /v1/embeddings only", type(model).__name__)
    embedder = encoder_embedder(model, tokenizer, max_waiting=config.max_queue)
    return create_app(None, name, api_key, embedder=embedder, tokenizer=tokenizer, config=config)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (for tests and benchmarks)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]
