"""The seam to transformers and peft.

- `compat.py`: every use of their internals (tying, key renaming, attention and compile
  interfaces, `Conv1D`, peft's LoRA layer), behind names llmslim owns.
- `checks.py`: a checkpoint checked against the skeleton's llmslim layers.
- `quantizer.py`: the `HfQuantizer` transformers calls for `quant_method="llmslim"`, and `register()`.
"""
