"""`llmslim serve [MODEL]`: an OpenAI-compatible HTTP server, on 127.0.0.1 unless told otherwise."""

from __future__ import annotations

import argparse
import logging
import os

from llmslim.cli import _model
from llmslim.cli._args import config_from_args

NAME = "serve"
HELP = "an OpenAI-compatible HTTP server (default: embedded model, nf4, http://127.0.0.1:8000)"
EXAMPLES = (
    "llmslim serve   # embedded SmolLM2-135M-Instruct in nf4 at http://127.0.0.1:8000/v1",
    "llmslim serve smollm2-nf4 --port 8080 --model-name smol --api-key secret",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help=_model.MODEL_HELP)
    _model.add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; others need --api-key or --insecure)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` (default: $LLMSLIM_API_KEY, else none)")
    p.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without an API key")
    p.add_argument("--model-name", default=None, help="model id clients send (default: smollm2-135m-instruct or the folder name)")
    p.add_argument("--max-batch", type=int, default=16, help="sequences decoded together per step (default 16)")
    p.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a slot before 429 (default 64)")
    p.add_argument("--max-tokens", type=int, default=1024, help="server cap on new tokens per request (default 1024)")
    p.add_argument("--max-n", type=int, default=8, help="most choices (n) per request, each a slot of --max-batch (default 8)")
    p.add_argument(
        "--prefix-cache-mib", type=float, default=256.0, help="memory for reused prompt prefixes (prefix caching; 0 = off, default 256)"
    )
    p.add_argument(
        "--prefill-chunk",
        type=int,
        default=512,
        help="most prompt tokens computed between two decode steps (chunked prefill; 0 = whole prompts, default 512)",
    )
    p.add_argument(
        "--threads", type=int, default=None, help="threads the model computes on (default: $OMP_NUM_THREADS, else CPU cores - 1)"
    )
    p.add_argument("--max-context", type=int, default=None, help="tokens per sequence, prompt included (default: the model's)")
    p.add_argument(
        "--max-body-bytes", type=int, default=2 * 1024 * 1024, help="largest request body; a bigger one gets 413 (default 2 MiB)"
    )


def run(args: argparse.Namespace) -> int:
    from llmslim.serve.engine import EngineConfig
    from llmslim.serve.server import API_KEY_ENV, check_bind, check_port, compute_threads, model_id, serve

    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    check_bind(args.host, api_key, args.insecure)  # before the model loads: fail fast
    check_port(args.host, args.port)
    config = config_from_args(EngineConfig, args, context_length=args.max_context)
    threads = compute_threads(args.threads)  # bad values fail before the model loads
    model, tokenizer, path = _model.load(args.model, args)
    name = args.model_name or model_id(args.model, path)
    logging.getLogger("llmslim.serve").setLevel(logging.INFO)  # one line per request, even without -v
    host = f"[{args.host}]" if ":" in args.host else args.host
    key_note = " (API key required)" if api_key else ""
    where = f"http://{host}:{args.port}/v1{key_note}"
    print(f"serving {name} ({args.weights or 'as saved'}) at {where}, {threads} compute thread(s)", flush=True)
    serve(model, tokenizer, name, args.host, args.port, api_key, config, threads=threads)
    return 0
