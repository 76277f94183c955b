"""`llmslim generate [MODEL] PROMPT`: one reply, through the chat template unless --raw."""

from __future__ import annotations

import argparse

from llmslim.cli import _model

NAME = "generate"
HELP = "generate a reply to a prompt"
EXAMPLES = (
    "llmslim generate 'What is the capital of France?'",
    "llmslim generate smollm2-nf4 'Write a haiku about memory.' --max-new-tokens 40",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("args", nargs="+", metavar="[MODEL] PROMPT", help="optional model path, then the prompt")
    _model.add_model_arguments(p)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--raw", action="store_true", help="do not apply the chat template")


def run(args: argparse.Namespace) -> int:
    from llmslim.generate import generate_reply

    if len(args.args) > 2:
        raise ValueError(f"generate takes [MODEL] PROMPT, got {len(args.args)} arguments: quote the prompt")
    model_arg, prompt = (args.args[0], args.args[1]) if len(args.args) == 2 else (None, args.args[0])
    model, tokenizer, _ = _model.load(model_arg, args)
    print(generate_reply(model, tokenizer, prompt, args.max_new_tokens, chat=not args.raw))
    return 0
