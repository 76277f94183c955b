"""Where llmslim keeps what it builds once and reuses: converted models, compiled kernels."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$LLMSLIM_CACHE`, or `~/.cache/llmslim` (under `$XDG_CACHE_HOME` when set)."""
    if os.environ.get("LLMSLIM_CACHE"):
        return Path(os.environ["LLMSLIM_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "llmslim"
