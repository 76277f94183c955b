"""`llmslim demo`: the main job on the default model: memory, perplexity, an answer."""

from __future__ import annotations

import argparse

from llmslim.cli._args import add_weights_argument
from llmslim.data import WIKITEXT2_TEST as DEFAULT_TEXT  # shipped with the package

NAME = "demo"
HELP = "the main job on the default model: memory, perplexity, an answer"
EXAMPLES = (
    "llmslim demo",
    "llmslim demo --weights int4 --tokens 2048",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_weights_argument(p, with_none=False, default="nf4", help="weight format of the quantized model (default nf4)")
    p.add_argument("--tokens", type=int, default=4096, help="tokens of WikiText-2 for the perplexity (default 4096)")


def run(args: argparse.Namespace) -> int:
    from llmslim.demo import run_demo

    run_demo(args.weights, args.tokens, DEFAULT_TEXT)
    return 0
