"""`llmslim distill [TEACHER]` (and scripts/distill.py): a DistilBERT-style student; prints on the main process only."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from llmslim.cli._args import add_weights_argument, config_from_args, parse_share_layers
from llmslim.cli._training import add_data_arguments, add_train_arguments, train_config_from_args
from llmslim.distill.config import COS_LAYERS, DIVERGENCES, OBJECTIVES, RECIPES, SAVE_DTYPES, TEACHER_OFFLOAD

NAME = "distill"
HELP = "distill a smaller student from a (quantized, offloaded or cached) teacher"
EXAMPLES = (
    "llmslim distill --out smollm2-student --student-layers 15 --steps 200   # on Tiny Shakespeare",
    "llmslim distill --out student-10 --student-layers 10 --teacher-weights nf4 --teacher-cache cache-nf4 --steps 400",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("teacher", nargs="?", default=None, help="teacher folder or .gguf (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--out", required=True, help="folder for the student (a standard Hugging Face folder with tokenizer)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    s = p.add_argument_group("student")
    s.add_argument("--student-layers", type=int, default=None, help="student depth, layers spread DistilBERT-style (default: half)")
    s.add_argument("--student-layer-map", default=None, help="teacher layer of each student layer, e.g. 0,2,4,7,9,11")
    s.add_argument("--student", default=None, help="start from this model folder instead of copying teacher layers")
    s.add_argument("--student-embedding-rank", type=int, default=None, help="factorize the student's embedding at rank E (ALBERT)")
    s.add_argument("--student-share-layers", default=None, help="share the student's blocks: all, a group size k, or groups 0-1,2-3")
    s.add_argument("--save-dtype", choices=SAVE_DTYPES, default="float32", help="dtype of the saved student")
    t = p.add_argument_group("teacher and loss")
    add_weights_argument(t, flag="--teacher-weights", default="none", help="quantize the teacher through llmslim (default none)")
    t.add_argument("--teacher-dtype", default=None, help="dtype of the float teacher (default: the checkpoint's)")
    t.add_argument("--objective", choices=OBJECTIVES, default="auto", help="causal or masked LM (default: from the teacher)")
    t.add_argument(
        "--recipe",
        choices=tuple(RECIPES),
        default="kd",
        help="kd: forward KL at T=1, 0.5 KL + 0.5 LM (default); distilbert: 5 KL at T=2, 2 LM, 1 cosine",
    )
    t.add_argument("--divergence", choices=DIVERGENCES, default="forward", help="KL(teacher||student) forward (default) or reverse")
    t.add_argument("--kd-ratio", type=float, default=None, help="KL share of a KL + LM mix: --alpha-kd R --alpha-lm 1-R")
    t.add_argument(
        "--kd-ratio-end",
        type=float,
        default=None,
        help="KL share at the last step; it moves linearly from the first step's (--kd-ratio, or the recipe's 0.5)",
    )
    t.add_argument("--alpha-kd", type=float, default=None, help="weight of the soft-target KL loss (default: the recipe's)")
    t.add_argument("--alpha-lm", type=float, default=None, help="weight of the language-modelling loss (default: the recipe's)")
    t.add_argument("--alpha-cos", type=float, default=None, help="weight of the hidden-state cosine loss (default: the recipe's)")
    t.add_argument("--temperature", type=float, default=None, help="soft-target temperature (default: the recipe's)")
    t.add_argument("--teacher-cache", default=None, help="folder of cached teacher logits: built once if empty, then read (no teacher)")
    t.add_argument("--cache-k", type=int, default=64, help="logits kept per position in --teacher-cache (default 64)")
    t.add_argument("--cache-only", action="store_true", help="fill --teacher-cache for this run's blocks and stop (no student)")
    t.add_argument("--teacher-offload", choices=TEACHER_OFFLOAD, default=None, help="keep the teacher's blocks in RAM or on disk")
    t.add_argument(
        "--teacher-offload-budget",
        default=None,
        help="with --teacher-offload: teacher weights kept resident, e.g. 300MiB (default: 80%% of free RAM)",
    )
    t.add_argument("--cos-layers", choices=COS_LAYERS, default="last", help="hidden states aligned by the cosine loss (default last)")
    t.add_argument("--mlm-probability", type=float, default=0.15, help="masked-LM masking share (default 0.15)")
    add_data_arguments(p)
    add_train_arguments(p)
    p.add_argument("--json", action="store_true", help="also print the result as a JSON object")


def run(args: argparse.Namespace) -> int:
    """Run the distillation the parsed flags describe; print `eval perplexity: N` (and JSON with --json)."""
    from llmslim.distill.config import DistillConfig
    from llmslim.distill.run import distill
    from llmslim.distill.student import parse_layer_map
    from llmslim.save import check_output

    out = check_output(args.out, overwrite=args.overwrite, name="--out")  # a usable name before the run folder is derived
    run_dir = Path(args.run_dir) if args.run_dir else out.with_name(out.name + "-run")
    config = config_from_args(
        DistillConfig,
        args,
        out=out,
        teacher=None if args.teacher in (None, "default") else args.teacher,
        student_layer_map=None if args.student_layer_map is None else parse_layer_map(args.student_layer_map),
        student_share_layers=parse_share_layers(args.student_share_layers),
        block_size=args.seq_len,
    )
    if args.cache_only:
        from llmslim.distill.run import build_teacher_cache

        cache = build_teacher_cache(config, train_config_from_args(args, run_dir), progress=not args.no_progress)
        size, tokens = cache.nbytes(), len(cache.rows) * config.block_size
        print(f"teacher cache {cache.folder}: {len(cache.rows)} blocks, {size / 2**20:.1f} MiB ({size / max(tokens, 1):.0f} B/token)")
        return 0
    result = distill(config, train_config_from_args(args, run_dir), resume=args.resume, progress=not args.no_progress)
    if result.is_main:
        _report(result, args, run_dir)
    return 0


def _report(result, args: argparse.Namespace, run_dir: Path) -> None:
    if args.json:
        summary = {
            "out": str(result.out),
            "run_dir": str(run_dir),
            "layer_map": result.layer_map,
            "teacher_params": result.teacher_params,
            "student_params": result.student_params,
            "steps": args.steps,
            **result.metrics,
        }
        print(json.dumps(summary))
    print(f"student saved to {result.out} ({result.student_params / 1e6:.1f}M parameters, teacher {result.teacher_params / 1e6:.1f}M)")
    if "eval_perplexity" in result.metrics:
        print(f"eval perplexity: {result.metrics['eval_perplexity']:.2f}")
    if "eval_cosine" in result.metrics:
        print(f"eval cosine: {result.metrics['eval_cosine']:.4f}")
