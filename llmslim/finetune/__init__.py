"""QLoRA-style fine-tuning (`finetune`) and merging adapters into a quantized base (`merge`).

peft is imported by the submodules that need it, not by `import llmslim`.
"""

from __future__ import annotations

from llmslim.finetune.config import FinetuneConfig

__all__ = ["FinetuneConfig"]
