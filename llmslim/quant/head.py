"""The int8 decode head: a 16-bit output head that decodes through an int8 copy of itself on CPU.

At batch 1 a decode step reads every weight once, and a 16-bit output head is the largest single
read of a 4-bit model (SmolLM2 nf4: its tied bf16 head is 54 MiB, all the rest 52 MiB). Its
int8 copy (`SlimConfig.decode_head="int8"`, the default) halves that read. The copy is built at
the first decode call on CPU and kept beside the float weight as a non-persistent buffer, so:

- prompts (more than `kernels.INT8_DECODE_MAX_TOKENS` rows) and training use the float weight,
  exact; perplexity scored on windows does not change;
- decoded tokens' logits carry the int8 rounding of the head's weight (the activations stay 16-bit): one absmax per
  row and block of 128 columns where llmslim's AVX-512 kernel runs (`gemv_int8_rows`), one per row elsewhere
  (PyTorch's weight-only int8 kernel); scored token by token through the cache (SmolLM2 nf4, 20k
  tokens, benchmarks/bench_decode_numerics.py) the block-wise copy costs +0.054% perplexity, the row-wise one +0.115%;
- `state_dict()`, saving and the bitsandbytes export see the float head only;
- the copy costs V x H bytes beside the float weight (SmolLM2: +27 MiB; 32000 x 2048: +63 MiB) and 4 bytes per
  absmax, counted in the model's footprint once built; `decode_head="float"` opts out.
"""

from __future__ import annotations

import torch
from torch import nn

from llmslim.quant import kernels


class Int8DecodeHead(nn.Linear):
    """An output head (`nn.Linear`) whose decode steps on CPU read a row-wise int8 copy of its weight."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        copy = self._decode_copy(x)
        if copy is None:
            return super().forward(x)
        q, absmax = copy
        out = kernels.linear_int8_blocks(x, q, absmax) if absmax.dim() == 2 else kernels.linear_int8(x, q, absmax, threshold=0.0)
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def _decode_copy(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The (int8 rows, row absmax) to decode `x` with, built or rebuilt here; None: use the float weight."""
        weight = self.weight
        tokens = x.numel() // max(x.shape[-1], 1)
        if (
            x.device.type != "cpu"
            or weight.device.type != "cpu"
            or not weight.is_floating_point()
            or x.dtype != weight.dtype
            or tokens == 0
            or tokens > kernels.INT8_DECODE_MAX_TOKENS
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            or getattr(self, "_hf_hook", None) is not None  # accelerate swaps the weight in per call
            or getattr(self, "streamed", False)  # so does llmslim's offload
        ):
            return None
        built = self._buffers.get("decode_weight")
        if torch.compiler.is_compiling():  # the eager prompt step built it; a traced step only reads it
            return None if built is None else (built, self._buffers["decode_absmax"])
        stamp = _stamp(weight)
        if built is None or self._decode_stamp != stamp:
            with torch.no_grad():
                quantize = kernels.quantize_int8_blocks if kernels.int8_blocks_usable(weight) else kernels.quantize_int8_rows
                q, absmax = quantize(weight.detach())
            self.register_buffer("decode_weight", q, persistent=False)
            self.register_buffer("decode_absmax", absmax, persistent=False)
            self._decode_stamp = stamp
        return self._buffers["decode_weight"], self._buffers["decode_absmax"]


def _stamp(weight: torch.Tensor) -> tuple:
    """What changes when the head's weight does: its storage, and the in-place write counter where torch keeps one."""
    try:
        version = weight._version
    except RuntimeError:  # an inference tensor keeps no counter (it cannot be written in place outside inference mode)
        version = None
    return weight.data_ptr(), tuple(weight.shape), weight.dtype, version


def apply_decode_head(model: nn.Module, config) -> None:
    """What `config.decode_head` (a `SlimConfig`) asks of a model llmslim just quantized: the int8 decode head, unless
    it asks for the float one or quantizes nothing."""
    if config.weights is not None and config.decode_head == "int8":
        use_int8_decode_head(model)


def use_int8_decode_head(model: nn.Module) -> bool:
    """Make `model`'s output head an `Int8DecodeHead` when it is a plain 16-bit or float32 `nn.Linear`; whether it did.

    A head llmslim quantized (`int8_layers=["lm_head"]`, `exclude=[]`), a factorized one, or a model with no output
    head is left as it is. The module keeps its parameters, name and `state_dict`; only its class changes.
    """
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if type(head) is not nn.Linear or not head.weight.is_floating_point():
        return isinstance(head, Int8DecodeHead)
    head.__class__ = Int8DecodeHead
    head._decode_stamp = None
    return True


def use_float_head(model: nn.Module) -> None:
    """Undo `use_int8_decode_head`: the output head computes from its float weight again, and its int8 copy is freed."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if isinstance(head, Int8DecodeHead):
        for name in ("decode_weight", "decode_absmax"):
            head._buffers.pop(name, None)
        head.__class__ = nn.Linear
