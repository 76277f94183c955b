"""The `llmslim` command: one module per verb, each parsing its flags, building a config, calling the library, printing.

Every verb module has the same small interface, and `main` dispatches through it one way:

    NAME: str                 the verb (`llmslim NAME ...`)
    HELP: str                 one line for `llmslim --help` and the top of `llmslim NAME --help`
    EXAMPLES: tuple[str, ...] one or two real commands, the `examples:` block ending `llmslim NAME --help`
    add_arguments(parser)     its options, on the parser `main` gives it
    run(args) -> int          what it does; the exit code

A ValueError or OSError from `run` (bad input, a missing or existing file) is printed as one line
`llmslim NAME: error: ...` with exit code 2, not a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from types import ModuleType

from llmslim.cli import compress, demo, distill, env, finetune, generate, merge, plan, quantize, serve
from llmslim.cli import eval as eval_
from llmslim.cli._args import examples_epilog

VERBS: tuple[ModuleType, ...] = (quantize, eval_, generate, env, distill, finetune, merge, plan, compress, serve, demo)
_BY_NAME = {verb.NAME: verb for verb in VERBS}
DESCRIPTION = "Make large language models fit: quantize, evaluate, generate, serve, plan, distill, fine-tune, compress."


def build_parser() -> argparse.ArgumentParser:
    """The `llmslim` parser: -v, then one sub-command per verb of `VERBS`."""
    parser = argparse.ArgumentParser(prog="llmslim", description=DESCRIPTION, epilog="`llmslim COMMAND --help`: its options and examples")
    _add_verbose(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    for verb in VERBS:
        verb.add_arguments(sub.add_parser(verb.NAME, help=verb.HELP, **_help_of(verb)))
    return parser


def main(argv: list[str] | None = None) -> int:
    """`llmslim` / `python -m llmslim`: parse, run the verb, return its exit code."""
    args = build_parser().parse_args(argv)
    return _run(_BY_NAME[args.command], args, f"llmslim {args.command}")


def script_main(name: str, argv: list[str] | None = None) -> int:
    """One verb as a stand-alone script (scripts/distill.py, scripts/finetune.py: runnable under `accelerate launch`)."""
    verb = _BY_NAME[name]
    parser = argparse.ArgumentParser(**_help_of(verb))
    _add_verbose(parser)
    verb.add_arguments(parser)
    parser.set_defaults(command=name)
    return _run(verb, parser.parse_args(argv), name)


def _help_of(verb: ModuleType) -> dict:
    return {"description": verb.HELP, "epilog": examples_epilog(verb.EXAMPLES), "formatter_class": argparse.RawDescriptionHelpFormatter}


def _add_verbose(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", help="log what llmslim does")


def _run(verb: ModuleType, args: argparse.Namespace, label: str) -> int:
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return verb.run(args)
    except (ValueError, OSError) as err:  # bad input or environment (OSError covers missing, existing, unreadable files): no traceback
        print(f"{label}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
