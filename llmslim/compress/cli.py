"""`llmslim compress`: factorize the embedding, share layers, optionally heal by distillation, save."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from llmslim.train.options import add_data_arguments, add_train_arguments, train_config_from_args

HELP = "ALBERT-style compression (factorized embedding, shared layers), healed by distillation from the original"


def parse_share_layers(text: str | None) -> int | str | list[list[int]] | None:
    """`"all"`, `"3"` (groups of 3) or explicit groups `"0-1,2-4"` / `"0:1;2:3:4"`."""
    if text is None or text == "all":
        return text
    if text.isdigit():
        return int(text)
    try:
        groups = [_group(part) for part in text.replace(";", ",").split(",") if part]
    except ValueError as err:
        raise ValueError(f"--share-layers must be 'all', a group size such as 2, or groups such as 0-1,2-4, got {text!r}") from err
    return groups


def _group(part: str) -> list[int]:
    if "-" in part:
        first, last = (int(x) for x in part.split("-"))
        return list(range(first, last + 1))
    return [int(x) for x in part.split(":")]


def parse_share_init(text: str) -> str | int:
    """`"mean"` or a member index."""
    return int(text) if text.isdigit() else text


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Every option of the compress command."""
    p.add_argument("model", nargs="?", default=None, help="model folder or .gguf (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--out", required=True, help="folder for the compressed model (reloads with llmslim or transformers)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    c = p.add_argument_group("compression")
    c.add_argument("--embedding-rank", type=int, default=None, help="rank E of the factorized embedding (V x E + E x H)")
    c.add_argument("--embedding-energy", type=float, default=None, help="choose the rank keeping this share of the table's energy")
    c.add_argument("--embedding-corpus", default=None, help="text file whose token frequencies weight the SVD")
    c.add_argument("--embedding-weights", choices=("int8", "nf4", "fp4", "int4"), default=None, help="quantize the V x E table")
    c.add_argument("--untie", action="store_true", help="keep a tied head's full weight; factorize the input embedding only")
    c.add_argument("--share-layers", default=None, help="'all', a group size k, or groups such as 0-1,2-4")
    c.add_argument("--share-init", default="mean", help="init of a shared group: mean, or a member index (default mean)")
    c.add_argument("--share-norms", action="store_true", help="share the norm layers too (default: per layer)")
    c.add_argument("--weights", choices=("int8", "nf4", "fp4", "int4"), default=None, help="quantize the result before saving")
    h = p.add_argument_group("healing")
    h.add_argument("--heal-steps", type=int, default=0, help="distillation steps from the original model (default 0: no healing)")
    h.add_argument("--train-all", action="store_true", help="train every parameter, not only the compressed parts")
    h.add_argument("--teacher-weights", choices=("none", "int8", "nf4", "fp4", "int4"), default="none", help="quantize the teacher")
    h.add_argument("--alpha-kd", type=float, default=5.0, help="soft-target KL weight (default 5.0)")
    h.add_argument("--alpha-lm", type=float, default=2.0, help="language-modelling loss weight (default 2.0)")
    h.add_argument("--alpha-cos", type=float, default=1.0, help="hidden-state cosine loss weight (default 1.0)")
    h.add_argument("--temperature", type=float, default=2.0, help="soft-target temperature (default 2.0)")
    h.add_argument("--heal-quantized", action="store_true", help="heal with the layers already in --weights' format")
    h.add_argument("--save-dtype", choices=("float32", "bfloat16", "float16"), default="float32", help="dtype of the saved model")
    add_data_arguments(p)
    add_train_arguments(p)
    p.add_argument("--json", action="store_true", help="also print the result as a JSON object")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `compress` on an argparse sub-command set; the handler is `cmd_compress`."""
    p = subparsers.add_parser("compress", help=HELP, description=HELP)
    add_arguments(p)
    p.set_defaults(func=cmd_compress)
    return p


def cmd_compress(args: argparse.Namespace) -> int:
    """Run the compression the parsed flags describe; print what was saved and the perplexities."""
    from llmslim.config import SlimConfig
    from llmslim.distill.heal import HealConfig, compress_model
    from llmslim.save import check_output
    from llmslim.train.checkpoint import check_run_dir

    model = None if args.model in (None, "default") else args.model
    check_output(args.out, overwrite=args.overwrite, inputs={"input model": model}, name="--out")  # before anything loads
    check_run_dir(args.run_dir, args.out)
    compression = SlimConfig(
        weights=args.weights,
        embedding_rank=args.embedding_rank,
        embedding_energy=args.embedding_energy,
        embedding_corpus=args.embedding_corpus,
        embedding_weights=args.embedding_weights,
        untie_embeddings=args.untie,
        share_layers=parse_share_layers(args.share_layers),
        share_init=parse_share_init(args.share_init),
        share_norms=args.share_norms,
    )
    out = Path(args.out)
    config = HealConfig(
        out=out,
        model=model,
        compression=compression,
        heal_steps=args.heal_steps,
        train=args.train if args.heal_steps else None,
        train_all=args.train_all,
        teacher_weights=args.teacher_weights,
        alpha_kd=args.alpha_kd,
        alpha_lm=args.alpha_lm,
        alpha_cos=args.alpha_cos,
        temperature=args.temperature,
        block_size=args.block_size,
        eval_tokens=args.eval_tokens,
        save_dtype=args.save_dtype,
        heal_quantized=args.heal_quantized,
        overwrite=args.overwrite,
    )
    run_dir = Path(args.run_dir) if args.run_dir else None
    result = compress_model(config, train_config_from_args(args, run_dir), progress=not args.no_progress)
    _report(result, args)
    return 0


def _report(result, args: argparse.Namespace) -> None:
    from llmslim.stats import model_nbytes

    summary = {
        "out": str(result.out),
        "embedding_rank": result.config.embedding_rank,
        "share_layers": result.config.share_layers,
        "trainable_params": result.trainable_params,
        "nbytes": model_nbytes(result.model),
        **{f"before_{k}": v for k, v in result.metrics_before.items()},
        **result.metrics_after,
    }
    if args.json:
        print(json.dumps(summary))
    print(f"compressed model saved to {result.out} ({summary['nbytes'] / 2**20:.1f} MiB of weights)")
    if "eval_perplexity" in result.metrics_after:
        before = result.metrics_before.get("eval_perplexity", float("nan"))
        print(f"eval perplexity: {before:.2f} before healing, {result.metrics_after['eval_perplexity']:.2f} after")
