"""Write a randomly initialised bf16 Hugging Face causal-LM checkpoint for load benchmarks.

The weights are random (fixed seed), so the folder is only good for measuring loading time and
memory, never quality. Only the TinyLlama-1.1B shape is offered. Nothing is downloaded: the model
is built from a `LlamaConfig` and saved with `save_pretrained` (safetensors shards of <= 500 MB,
config.json, generation_config.json; no tokenizer).

    python scripts/make_random_checkpoint.py                      # benchmarks/checkpoints/tinyllama-1.1b-random
    python scripts/make_random_checkpoint.py --out DIR --overwrite
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "benchmarks" / "checkpoints" / "tinyllama-1.1b-random"
SEED = 0
MAX_SHARD_SIZE = "500MB"

# TinyLlama-1.1B's architecture (hidden 2048, 22 layers, GQA with 4 KV heads).
SHAPES: dict[str, dict] = {
    "tinyllama": dict(
        hidden_size=2048,
        num_hidden_layers=22,
        intermediate_size=5632,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    ),
    # SmolLM2-135M's shape (its config.json): speed and memory only, never quality
    "smollm2": dict(
        hidden_size=576,
        num_hidden_layers=30,
        intermediate_size=1536,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        tie_word_embeddings=True,
    ),
}


def llama_config(shape: str = "tinyllama"):
    """The `LlamaConfig` of `shape` (bf16)."""
    from transformers import LlamaConfig

    return LlamaConfig(**SHAPES[shape], dtype="bfloat16")


def build_model(shape: str = "tinyllama", seed: int = SEED):
    """A randomly initialised bf16 `LlamaForCausalLM`, created in bf16 (no fp32 copy is ever held)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = LlamaForCausalLM(llama_config(shape))
    finally:
        torch.set_default_dtype(previous)
    return model.to(torch.bfloat16).eval()  # no-op when already bf16


def is_checkpoint(path: Path) -> bool:
    """Whether `path` already holds a model folder (has config.json)."""
    return (path / "config.json").exists()


def make_checkpoint(out: str | os.PathLike = DEFAULT_OUT, shape: str = "tinyllama", overwrite: bool = False, seed: int = SEED) -> Path:
    """Write the random checkpoint to `out` atomically (temp folder, then `os.replace`); skip if present.

    Returns the folder. An existing folder with config.json is kept unless `overwrite`.
    """
    out = Path(out).resolve()
    if is_checkpoint(out) and not overwrite:
        return out
    from llmslim.save import atomic_directory

    with atomic_directory(out, overwrite=True) as tmp:
        model = build_model(shape, seed)
        model.save_pretrained(tmp, max_shard_size=MAX_SHARD_SIZE)
        del model
        for file in tmp.iterdir():
            file.chmod(0o644)  # some shards come out private (mode 0600)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT.relative_to(REPO)})")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tinyllama", help="model shape (default: tinyllama)")
    parser.add_argument("--seed", type=int, default=SEED, help=f"random seed (default: {SEED})")
    parser.add_argument("--overwrite", action="store_true", help="rewrite the folder even if it already has config.json")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if is_checkpoint(args.out) and not args.overwrite:
        print(f"{args.out} already has config.json: kept (pass --overwrite to rewrite it)")
        return 0
    start = time.perf_counter()
    out = make_checkpoint(args.out, args.shape, args.overwrite, args.seed)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file())
    print(f"wrote {out} ({size / 2**30:.2f} GiB) in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
