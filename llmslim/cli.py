"""The `llmslim` command: parse, call the library, print. No logic of its own beyond that."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from llmslim.data import WIKITEXT2_TEST as DEFAULT_TEXT  # shipped with the package

WEIGHT_CHOICES = ("none", "int8", "nf4", "fp4", "int4")


def _add_model_options(p: argparse.ArgumentParser, default_weights: str | None = None) -> None:
    p.add_argument(
        "--weights",
        choices=WEIGHT_CHOICES,
        default=default_weights,
        help="weight format (default: nf4 for a float model, the saved format for an llmslim checkpoint)",
    )
    p.add_argument("--block-size", type=int, default=64, help="elements per absmax block for 4-bit formats (default 64)")
    p.add_argument("--no-double-quant", action="store_true", help="keep 4-bit absmax in float32")
    p.add_argument("--exclude", nargs="*", default=None, help="module-name patterns to keep in float (default: lm_head)")
    p.add_argument("--include", nargs="*", default=None, help="module-name patterns to quantize (default: every linear layer)")
    p.add_argument("--dtype", default=None, help="dtype of the layers kept in float (default: the checkpoint's)")
    p.add_argument("--device-map", default=None, help="'cpu', 'cuda', 'auto' (default: cuda if available)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmslim", description="Make large language models fit: quantize, evaluate, generate.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what llmslim does")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model once and save it")
    q.add_argument("src", help="Hugging Face folder or .gguf file ('default' for the embedded model)")
    q.add_argument("out", help="output folder (must not exist unless --overwrite)")
    _add_model_options(q, default_weights="nf4")
    q.add_argument(
        "--format", choices=("llmslim", "bnb"), default="llmslim", help="llmslim layout, or bitsandbytes' for stock transformers"
    )
    q.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")

    e = sub.add_parser("eval", help="perplexity on a text file")
    e.add_argument("model", nargs="?", default=None, help="model folder or .gguf (default: embedded SmolLM2-135M-Instruct)")
    _add_model_options(e)
    e.add_argument("--text", default=str(DEFAULT_TEXT), help="UTF-8 text file (default: WikiText-2 test, shipped with llmslim)")
    e.add_argument("--tokens", type=int, default=20_000, help="number of tokens scored (default 20000)")
    e.add_argument("--json", action="store_true", help="also print the result as a JSON object")

    g = sub.add_parser("generate", help="generate a reply to a prompt")
    g.add_argument("args", nargs="+", metavar="[MODEL] PROMPT", help="optional model path, then the prompt")
    _add_model_options(g)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--raw", action="store_true", help="do not apply the chat template")

    sub.add_parser("env", help="versions, devices and active kernel backends")

    from llmslim.distill.cli import add_parser as add_distill_parser

    add_distill_parser(sub)

    from llmslim.finetune.cli import add_merge_parser
    from llmslim.finetune.cli import add_parser as add_finetune_parser

    add_finetune_parser(sub)
    add_merge_parser(sub)

    from llmslim.plan.cli import add_parser as add_plan_parser

    add_plan_parser(sub)

    from llmslim.compress.cli import add_parser as add_compress_parser

    add_compress_parser(sub)

    _add_serve_parser(sub)

    d = sub.add_parser("demo", help="the main job on the default model: memory, perplexity, an answer")
    d.add_argument("--weights", choices=WEIGHT_CHOICES[1:], default="nf4")
    d.add_argument("--tokens", type=int, default=4096, help="tokens of WikiText-2 for the perplexity (default 4096)")
    return parser


def _cmd_distill(args) -> int:
    from llmslim.distill.cli import cmd_distill

    return cmd_distill(args)


def _cmd_finetune(args) -> int:
    from llmslim.finetune.cli import cmd_finetune

    return cmd_finetune(args)


def _cmd_compress(args) -> int:
    from llmslim.compress.cli import cmd_compress

    return cmd_compress(args)


def _cmd_plan(args) -> int:
    from llmslim.plan.cli import cmd_plan

    return cmd_plan(args)


def _cmd_merge(args) -> int:
    from llmslim.finetune.cli import cmd_merge

    return cmd_merge(args)


# --- serve (issue 4) ------------------------------------------------------------------------


def _add_serve_parser(sub) -> None:
    s = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (default: embedded model, nf4, http://127.0.0.1:8000)")
    s.add_argument("model", nargs="?", default=None, help="model folder or .gguf (default: embedded SmolLM2-135M-Instruct)")
    _add_model_options(s)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; others need --api-key or --insecure)")
    s.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    s.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` (default: $LLMSLIM_API_KEY, else none)")
    s.add_argument("--insecure", action="store_true", help="allow a non-loopback --host without an API key")
    s.add_argument("--model-name", default=None, help="model id clients send (default: smollm2-135m-instruct or the folder name)")
    s.add_argument("--max-batch", type=int, default=16, help="sequences decoded together per step (default 16)")
    s.add_argument("--max-queue", type=int, default=64, help="requests that may wait for a slot before 429 (default 64)")
    s.add_argument("--max-tokens", type=int, default=1024, help="server cap on new tokens per request (default 1024)")
    s.add_argument("--max-context", type=int, default=None, help="tokens per sequence, prompt included (default: the model's)")
    s.add_argument(
        "--max-body-bytes", type=int, default=2 * 1024 * 1024, help="largest request body; a bigger one gets 413 (default 2 MiB)"
    )


def cmd_serve(args) -> int:
    import os

    from llmslim.serve.engine import EngineConfig
    from llmslim.serve.server import API_KEY_ENV, check_bind, check_port, model_id, serve

    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    check_bind(args.host, api_key, args.insecure)  # before the model loads: fail fast
    check_port(args.host, args.port)
    limits = dict(max_batch=args.max_batch, max_queue=args.max_queue, max_tokens=args.max_tokens, max_body_bytes=args.max_body_bytes)
    config = EngineConfig(context_length=args.max_context, **limits)
    model, tokenizer, path = _load(args.model, args)
    name = args.model_name or model_id(args.model, path)
    logging.getLogger("llmslim.serve").setLevel(logging.INFO)  # one line per request, even without -v
    host = f"[{args.host}]" if ":" in args.host else args.host
    key_note = " (API key required)" if api_key else ""
    print(f"serving {name} ({args.weights or 'as saved'}) at http://{host}:{args.port}/v1{key_note}", flush=True)
    serve(model, tokenizer, name, args.host, args.port, api_key, config)
    return 0


# --- end serve --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _COMMANDS[args.command](args)
    except (ValueError, OSError) as err:  # bad input or environment (OSError covers missing, existing, unreadable files): no traceback
        print(f"llmslim {args.command}: error: {err}", file=sys.stderr)
        return 2


def _slim_config(args):
    from llmslim import SlimConfig

    if args.weights is None:
        return None
    extra = {} if args.exclude is None else {"exclude": args.exclude}
    return SlimConfig(
        weights=None if args.weights == "none" else args.weights,
        block_size=args.block_size,
        double_quant=False if args.no_double_quant else None,
        include=args.include,
        **extra,
    )


def _load(model_arg: str | None, args, *, tokenizer_required: bool = True):
    """Load MODEL per the command-line options; a float model with no --weights gets nf4.

    The tokenizer is None only when MODEL has none and not `tokenizer_required`.
    """
    from transformers import AutoConfig

    import llmslim
    from llmslim import models

    path = models.resolve(None if model_arg in (None, "default") else model_arg)
    config = _slim_config(args)
    if config is None and getattr(AutoConfig.from_pretrained(path), "quantization_config", None) is None:
        args.weights = "nf4"
        config = _slim_config(args)
    tokenizer = models.load_tokenizer(path, needed_for=f"llmslim {args.command}" if tokenizer_required else None)  # before the weights
    model = llmslim.from_pretrained(path, config, dtype=args.dtype, device_map=args.device_map)
    if config is not None and config.weights is not None:
        _check_layers_matched(model, args)
    return model, tokenizer, path


def _check_layers_matched(model, args) -> None:
    """A --include / --exclude pattern that matches no layer, or a selection that quantizes none, is an error, not a float model."""
    import fnmatch

    from llmslim.quant.modules import SlimLinear, quantizable

    names = [name for name, module in model.named_modules() if quantizable(module) or isinstance(module, SlimLinear)]
    options = {"--include": args.include, "--exclude": args.exclude}
    for option, patterns in options.items():
        # matched as SlimConfig.selects matches them: the full name, or its suffix after a dot
        unmatched = [p for p in patterns or [] if not any(fnmatch.fnmatchcase(n, p) or fnmatch.fnmatchcase(n, f"*.{p}") for n in names)]
        if unmatched:
            raise ValueError(f"{option} {' '.join(unmatched)} matched no linear layer; the layers are named like {_examples(names)}")
    if not any(isinstance(module, SlimLinear) for module in model.modules()):
        given = " ".join(f"{option} {' '.join(patterns)}" for option, patterns in options.items() if patterns) or "the options"
        raise ValueError(f"no layer was quantized to {args.weights}: {given} leave every linear layer in float ({_examples(names)})")


def _examples(names: list[str], limit: int = 4) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def cmd_quantize(args) -> int:
    from llmslim.save import check_output, save_pretrained
    from llmslim.stats import model_nbytes

    check_output(args.out, overwrite=args.overwrite, inputs={"input model": None if args.src == "default" else args.src})  # fail fast
    model, tokenizer, path = _load(args.src, args, tokenizer_required=False)
    out = save_pretrained(model, args.out, format=args.format, overwrite=args.overwrite, tokenizer=tokenizer)
    print(f"quantized {path} -> {out} ({args.format} layout, {args.weights}, {model_nbytes(model) / 2**20:.1f} MiB of weights)")
    if tokenizer is None:
        print(f"note: {path} has no tokenizer, so none was saved: copy its tokenizer files into {out} to eval or generate with it")
    return 0


def cmd_eval(args) -> int:
    from llmslim.evaluate import load_tokens, perplexity

    model, tokenizer, path = _load(args.model, args)
    result = perplexity(model, load_tokens(tokenizer, args.text, args.tokens))
    if args.json:
        print(json.dumps({"model": str(path), "weights": args.weights, "text": args.text, **result.to_dict()}))
    print(f"perplexity: {result.perplexity:.2f}")
    return 0


def cmd_generate(args) -> int:
    from llmslim.generate import generate_reply

    if len(args.args) > 2:
        raise ValueError(f"generate takes [MODEL] PROMPT, got {len(args.args)} arguments: quote the prompt")
    model_arg, prompt = (args.args[0], args.args[1]) if len(args.args) == 2 else (None, args.args[0])
    model, tokenizer, _ = _load(model_arg, args)
    print(generate_reply(model, tokenizer, prompt, args.max_new_tokens, chat=not args.raw))
    return 0


def cmd_env(args) -> int:
    from llmslim.env import environment_report

    for key, value in environment_report().items():
        print(f"{key:24s} {value}")
    return 0


def cmd_demo(args) -> int:
    from llmslim.demo import run_demo

    run_demo(args.weights, args.tokens, DEFAULT_TEXT)
    return 0


_COMMANDS = {
    "quantize": cmd_quantize,
    "eval": cmd_eval,
    "generate": cmd_generate,
    "env": cmd_env,
    "demo": cmd_demo,
    "serve": cmd_serve,
    "distill": _cmd_distill,
    "finetune": _cmd_finetune,
    "merge": _cmd_merge,
    "plan": _cmd_plan,
    "compress": _cmd_compress,
}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
