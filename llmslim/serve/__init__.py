"""`llmslim serve`: an OpenAI-compatible HTTP server with continuous batching.

    engine.py      one thread owns the model; iteration-level batching over a bounded queue; n choices
    kvcache.py     a KV cache per sequence and per-sequence attention (batching without padding)
    prefixcache.py prompt prefixes' KV caches reused by later prompts (prefix caching), LRU within a memory cap
    grammar.py     structured output: JSON schemas -> llguidance grammars -> a token mask per step
    tools.py       tool calls: tools in the prompt, forced calls under the functions' schemas, calls found in text
    sampling.py    penalties; greedy / temperature / top-k / min-p / top-p, a seeded generator per choice
    logprobs.py    log-softmax of the raw logits, token strings and bytes, the OpenAI logprobs shapes
    embeddings.py  /v1/embeddings: batching, pooling (mean / CLS / last token), normalization; encoder or causal LM
    textstream.py  token ids -> streamed text deltas, stop strings
    protocol.py    OpenAI request models, response / chunk / error bodies
    metrics.py     Prometheus text format
    app.py         FastAPI routes, SSE, API key, one log line per request
    server.py      bind safety, uvicorn

Importing this package imports fastapi only through `app` (loaded on use), never from `import llmslim`.
"""

from __future__ import annotations

from llmslim.serve.engine import Engine, EngineConfig
from llmslim.serve.sampling import SamplingParams

__all__ = ["Engine", "EngineConfig", "SamplingParams", "create_app"]


def create_app(*args, **kwargs):
    """The FastAPI app over an `Engine`; see `llmslim.serve.app.create_app`."""
    from llmslim.serve.app import create_app as _create_app

    return _create_app(*args, **kwargs)
