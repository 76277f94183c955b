"""`llmslim merge BASE ADAPTER OUT`: a LoRA adapter merged into a quantized base (dequantize, add, quantize), saved."""

from __future__ import annotations

import argparse

from llmslim.cli._args import add_weights_argument

NAME = "merge"
HELP = "merge a LoRA adapter into a quantized base (dequantize, add, quantize) and save it"
EXAMPLES = (
    "llmslim merge default smollm2-adapter smollm2-merged   # the adapter `llmslim finetune` wrote",
    "llmslim merge default adapter-qv smollm2-qv-int4",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("base", help="base model folder (float, or saved by llmslim); 'default' for the embedded model")
    p.add_argument("adapter", help="adapter folder written by `llmslim finetune`")
    p.add_argument("out", help="folder for the merged, quantized model")
    add_weights_argument(p, with_none=False, help="format (default: the adapter's base format)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def run(args: argparse.Namespace) -> int:
    """Merge and save; print what was written."""
    from llmslim.finetune.merge import merge

    base = None if args.base == "default" else args.base
    result = merge(base, args.adapter, args.out, weights=args.weights, overwrite=args.overwrite)
    print(f"merged {len(result.merged_layers)} {result.weights} layers; saved to {result.out}")
    return 0
