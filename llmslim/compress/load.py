"""Compression at load time: the skeleton's compressed modules, and the routing of float source tensors.

With a float checkpoint, the input embedding's V x H tensor is factorized as it is read (one
source tensor in memory, as for quantization), and the tensors of a sharing group's blocks are
averaged (or one member's kept) as they stream past, then written once into the shared module
(quantized if it is a quantized layer). With a checkpoint saved compressed, the skeleton simply
has the compressed shapes and sharing, and the ordinary loader fills it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from llmslim.compress import sharing, svd
from llmslim.compress.apply import SharingPlan, choose_rank, embedding_shape, plan_compression, recorded, sharing_plan, table_config
from llmslim.compress.embedding import FactorizedEmbedding, FactorizedHead
from llmslim.config import SlimConfig
from llmslim.hf import compat
from llmslim.quant.modules import SlimLinear


def prepare_compression(
    model: nn.Module, config: SlimConfig, source: Path | None = None, pre_quantized: bool = False, tie_now: bool = True
) -> SourceRouter | None:
    """Give a (meta) skeleton its compressed modules and sharing; for a float source, the router of its tensors.

    Args:
        model: the skeleton, after `prepare_skeleton` (quantized layers already in place).
        config: the SlimConfig being loaded.
        source: the model folder (its tokenizer weights the SVD when `config.embedding_corpus` is set).
        pre_quantized: the checkpoint was saved compressed (no routing needed).
        tie_now: share the blocks' modules now; False only declares the shared names (transformers'
            loader would overwrite a shared module's buffers with the members' "missing" ones), and
            `share_loaded_` ties them after loading.
    """
    if not config.compresses:
        return None
    plan = plan_compression(model, config)
    embedding_name = _skeleton_embedding(model, config, pre_quantized) if config.factorizes_embedding else None
    if plan is not None:
        if tie_now:
            share_loaded_(model, config)
        else:
            compat.declare_shared(model, _shared_names(plan))
    if pre_quantized:
        return None
    return SourceRouter(model, config, source, embedding_name, plan)


def share_loaded_(model: nn.Module, config: SlimConfig) -> None:
    """Point each sharing group's blocks at its first block's leaves (no initialisation: the weights are already the group's)."""
    plan = sharing_plan(model, config, check=False)  # members may still hold their pre-sharing (e.g. float) modules
    for _, group, name in sharing.iter_group_leaves(plan.groups, plan.leaves):
        sharing.tie_leaf_(plan.blocks, group, name)
    compat.declare_shared(model, _shared_names(plan))


def _shared_names(plan: SharingPlan) -> dict[str, str]:
    """{member tensor name: source tensor name}, full names, for every shared tensor."""
    pairs = {}
    for _, group, name in sharing.iter_group_leaves(plan.groups, plan.leaves):
        tensors = plan.blocks[group[0]].get_submodule(name).state_dict()
        pairs |= {f"{plan.prefix}.{i}.{name}.{t}": f"{plan.prefix}.{group[0]}.{name}.{t}" for i in group[1:] for t in tensors}
    return pairs


def _skeleton_embedding(model: nn.Module, config: SlimConfig, pre_quantized: bool) -> str:
    """Swap in an empty FactorizedEmbedding (and head); its name."""
    v, h = embedding_shape(model, config)
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if pre_quantized and config.embedding_rank is None:
        raise ValueError("a model saved compressed must record embedding_rank in its quantization_config: re-save it with llmslim")
    rank = config.embedding_rank or min(v, h) - 1  # an energy budget's rank is known once the table is read
    factorized = FactorizedEmbedding(v, rank, h, embedding.padding_idx, dtype=embedding.weight.dtype, device="meta")
    if config.embedding_weights is not None:
        factorized.quantize_table_(table_config(config))
    tied = compat.head_tied_to_embedding(model)
    factorized_head = compat.has_factorized_head(model) if pre_quantized else tied and not config.untie_embeddings
    name = next(n for n, m in model.named_modules() if m is embedding)
    model.set_input_embeddings(factorized)
    if tied and config.untie_embeddings and not pre_quantized:
        head.weight = nn.Parameter(torch.empty_like(head.weight), requires_grad=head.weight.requires_grad)
    if factorized_head:
        model.set_output_embeddings(FactorizedHead(factorized))
    compat.untie_embeddings(model, factorized_head)
    return name


@dataclass
class _Slot:
    """One shared tensor being assembled from its group's members."""

    module: nn.Module
    tensor_name: str
    needed: int
    total: torch.Tensor | None = None
    seen: int = 0


class SourceRouter:
    """Takes the float source tensors that compression transforms (see the module docstring)."""

    def __init__(self, model: nn.Module, config: SlimConfig, source: Path | None, embedding_name: str | None, plan: SharingPlan | None):
        self.model, self.config, self.source = model, config, source
        self.embedding_key = None if embedding_name is None else f"{embedding_name}.weight"
        self.rank: int | None = config.embedding_rank
        self.routes: dict[str, tuple[_Slot | None, bool]] = {}  # name -> (slot, whether this member's tensor counts)
        if plan is not None:
            self._route_groups(plan)
        self.prefix = getattr(model, "base_model_prefix", "")

    def _route_groups(self, plan: SharingPlan) -> None:
        init = self.config.share_init
        for _, group, name in sharing.iter_group_leaves(plan.groups, plan.leaves):
            module = plan.blocks[group[0]].get_submodule(name)
            for tensor_name in _source_names(module):
                slot = _Slot(module, tensor_name, needed=1 if isinstance(init, int) else len(group))
                for position, i in enumerate(group):
                    counts = position == init if isinstance(init, int) else True
                    self.routes[f"{plan.prefix}.{i}.{name}.{tensor_name}"] = (slot, counts)

    def take(self, key: str, read: Callable[[], torch.Tensor], device_for: Callable[[str], object]) -> bool:
        """Consume checkpoint tensor `key` if compression transforms it (True), else leave it to the loader."""
        name = self._resolve(key)
        if name is None:
            return False
        device = device_for(name)
        if device == "disk":
            raise ValueError(f"{name} is compressed (factorized or shared) and cannot be offloaded to disk: keep it on a device")
        if name == self.embedding_key:
            self._factorize(read(), device)
            return True
        slot, counts = self.routes[name]
        if counts:
            value = read().to(device=device, dtype=torch.float32)
            slot.total = value if slot.total is None else slot.total + value
            slot.seen += 1
            if slot.seen == slot.needed:
                sharing.set_source_tensor(slot.module, slot.tensor_name, slot.total / slot.needed)
                slot.total = None
        return True

    def _resolve(self, key: str) -> str | None:
        for name in (key, f"{self.prefix}.{key}", key.removeprefix(f"{self.prefix}.")):
            if name == self.embedding_key or name in self.routes:
                return name
        return None

    def _factorize(self, weight: torch.Tensor, device) -> None:
        weight = weight.to(device)
        token_weights = self._token_weights(weight.shape[0])
        self.rank = choose_rank(weight, self.config, token_weights)
        a, b = svd.factorize(weight, self.rank, token_weights)
        self.model.get_input_embeddings().set_factors(a, b)
        head = self.model.get_output_embeddings()
        if self.config.untie_embeddings and head is not None and getattr(head, "weight", None) is not None and head.weight.is_meta:
            head.weight = nn.Parameter(weight.to(head.weight.dtype), requires_grad=head.weight.requires_grad)

    def _token_weights(self, vocab_size: int) -> torch.Tensor | None:
        if self.config.embedding_corpus is None:
            return None
        from transformers import AutoTokenizer

        return svd.corpus_frequencies(self.config.embedding_corpus, AutoTokenizer.from_pretrained(self.source), vocab_size)

    def finish(self, config: SlimConfig) -> SlimConfig:
        """Check every routed tensor arrived; `config` with the chosen rank recorded."""
        incomplete = sorted({n for n, (slot, counts) in self.routes.items() if counts and slot.seen < slot.needed})
        if incomplete:
            raise ValueError(
                f"{self.source}: the checkpoint has no data for {incomplete[:5]} ({len(incomplete)} tensors): is it the right model?"
            )
        if self.config.factorizes_embedding and self.model.get_input_embeddings().proj.is_meta:
            raise ValueError(f"{self.source}: the checkpoint has no input embedding {self.embedding_key}: is it the right model?")
        return recorded(config, self.rank) if self.rank is not None else config


def _source_names(module: nn.Module) -> list[str]:
    """A leaf's tensor names in a float checkpoint."""
    if isinstance(module, SlimLinear):
        return ["weight"] + ([] if module.bias is None else ["bias"])
    return list(module.state_dict())
