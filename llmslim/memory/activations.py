"""The activation-memory model of checkpointing policies, and the policy that fits a budget.

With n blocks cut into s segments (largest m = ceil(n / s) blocks), the peak of a training step is

    none:         O + n * A       + A / 2
    s segments:   O + s * B + m * A + A / 2    ("all": s = n, m = 1;  "sqrt": s ~ sqrt(n))

B is one boundary (batch * seq * hidden elements), A what one block keeps for its backward pass
(its recomputed segment is alive while it is differentiated), O what the embeddings, the head and
the loss keep, and A / 2 the gradients of the intermediates of the block being differentiated
(calibrated: 0.5-0.6 A on Llama blocks, measured with `measure.peak_memory`). A and O are
counted by running the model on the meta device (no memory, no compute) with one and two blocks
and adding up the bytes autograd saves; B follows from the shape.
The memory is lowest at s* = sqrt(n * A / B): a transformer block keeps 10-40x its boundary, so
s* is near n and per-block checkpointing ("all") usually beats sqrt(n) segments; sqrt(n) wins
only where A / B < n / 4 or so, that is for blocks that keep little besides their input.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from llmslim.memory.checkpointing import n_segments


@dataclass
class ActivationCosts:
    """Bytes of one training step's activations, per part.

    Args:
        n_blocks: transformer blocks.
        boundary: one block input (B).
        block: what one block saves for the backward pass (A).
        outside: what the rest of the model saves (O): embeddings, final norm, head, loss.
    """

    n_blocks: int
    boundary: int
    block: int
    outside: int

    def peak(self, policy: str | int) -> int:
        """Predicted activation bytes of a step under `policy`."""
        segments = n_segments(policy, self.n_blocks)
        backward = self.block // 2
        if segments == 0:
            return self.outside + self.n_blocks * self.block + backward
        largest = math.ceil(self.n_blocks / segments)
        return self.outside + segments * self.boundary + largest * self.block + backward

    def best_segments(self) -> int:
        """The number of segments with the lowest peak (s* = sqrt(n A / B), rounded, within 1..n)."""
        guess = math.sqrt(self.n_blocks * self.block / max(1, self.boundary))
        around = {max(1, min(self.n_blocks, s)) for s in (math.floor(guess), math.ceil(guess), self.n_blocks)}
        return min(around, key=lambda s: (self.peak(s), s))

    def choose(self, budget_bytes: int) -> str | int:
        """The cheapest policy whose activations fit `budget_bytes`: "none" (no recomputation) if
        it fits, else the checkpointing policy with the lowest peak (each costs one extra forward).

        Raises:
            ValueError: not even the best policy fits; says how much it needs.
        """
        if self.peak("none") <= budget_bytes:
            return "none"
        best = self.best_segments()
        if self.peak(best) > budget_bytes:
            raise ValueError(
                f"activations need at least {self.peak(best) / 2**20:.1f} MiB (checkpointing={best}), more than the budget of "
                f"{budget_bytes / 2**20:.1f} MiB: lower the batch size or the sequence length, or add offload=True"
            )
        return "all" if best == self.n_blocks else ("sqrt" if best == n_segments("sqrt", self.n_blocks) else best)


def activation_costs(
    hf_config, batch: int, seq: int, dtype: torch.dtype = torch.float32, attn_implementation: str = "eager"
) -> ActivationCosts:
    """A, B and O of a causal LM described by `hf_config`, counted on the meta device."""
    with_one = _saved_bytes(hf_config, 1, batch, seq, dtype, attn_implementation)
    with_two = _saved_bytes(hf_config, 2, batch, seq, dtype, attn_implementation)
    block = with_two - with_one
    boundary = batch * seq * hf_config.hidden_size * torch.finfo(dtype).bits // 8
    return ActivationCosts(hf_config.num_hidden_layers, boundary, block, with_one - block)


def _saved_bytes(hf_config, n_layers: int, batch: int, seq: int, dtype: torch.dtype, attn_implementation: str) -> int:
    """Bytes autograd saves in one forward pass of a copy of the model with `n_layers` blocks (params excluded)."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(hf_config)
    config.num_hidden_layers = n_layers
    for name in ("layer_types",):  # per-layer lists follow the depth
        if isinstance(getattr(config, name, None), list):
            setattr(config, name, getattr(config, name)[:n_layers])
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    model.requires_grad_(False)
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in params:
            saved[storage._cdata] = storage.nbytes()
        return tensor

    ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    embeds = model.get_input_embeddings()(ids).requires_grad_(True)  # activations need grad, weights do not
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(inputs_embeds=embeds, attention_mask=torch.ones_like(ids), use_cache=False).logits
        torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids.flatten())
    return sum(saved.values())
