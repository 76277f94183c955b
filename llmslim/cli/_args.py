"""From command-line text to values and configs: shared by every verb of `llmslim.cli`."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Iterable
from typing import Any, TypeVar

from llmslim.quant.registry import weight_choices

T = TypeVar("T")


def config_from_args(cls: type[T], args: argparse.Namespace, *, ignore: Iterable[str] = (), **overrides: Any) -> T:
    """Build the dataclass `cls` from parsed flags, field by field name.

    Args:
        cls: a dataclass (`TrainConfig`, `DistillConfig`, `SlimConfig`, ...).
        args: the parsed namespace; a field takes the value of the attribute of the same name.
        ignore: fields never read from `args` (a flag of the same name that means something else,
            or one left unset): they keep the dataclass default unless overridden.
        overrides: values computed from flags (a parsed layer map, `None` for "default"), and
            fields whose flag has another name; they win over `args`.

    Returns:
        `cls(**values)`, so the dataclass validates them as it always does.
    """
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TypeError(f"{cls.__name__} has no field {', '.join(unknown)}")  # a bug in a verb, not bad input
    skipped = set(ignore)
    values = {name: getattr(args, name) for name in names if name not in skipped and hasattr(args, name)}
    return cls(**(values | overrides))


class DeprecatedAlias(argparse.Action):
    """An old spelling of an option: it still sets the new option's value, and says on stderr to use the new one.

    `p.add_argument("--block-size", dest="seq_len", action=DeprecatedAlias, new="--seq-len", type=int)`

    The message is one line, `PROG: warning: ...`, as argparse's own `deprecated=True` (Python 3.13)
    prints it; not a `warnings.warn`, whose line would point into argparse.
    """

    def __init__(self, option_strings, dest, *, new: str, **kwargs) -> None:
        kwargs.setdefault("default", argparse.SUPPRESS)  # the new option's default stands
        kwargs.setdefault("help", f"deprecated alias of {new}, removed in the next release")
        super().__init__(option_strings, dest, **kwargs)
        self.new = new

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(
            f"{parser.prog}: warning: {option_string} is deprecated and will be removed in the next release: use {self.new}",
            file=sys.stderr,
        )
        setattr(namespace, self.dest, values)


def add_weights_argument(p, *, with_none: bool = True, default: str | None = None, help: str, flag: str = "--weights") -> None:
    """A weight-format option whose choices are the registry's formats (`"none"` first when `with_none`)."""
    p.add_argument(flag, choices=weight_choices(with_none), default=default, help=help)


def examples_epilog(examples: Iterable[str]) -> str:
    """The `examples:` block that ends a verb's --help (shown as written: RawDescriptionHelpFormatter)."""
    return "examples:\n" + "\n".join(f"  {line}" for line in examples)


def parse_share_layers(text: str | None) -> int | str | list[list[int]] | None:
    """`"all"`, `"3"` (groups of 3) or explicit groups `"0-1,2-4"` / `"0:1;2:3:4"`."""
    if text is None or text == "all":
        return text
    if text.isdigit():
        return int(text)
    try:
        groups = [_group(part) for part in text.replace(";", ",").split(",") if part]
    except ValueError as err:
        raise ValueError(f"--share-layers must be 'all', a group size such as 2, or groups such as 0-1,2-4, got {text!r}") from err
    return groups


def _group(part: str) -> list[int]:
    if "-" in part:
        first, last = (int(x) for x in part.split("-"))
        return list(range(first, last + 1))
    return [int(x) for x in part.split(":")]


def parse_share_init(text: str) -> str | int:
    """`"mean"` or a member index."""
    return int(text) if text.isdigit() else text
