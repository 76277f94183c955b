"""`llmslim compress [MODEL]`: factorize the embedding, share layers, optionally heal by distillation, save."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from llmslim.cli._args import add_weights_argument, config_from_args, parse_share_init, parse_share_layers
from llmslim.cli._training import add_data_arguments, add_train_arguments, train_config_from_args
from llmslim.distill.config import SAVE_DTYPES

NAME = "compress"
HELP = "ALBERT-style compression (factorized embedding, shared layers), healed by distillation from the original"
EXAMPLES = (
    "llmslim compress --out smollm2-e128 --embedding-rank 128   # the embedded model, no healing",
    "llmslim compress --out smollm2-shared --share-layers 2 --heal-steps 200 --seq-len 128 --weights nf4",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="model folder or .gguf (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--out", required=True, help="folder for the compressed model (reloads with llmslim or transformers)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    c = p.add_argument_group("compression")
    c.add_argument("--embedding-rank", type=int, default=None, help="rank E of the factorized embedding (V x E + E x H)")
    c.add_argument("--embedding-energy", type=float, default=None, help="choose the rank keeping this share of the table's energy")
    c.add_argument("--embedding-corpus", default=None, help="text file whose token frequencies weight the SVD")
    add_weights_argument(c, flag="--embedding-weights", with_none=False, help="quantize the V x E table")
    c.add_argument(
        "--untie", dest="untie_embeddings", action="store_true", help="keep a tied head's full weight; factorize the input embedding only"
    )
    c.add_argument("--share-layers", default=None, help="'all', a group size k, or groups such as 0-1,2-4")
    c.add_argument("--share-init", default="mean", help="init of a shared group: mean, or a member index (default mean)")
    c.add_argument("--share-norms", action="store_true", help="share the norm layers too (default: per layer)")
    add_weights_argument(c, with_none=False, help="quantize the result before saving")
    h = p.add_argument_group("healing")
    h.add_argument("--heal-steps", type=int, default=0, help="distillation steps from the original model (default 0: no healing)")
    h.add_argument("--train-all", action="store_true", help="train every parameter, not only the compressed parts")
    add_weights_argument(h, flag="--teacher-weights", default="none", help="quantize the teacher")
    h.add_argument("--alpha-kd", type=float, default=5.0, help="soft-target KL weight (default 5.0)")
    h.add_argument("--alpha-lm", type=float, default=2.0, help="language-modelling loss weight (default 2.0)")
    h.add_argument("--alpha-cos", type=float, default=1.0, help="hidden-state cosine loss weight (default 1.0)")
    h.add_argument("--temperature", type=float, default=2.0, help="soft-target temperature (default 2.0)")
    h.add_argument("--heal-quantized", action="store_true", help="heal with the layers already in --weights' format")
    h.add_argument("--save-dtype", choices=SAVE_DTYPES, default="float32", help="dtype of the saved model")
    add_data_arguments(p)
    add_train_arguments(p)
    p.add_argument("--json", action="store_true", help="also print the result as a JSON object")


def run(args: argparse.Namespace) -> int:
    """Run the compression the parsed flags describe; print what was saved and the perplexities."""
    from llmslim.config import SlimConfig
    from llmslim.distill.heal import HealConfig, compress_model
    from llmslim.save import check_output
    from llmslim.train.checkpoint import check_run_dir

    model = None if args.model in (None, "default") else args.model
    check_output(args.out, overwrite=args.overwrite, inputs={"input model": model}, name="--out")  # before anything loads
    check_run_dir(args.run_dir, args.out)
    compression = config_from_args(
        SlimConfig,
        args,
        ignore=("checkpointing",),  # --checkpointing is the healing loop's, not the saved model's
        share_layers=parse_share_layers(args.share_layers),
        share_init=parse_share_init(args.share_init),
    )
    config = config_from_args(
        HealConfig,
        args,
        out=Path(args.out),
        model=model,
        compression=compression,
        train=args.train if args.heal_steps else None,
        block_size=args.seq_len,
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
