"""`llmslim env`: versions, devices and the kernel backend each operation uses here."""

from __future__ import annotations

import argparse

NAME = "env"
HELP = "versions, devices and active kernel backends"
EXAMPLES = (
    "llmslim env",
    "python -m llmslim env   # the same, without the console script",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """No options."""


def run(args: argparse.Namespace) -> int:
    from llmslim.env import environment_report

    for key, value in environment_report().items():
        print(f"{key:24s} {value}")
    return 0
