"""ALBERT-style compression of pretrained models: factorized embeddings and cross-layer sharing.

- `svd.py`: (frequency-weighted) truncated SVD of an embedding table, rank from an energy budget.
- `embedding.py`: `FactorizedEmbedding` (V x E table, E x H projection) and `FactorizedHead`
  (tied logits through the factors).
- `sharing.py`: groups of blocks sharing one set of weights.
- `apply.py`: `compress_(model, config)` for a model in memory.
- `load.py`: the same at load time (both doors of `SlimConfig`), streaming.

Healing (`compress_model()`, which trains) is an application and lives in `llmslim.distill.heal`;
the `llmslim compress` command in `llmslim.cli.compress`.
"""

from __future__ import annotations

__all__ = ["FactorizedEmbedding", "FactorizedHead", "compress_", "factorize"]


def __getattr__(name: str):
    if name in ("FactorizedEmbedding", "FactorizedHead"):
        from llmslim.compress import embedding

        return getattr(embedding, name)
    if name == "compress_":
        from llmslim.compress.apply import compress_

        return compress_
    if name == "factorize":
        from llmslim.compress.svd import factorize

        return factorize
    raise AttributeError(f"module 'llmslim.compress' has no attribute {name!r}")
