"""QLoRA-style fine-tuning: the `llmslim finetune` command as a script.

python scripts/finetune.py [BASE] --out adapter/ --steps 200 ...
accelerate launch --num_processes 2 scripts/finetune.py ...   # data-parallel (CPU: gloo)
"""

from __future__ import annotations

import sys

from llmslim.cli import script_main

if __name__ == "__main__":
    sys.exit(script_main("finetune"))
