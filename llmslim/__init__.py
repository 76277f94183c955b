"""llmslim: load, fine-tune and serve large language models where they otherwise would not fit.

`import llmslim` registers the `"llmslim"` quantization method with transformers; it imports
neither bitsandbytes nor CUDA.
"""

from __future__ import annotations

from llmslim.config import SlimConfig
from llmslim.hf.quantizer import register as _register

__version__ = "0.1.0"
__all__ = ["SlimConfig", "compile_decode", "enable_checkpointing", "from_pretrained", "quantize_", "save_pretrained", "__version__"]

_register()


def from_pretrained(*args, **kwargs):
    """Load a causal LM compressed per a `SlimConfig`; see `llmslim.load.from_pretrained`."""
    from llmslim.load import from_pretrained as _from_pretrained

    return _from_pretrained(*args, **kwargs)


def save_pretrained(*args, **kwargs):
    """Save a compressed model (llmslim or bitsandbytes layout); see `llmslim.save.save_pretrained`."""
    from llmslim.save import save_pretrained as _save_pretrained

    return _save_pretrained(*args, **kwargs)


def quantize_(model, *args, **kwargs):
    """Quantize a loaded float model in place, its decoder layers given the lean decode step (`llmslim.hf.decode`);
    see `llmslim.quant.quantize.quantize_`."""
    from llmslim.hf.attention import use_prompt_attention
    from llmslim.hf.decode import use_lean_layers
    from llmslim.quant.quantize import quantize_ as _quantize_

    replaced = _quantize_(model, *args, **kwargs)
    use_lean_layers(model)
    use_prompt_attention(model)
    return replaced


def enable_checkpointing(*args, **kwargs):
    """Activation checkpointing of a model's blocks (sqrt(n), all, k segments; CPU offload); see
    `llmslim.memory.checkpointing.enable_checkpointing`."""
    from llmslim.memory.checkpointing import enable_checkpointing as _enable_checkpointing

    return _enable_checkpointing(*args, **kwargs)


def compile_decode(*args, **kwargs):
    """Static KV cache and a compiled decode step for `model.generate` on CPU; see `llmslim.generate.compile_decode`."""
    from llmslim.generate import compile_decode as _compile_decode

    return _compile_decode(*args, **kwargs)
