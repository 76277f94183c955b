"""Re-render every table of benchmarks/README.md from the committed JSON in benchmarks/results/, running nothing.

Each `bench_*.py` names its README blocks in `README_BLOCKS` (marker name -> JSON file) and renders
one with `markdown(report)`; this script puts each rendered table between its markers. Nothing here
imports torch, and no PNG is redrawn (a script's `--from-json` does that, where it has one).

    python benchmarks/render.py           # rewrite the tables in benchmarks/README.md
    python benchmarks/render.py --check   # exit 1, with a diff, if a table differs from its JSON
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import re
import sys
from pathlib import Path

from _harness import BENCHMARKS, README, RESULTS_DIR, read_json, replace_block, write_atomic


def scripts() -> list[str]:
    """The benchmark scripts' module names, `bench_*.py` in benchmarks/."""
    return sorted(path.stem for path in BENCHMARKS.glob("bench_*.py"))


def tables(results_dir: Path = RESULTS_DIR) -> dict[str, str]:
    """Marker name -> the table its script renders from its committed JSON, for every block every script declares."""
    out = {}
    for name in scripts():
        module = importlib.import_module(name)
        for block, json_name in getattr(module, "README_BLOCKS", {}).items():
            out[block] = module.markdown(read_json(results_dir / json_name))
    return out


def readme_blocks(text: str) -> list[str]:
    """The marker names of the blocks in a README's `text`, in order."""
    return re.findall(r"<!-- ([\w-]+):start -->", text)


def rendered(text: str, results_dir: Path = RESULTS_DIR) -> str:
    """`text` with every block re-rendered from `results_dir`.

    Raises:
        KeyError: a block of `text` that no script renders, or a script's block that `text` lacks.
    """
    rendered_tables = tables(results_dir)
    orphans = sorted(set(readme_blocks(text)) - set(rendered_tables))
    if orphans:
        raise KeyError(f"README blocks {orphans} are rendered by no script: add them to a script's README_BLOCKS, or drop the markers")
    for name, table in rendered_tables.items():
        text = replace_block(text, name, table)  # KeyError when the README lacks the markers
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 with a diff if a table differs from its JSON")
    parser.add_argument("--readme", type=Path, default=README, help="the README to render into (default benchmarks/README.md)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where the JSON results are")
    args = parser.parse_args(argv)
    text = args.readme.read_text()
    new = rendered(text, args.results_dir)
    if new == text:
        print(f"{args.readme}: every table matches its JSON")
        return 0
    if args.check:
        sys.stdout.writelines(difflib.unified_diff(text.splitlines(True), new.splitlines(True), str(args.readme), "rendered"))
        return 1
    write_atomic(args.readme, new)
    print(f"{args.readme}: tables re-rendered from {args.results_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
