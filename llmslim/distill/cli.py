"""`llmslim distill` and `scripts/distill.py`: parse, call `distill()`, print (main process only)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from llmslim.distill.config import COS_LAYERS, OBJECTIVES, TEACHER_WEIGHTS
from llmslim.train.options import add_data_arguments, add_train_arguments, train_config_from_args

HELP = "distill a smaller student from a (quantized) teacher, DistilBERT-style"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Every option of the distill command."""
    p.add_argument("teacher", nargs="?", default=None, help="teacher folder or .gguf (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--out", required=True, help="folder for the student (a standard Hugging Face folder with tokenizer)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    s = p.add_argument_group("student")
    s.add_argument("--student-layers", type=int, default=None, help="student depth, layers spread DistilBERT-style (default: half)")
    s.add_argument("--student-layer-map", default=None, help="teacher layer of each student layer, e.g. 0,2,4,7,9,11")
    s.add_argument("--student", default=None, help="start from this model folder instead of copying teacher layers")
    s.add_argument("--student-embedding-rank", type=int, default=None, help="factorize the student's embedding at rank E (ALBERT)")
    s.add_argument("--student-share-layers", default=None, help="share the student's blocks: all, a group size k, or groups 0-1,2-3")
    s.add_argument("--save-dtype", choices=("float32", "bfloat16", "float16"), default="float32", help="dtype of the saved student")
    t = p.add_argument_group("teacher and loss")
    t.add_argument("--teacher-weights", choices=TEACHER_WEIGHTS, default="none", help="quantize the teacher through llmslim (default none)")
    t.add_argument("--teacher-dtype", default=None, help="dtype of the float teacher (default: the checkpoint's)")
    t.add_argument("--objective", choices=OBJECTIVES, default="auto", help="causal or masked LM (default: from the teacher)")
    t.add_argument("--alpha-kd", type=float, default=5.0, help="weight of the soft-target KL loss (default 5.0)")
    t.add_argument("--alpha-lm", type=float, default=2.0, help="weight of the language-modelling loss (default 2.0)")
    t.add_argument("--alpha-cos", type=float, default=1.0, help="weight of the hidden-state cosine loss (default 1.0)")
    t.add_argument("--temperature", type=float, default=2.0, help="soft-target temperature (default 2.0)")
    t.add_argument("--cos-layers", choices=COS_LAYERS, default="last", help="hidden states aligned by the cosine loss (default last)")
    t.add_argument("--mlm-probability", type=float, default=0.15, help="masked-LM masking share (default 0.15)")
    add_data_arguments(p)
    add_train_arguments(p)
    p.add_argument("--json", action="store_true", help="also print the result as a JSON object")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `distill` on an argparse sub-command set; the handler is `cmd_distill`."""
    p = subparsers.add_parser("distill", help=HELP, description=HELP)
    add_arguments(p)
    p.set_defaults(func=cmd_distill)
    return p


def cmd_distill(args: argparse.Namespace) -> int:
    """Run the distillation the parsed flags describe; print `eval perplexity: N` (and JSON with --json)."""
    from llmslim.compress.cli import parse_share_layers
    from llmslim.distill.config import DistillConfig
    from llmslim.distill.run import distill
    from llmslim.distill.student import parse_layer_map
    from llmslim.save import check_output

    out = check_output(args.out, overwrite=args.overwrite, name="--out")  # a usable name before the run folder is derived
    run_dir = Path(args.run_dir) if args.run_dir else out.with_name(out.name + "-run")
    config = DistillConfig(
        out=out,
        teacher=None if args.teacher in (None, "default") else args.teacher,
        student_layers=args.student_layers,
        student_layer_map=None if args.student_layer_map is None else parse_layer_map(args.student_layer_map),
        student=args.student,
        student_embedding_rank=args.student_embedding_rank,
        student_share_layers=parse_share_layers(args.student_share_layers),
        save_dtype=args.save_dtype,
        teacher_weights=args.teacher_weights,
        teacher_dtype=args.teacher_dtype,
        objective=args.objective,
        alpha_kd=args.alpha_kd,
        alpha_lm=args.alpha_lm,
        alpha_cos=args.alpha_cos,
        temperature=args.temperature,
        cos_layers=args.cos_layers,
        mlm_probability=args.mlm_probability,
        train=args.train,
        eval=args.eval,
        eval_fraction=args.eval_fraction,
        text_field=args.text_field,
        block_size=args.block_size,
        eval_tokens=args.eval_tokens,
        overwrite=args.overwrite,
    )
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


def main(argv: list[str] | None = None) -> int:
    """`scripts/distill.py`: the same options as `llmslim distill`, runnable under `accelerate launch`."""
    parser = argparse.ArgumentParser(prog="distill.py", description=HELP)
    parser.add_argument("-v", "--verbose", action="store_true", help="log what llmslim does")
    add_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return cmd_distill(args)
    except (ValueError, OSError) as err:  # bad input or environment: one line, no traceback
        print(f"distill: error: {err}", file=sys.stderr)
        return 2
