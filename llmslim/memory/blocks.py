"""Find the stack of transformer blocks of any Hugging Face model, without per-architecture lists.

The stack is the `nn.ModuleList` of `config.num_hidden_layers` modules of one class holding the
most parameters: `model.layers` in Llama, `transformer.h` in GPT-2, `model.decoder.layers` in OPT,
`bert.encoder.layer` in BERT; inside a PEFT model the same list one wrapper deeper.
"""

from __future__ import annotations

from torch import nn


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, module) of the list of transformer blocks of `model`.

    Raises:
        ValueError: the model has no config with `num_hidden_layers`, or no such list.
    """
    config = getattr(model, "config", None)
    n_layers = getattr(config, "num_hidden_layers", None)
    if not isinstance(n_layers, int):
        raise ValueError(f"{type(model).__name__} has no config.num_hidden_layers: pass a Hugging Face model (PreTrainedModel)")
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == n_layers and len({type(m) for m in module}) == 1
    ]
    if not candidates:
        raise ValueError(
            f"found no list of {n_layers} blocks (config.num_hidden_layers) in {type(model).__name__}: "
            "activation checkpointing needs a model whose layers are an nn.ModuleList"
        )
    return max(candidates, key=lambda item: sum(p.numel() for p in item[1].parameters()))
