"""Distill a smaller student from a (quantized) teacher: the `llmslim distill` command as a script.

python scripts/distill.py TEACHER --student-layers 15 --out student/ ...
accelerate launch --multi_gpu --num_processes 2 scripts/distill.py ...   # data-parallel (CPU: gloo)
"""

from __future__ import annotations

import sys

from llmslim.cli import script_main

if __name__ == "__main__":
    sys.exit(script_main("distill"))
