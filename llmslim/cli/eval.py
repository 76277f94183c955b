"""`llmslim eval [MODEL]`: perplexity on a text file (WikiText-2 test by default)."""

from __future__ import annotations

import argparse
import json

from llmslim.cli import _model
from llmslim.data import WIKITEXT2_TEST as DEFAULT_TEXT  # shipped with the package

NAME = "eval"
HELP = "perplexity on a text file"
EXAMPLES = (
    "llmslim eval   # the embedded model in nf4, on 20,000 tokens of WikiText-2",
    "llmslim eval smollm2-nf4 --tokens 4096 --json",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help=_model.MODEL_HELP)
    _model.add_model_arguments(p)
    p.add_argument("--text", default=str(DEFAULT_TEXT), help="UTF-8 text file (default: WikiText-2 test, shipped with llmslim)")
    p.add_argument("--tokens", type=int, default=20_000, help="number of tokens scored (default 20000)")
    p.add_argument("--json", action="store_true", help="also print the result as a JSON object")


def run(args: argparse.Namespace) -> int:
    from llmslim.evaluate import load_tokens, perplexity

    model, tokenizer, path = _model.load(args.model, args)
    result = perplexity(model, load_tokens(tokenizer, args.text, args.tokens))
    if args.json:
        print(json.dumps({"model": str(path), "weights": args.weights, "text": args.text, **result.to_dict()}))
    print(f"perplexity: {result.perplexity:.2f}")
    return 0
