"""ALBERT's factorized embedding for pretrained models: a V x E table and an E x H projection.

`FactorizedEmbedding` looks a token up as `table[id] @ proj`. A tied output head becomes a
`FactorizedHead` that computes the logits through the same factors, `(h @ proj.T) @ table.T`,
never materialising the V x H product. The table is an `nn.Linear(E, V)` (its weight is V x E),
so it can be swapped for any llmslim quantized layer (`SlimLinear.from_linear`); the head then
runs the quantized kernel and lookups dequantize only what they need.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llmslim.config import SlimConfig
from llmslim.quant import formats
from llmslim.quant.modules import SlimLinear, SlimLinear8bit


class FactorTable(nn.Module):
    """The V x E token table of a factorized embedding: weight (V, E); as a layer, E -> V logits.

    It has nn.Linear's attributes, so `SlimLinear.from_linear` can quantize it, but it is not an
    nn.Linear: quantizing a model's linear layers leaves it alone (its format is `embedding_weights`).
    """

    bias = None

    def __init__(self, in_features: int, out_features: int, dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device))  # (V, E)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)  # (..., E) -> (..., V)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)  # (..., E)


class FactorizedEmbedding(nn.Module):
    """An embedding stored as `table` (V x E) times `proj` (E x H).

    Args:
        num_embeddings: V, the vocabulary size.
        rank: E, the inner dimension.
        embedding_dim: H, the model's hidden size.
        padding_idx: kept for code that reads it (it does not change the forward pass).
        dtype / device: of the new tensors (`device="meta"` for a skeleton).
    """

    def __init__(self, num_embeddings: int, rank: int, embedding_dim: int, padding_idx: int | None = None, dtype=None, device=None):
        super().__init__()
        self.num_embeddings, self.rank, self.embedding_dim, self.padding_idx = num_embeddings, rank, embedding_dim, padding_idx
        self.table: nn.Module = FactorTable(rank, num_embeddings, dtype=dtype, device=device)
        self.proj = nn.Parameter(torch.empty(rank, embedding_dim, dtype=dtype, device=device))  # (E, H)
        self.table_config: SlimConfig | None = None  # the table's format, once quantized

    @classmethod
    def from_factors(cls, a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype | None = None, padding_idx: int | None = None):
        """A module holding A (V, E) and B (E, H), cast to `dtype`."""
        module = cls(a.shape[0], a.shape[1], b.shape[1], padding_idx, dtype=dtype or a.dtype, device="meta")
        module.set_factors(a, b)
        return module

    @torch.no_grad()
    def set_factors(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Fill the module with A (V, E) and B (E, H) (the rank may change; a quantized table is re-quantized)."""
        if a.shape[0] != self.num_embeddings or b.shape[1] != self.embedding_dim or a.shape[1] != b.shape[0]:
            raise ValueError(
                f"factors {tuple(a.shape)} x {tuple(b.shape)} do not make a ({self.num_embeddings}, {self.embedding_dim}) embedding"
            )
        dtype = self.proj.dtype
        self.rank = a.shape[1]
        self.proj = nn.Parameter(b.to(dtype), requires_grad=self.proj.requires_grad)
        table = FactorTable(self.rank, self.num_embeddings, dtype=dtype, device="meta")
        table.weight = nn.Parameter(a.to(dtype), requires_grad=self.table_trainable)
        if isinstance(self.table, SlimLinear):
            table = quantized_table(table, self.table_config)
        self.table = table

    @property
    def table_trainable(self) -> bool:
        return not isinstance(self.table, SlimLinear) and self.table.weight.requires_grad

    def quantize_table_(self, config: SlimConfig) -> None:
        """Store the table in `config.weights`' format (the projection stays in float)."""
        self.table_config = config
        if self.table.weight.is_meta:
            spec = config.layer_spec(weights=config.weights)
            self.table = spec.module_class().from_linear(self.table, spec)
        else:
            self.table = quantized_table(self.table, config)

    def table_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of the table for `ids` (..., E), dequantizing only what the format allows."""
        table = self.table
        if isinstance(table, SlimLinear8bit):
            flat = ids.reshape(-1)
            rows = formats.dequantize_int8_rows(table.weight[flat], table.SCB[flat], self.proj.dtype)  # (N, E)
            return rows.view(*ids.shape, -1)
        if isinstance(table, SlimLinear):
            return F.embedding(ids, table.dequantized_weight(self.proj.dtype))  # 4-bit codes are not row-addressable
        return table.rows(ids)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table_rows(ids).to(self.proj.dtype) @ self.proj  # (..., E) @ (E, H) -> (..., H)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden @ (table @ proj).T without forming the V x H product."""
        low = hidden.to(self.proj.dtype) @ self.proj.t()  # (..., H) @ (H, E) -> (..., E)
        return self.table(low)  # (..., V)

    @torch.no_grad()
    def materialize(self) -> torch.Tensor:
        """The V x H product (for tests and error measurements; defeats the purpose otherwise)."""
        eye = torch.eye(self.embedding_dim, dtype=self.proj.dtype, device=self.proj.device)
        return self.logits(eye).t()  # (V, H)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, rank={self.rank}, embedding_dim={self.embedding_dim}"


class FactorizedHead(nn.Module):
    """An output head tied to a `FactorizedEmbedding`: logits through its factors.

    The embedding is referenced, not registered, so its tensors appear once in `state_dict` and
    `parameters()` (under the embedding's name) and are saved and counted once.
    """

    def __init__(self, embedding: FactorizedEmbedding):
        super().__init__()
        self.__dict__["embedding"] = embedding  # a reference, deliberately not a submodule
        self.in_features, self.out_features = embedding.embedding_dim, embedding.num_embeddings

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.embedding.logits(hidden)

    def extra_repr(self) -> str:
        return f"tied to a factorized embedding (rank={self.embedding.rank})"


def quantized_table(table: FactorTable, config: SlimConfig) -> SlimLinear:
    """`table` stored in `config.weights`' format."""
    spec = config.layer_spec(weights=config.weights)
    layer = spec.module_class().from_linear(table, spec)
    layer.set_float_weight(table.weight.data)
    layer.own_memory()
    return layer
