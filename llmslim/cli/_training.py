"""Options shared by the training verbs (`distill`, `finetune`, `compress`): the data and the training loop."""

from __future__ import annotations

import argparse
from pathlib import Path

from llmslim.cli._args import DeprecatedAlias, config_from_args
from llmslim.data import TINY_SHAKESPEARE
from llmslim.train.config import CHECKPOINTING, MIXED_PRECISION, OPTIMIZERS, TrainConfig

DEFAULT_TRAIN_TEXT = TINY_SHAKESPEARE  # shipped with the package


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    """--train, --eval, --eval-fraction, --text-field, --seq-len (old name --block-size), --eval-tokens."""
    g = p.add_argument_group("data")
    g.add_argument(
        "--train", default=str(DEFAULT_TRAIN_TEXT), help="text file, .jsonl file or saved `datasets` folder (default: Tiny Shakespeare)"
    )
    g.add_argument("--eval", default=None, help="held-out source (default: the last --eval-fraction of --train)")
    g.add_argument("--eval-fraction", type=float, default=0.1, help="share of --train held out for evaluation (default 0.1)")
    g.add_argument("--text-field", default="text", help="text field of JSON lines / dataset column (default: text)")
    g.add_argument("--seq-len", type=int, default=256, help="tokens per packed training sequence (default 256)")
    g.add_argument("--block-size", dest="seq_len", type=int, metavar="SEQ_LEN", action=DeprecatedAlias, new="--seq-len")
    g.add_argument("--eval-tokens", type=int, default=20_000, help="held-out tokens scored at each evaluation (default 20000)")


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `TrainConfig` as flags."""
    g = p.add_argument_group("training loop")
    g.add_argument("--steps", type=int, default=1000, help="optimizer steps (default 1000)")
    g.add_argument("--batch-size", type=int, default=8, help="sequences per process per micro-step (default 8)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step (default 1)")
    g.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (default 2e-4)")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--warmup-steps", type=int, default=None, help="linear warmup steps (default 5%% of --steps)")
    g.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr as a share of --lr after cosine decay (default 0.1)")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm; 0 disables (default 1.0)")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default="auto", help="auto: bitsandbytes 8-bit AdamW on CUDA, AdamW on CPU")
    g.add_argument("--mixed-precision", choices=MIXED_PRECISION, default="auto", help="auto: bf16/fp16 on CUDA, none on CPU")
    g.add_argument(
        "--checkpointing",
        type=checkpointing_policy,
        default="none",
        metavar="{" + ",".join(CHECKPOINTING) + ",K}",
        help="activation checkpointing: none, all (every block), sqrt (~sqrt(n) segments) or K segments (default none)",
    )
    g.add_argument("--offload", action="store_true", help="keep saved activations outside checkpointed segments in CPU memory")
    g.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: only at the end)")
    g.add_argument("--save-every", type=int, default=0, help="write a resumable checkpoint every N steps (0: never)")
    g.add_argument("--keep-checkpoints", type=int, default=2, help="newest checkpoints kept (default 2)")
    g.add_argument("--log-every", type=int, default=10, help="JSON-lines log record every N steps (default 10)")
    g.add_argument("--seed", type=int, default=0, help="seed of data order, masking and dropout (default 0)")
    g.add_argument("--run-dir", default=None, help="folder for checkpoints/ and log.jsonl (default: OUT-run next to --out)")
    g.add_argument("--resume", default=None, help="checkpoint folder, or run folder (its newest checkpoint), to continue from")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def checkpointing_policy(text: str) -> str | int:
    """argparse type of --checkpointing: a policy name or a number of segments."""
    from llmslim.memory.checkpointing import check_policy

    try:
        return check_policy(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def train_config_from_args(args: argparse.Namespace, run_dir: Path | None) -> TrainConfig:
    """The TrainConfig the flags of `add_train_arguments` describe."""
    return config_from_args(TrainConfig, args, max_grad_norm=args.max_grad_norm or None, run_dir=run_dir)
