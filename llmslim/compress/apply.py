"""`compress_`: factorize the embedding and share layers of a loaded model, in place.

The same steps as at load time (`llmslim.compress.load`), for a model already in memory: a float
or llmslim-quantized Hugging Face model. Every check runs before anything changes.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
from torch import nn

from llmslim.compress import sharing, svd
from llmslim.compress.embedding import FactorizedEmbedding, FactorizedHead
from llmslim.config import SlimConfig
from llmslim.hf import compat

logger = logging.getLogger(__name__)


@torch.no_grad()
def compress_(model: nn.Module, config: SlimConfig, *, tokenizer=None, token_weights: torch.Tensor | None = None) -> SlimConfig:
    """Apply `config`'s embedding factorization and layer sharing to `model`, in place.

    Args:
        model: a Hugging Face causal LM (float, or quantized by llmslim).
        config: the compression fields of a `SlimConfig` (`embedding_rank` / `embedding_energy`,
            `share_layers`, ...); its quantization fields are not applied here (see `quantize_`).
        tokenizer: tokenizes `config.embedding_corpus` for frequency weights (default: loaded
            from the model's folder).
        token_weights: (V,) row weights for the SVD, instead of measuring them on the corpus.

    Returns:
        `config` with the chosen rank recorded in `embedding_rank`; the model is marked with it.
    """
    plan = plan_compression(model, config)
    if config.factorizes_embedding:
        if token_weights is None and config.embedding_corpus is not None:
            token_weights = corpus_weights(model, config, tokenizer)
        config = factorize_embedding_(model, config, token_weights)
    if plan is not None:
        share_layers_(model, config, plan)
    compat.mark_quantized(model, config)
    return config


@dataclasses.dataclass
class SharingPlan:
    """Which blocks share which leaves."""

    prefix: str  # name of the block list, e.g. "model.layers"
    blocks: nn.ModuleList
    groups: list[list[int]]
    leaves: list[str]


def plan_compression(model: nn.Module, config: SlimConfig) -> SharingPlan | None:
    """Check `config` against `model` (raising before any change); the sharing plan, if sharing."""
    if config.factorizes_embedding:
        embedding_shape(model, config)
    return None if config.share_layers is None else sharing_plan(model, config)


def sharing_plan(model: nn.Module, config: SlimConfig, check: bool = True) -> SharingPlan:
    """Which blocks share which leaves under `config.share_layers` (checked to be shareable unless `check=False`)."""
    prefix, blocks = sharing.block_list(model)
    groups = sharing.sharing_groups(config.share_layers, len(blocks))
    leaves = sharing.shared_leaves(blocks[0], config.share_norms)
    if check:
        sharing.check_shareable(blocks, groups, leaves)
    if isinstance(config.share_init, int):
        short = [g for g in groups if config.share_init >= len(g)]
        if short:
            raise ValueError(
                f"share_init={config.share_init} names no member of the sharing group {short[0]}: use 0..{len(short[0]) - 1} or 'mean'"
            )
    return SharingPlan(prefix, blocks, groups, leaves)


def embedding_shape(model: nn.Module, config: SlimConfig) -> tuple[int, int]:
    """(V, H) of the input embedding, checking it can be factorized at `config.embedding_rank`."""
    embedding = model.get_input_embeddings()
    if isinstance(embedding, FactorizedEmbedding):
        raise ValueError("the input embedding is already factorized: start from the original model to factorize again")
    if type(embedding) is not nn.Embedding:
        raise ValueError(f"can only factorize a plain nn.Embedding, and this model's input embedding is a {type(embedding).__name__}")
    v, h = embedding.weight.shape
    if config.embedding_rank is not None and config.embedding_rank >= min(v, h):
        raise ValueError(
            f"embedding_rank={config.embedding_rank} must be below min(vocab, hidden) = {min(v, h)} for a {v}x{h} embedding, "
            "or the factors are no smaller than the table: choose a smaller rank"
        )
    return v, h


def choose_rank(weight: torch.Tensor, config: SlimConfig, token_weights: torch.Tensor | None) -> int:
    """`config.embedding_rank`, or the smallest rank meeting `config.embedding_energy` for this table."""
    if config.embedding_rank is not None:
        return config.embedding_rank
    rank = svd.rank_for_energy(svd.singular_values(weight, token_weights), config.embedding_energy)
    if rank >= min(weight.shape):
        raise ValueError(
            f"embedding_energy={config.embedding_energy} needs rank {rank}, not below min(vocab, hidden) = {min(weight.shape)}: "
            "the factors would be no smaller than the table; lower embedding_energy"
        )
    return rank


def factorize_embedding_(model: nn.Module, config: SlimConfig, token_weights: torch.Tensor | None = None) -> SlimConfig:
    """Replace the input embedding (and a tied head) by factors; `config` with the rank recorded."""
    embedding = model.get_input_embeddings()
    tied = compat.head_tied_to_embedding(model)
    weight = embedding.weight.data
    rank = choose_rank(weight, config, token_weights)
    a, b = svd.factorize(weight, rank, token_weights)
    factorized = FactorizedEmbedding.from_factors(a.to(weight.device), b.to(weight.device), weight.dtype, embedding.padding_idx)
    if config.embedding_weights is not None:
        factorized.quantize_table_(table_config(config))
    model.set_input_embeddings(factorized)
    factorized_head = tied and not config.untie_embeddings
    if factorized_head:
        model.set_output_embeddings(FactorizedHead(factorized))
    compat.untie_embeddings(model, factorized_head)
    logger.info(
        "embedding %s factorized at rank %d (%s)", tuple(weight.shape), rank, "weighted" if token_weights is not None else "plain SVD"
    )
    return recorded(config, rank)


def share_layers_(model: nn.Module, config: SlimConfig, plan: SharingPlan) -> None:
    """Tie each group's leaves to its first block, initialised from the members' mean or a chosen member."""
    pairs = {}
    for _, group, name in sharing.iter_group_leaves(plan.groups, plan.leaves):
        init = sharing.group_init_weights(plan.blocks, group, name, config.share_init)
        pairs |= sharing.tie_leaf_(plan.blocks, group, name)
        module = plan.blocks[group[0]].get_submodule(name)
        for tensor_name, value in init.items():
            sharing.set_source_tensor(module, tensor_name, value)
    compat.declare_shared(model, {f"{plan.prefix}.{k}": f"{plan.prefix}.{v}" for k, v in pairs.items()})


def corpus_weights(model: nn.Module, config: SlimConfig, tokenizer=None) -> torch.Tensor:
    """Token weights from `config.embedding_corpus`, tokenized with the model's tokenizer."""
    if tokenizer is None:
        from transformers import AutoTokenizer

        source = getattr(model.config, "_name_or_path", "") or getattr(model.config, "name_or_path", "")
        if not source or not Path(source).exists():
            raise ValueError("embedding_corpus needs the model's tokenizer: pass tokenizer= (the model's folder is unknown)")
        tokenizer = AutoTokenizer.from_pretrained(source)
    return svd.corpus_frequencies(config.embedding_corpus, tokenizer, model.get_input_embeddings().weight.shape[0])


def table_config(config: SlimConfig) -> SlimConfig:
    """The SlimConfig of the E-table's quantized layer (`config.embedding_weights`, the rest from `config`)."""
    return SlimConfig(
        weights=config.embedding_weights,
        compute_dtype=config.compute_dtype,
        block_size=config.block_size,
        int8_threshold=config.int8_threshold,
        refine=config.refine and config.embedding_weights == "int4",
    )


def recorded(config: SlimConfig, rank: int) -> SlimConfig:
    """`config` with a rank chosen from `embedding_energy` recorded, so that the saved model reloads identically."""
    if config.embedding_rank == rank:
        return config
    return dataclasses.replace(config, embedding_rank=rank, embedding_energy=None)
