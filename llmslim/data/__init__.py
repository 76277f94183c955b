"""The texts the package's defaults need, shipped with it (see README.md here for sources and licences)."""

from __future__ import annotations

from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
WIKITEXT2_TEST = DATA_DIR / "wikitext-2-raw" / "wiki.test.raw"
TINY_SHAKESPEARE = DATA_DIR / "tinyshakespeare" / "input.txt"
