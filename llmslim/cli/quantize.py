"""`llmslim quantize SRC OUT`: compress a model once, save it, reload it fast."""

from __future__ import annotations

import argparse

from llmslim.cli import _model

NAME = "quantize"
HELP = "quantize a model once and save it"
EXAMPLES = (
    "llmslim quantize default smollm2-nf4",
    "llmslim quantize default smollm2-gptq --method gptq --format bnb   # calibrated; loads in stock transformers + bitsandbytes",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="Hugging Face folder or .gguf file ('default' for the embedded model)")
    p.add_argument("out", help="output folder (must not exist unless --overwrite)")
    _model.add_model_arguments(p, default_weights="nf4")
    p.add_argument(
        "--format", choices=("llmslim", "bnb"), default="llmslim", help="llmslim layout, or bitsandbytes' for stock transformers"
    )
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def run(args: argparse.Namespace) -> int:
    from llmslim.save import check_output, save_pretrained
    from llmslim.stats import model_nbytes

    check_output(args.out, overwrite=args.overwrite, inputs={"input model": None if args.src == "default" else args.src})  # fail fast
    model, tokenizer, path = _model.load(args.src, args, tokenizer_required=False)
    out = save_pretrained(model, args.out, format=args.format, overwrite=args.overwrite, tokenizer=tokenizer)
    print(f"quantized {path} -> {out} ({args.format} layout, {args.weights}, {model_nbytes(model) / 2**20:.1f} MiB of weights)")
    if tokenizer is None:
        print(f"note: {path} has no tokenizer, so none was saved: copy its tokenizer files into {out} to eval or generate with it")
    return 0
