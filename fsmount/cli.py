"""Command line: the `fsmount` parser, and one clear line per failure.

What each command takes and does lives in its own module under fsmount/commands/.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Protocol

from fsmount.commands import cache, demo, mount, status, unmount
from fsmount.errors import StartupError


class Command(Protocol):
    """A module of fsmount/commands/."""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace, argv: Sequence[str]) -> int:
        """The exit code; a StartupError is printed as one line, and exits 1."""
        ...


COMMANDS: tuple[tuple[str, str, Command], ...] = (
    ("mount", "mount the configured services", mount),
    ("unmount", "unmount (lazily when busy)", unmount),
    ("status", "what running mounts are doing (exit 1 if one does not answer)", status),
    ("demo", "mount the built-in demo services", demo),
    ("cache", "what the disk cache holds; empty it; fill it ahead", cache),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fsmount",
        description="Mount Grand Challenge archives and Scenario asset libraries, read-only.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text, module in COMMANDS:
        command = commands.add_parser(name, help=help_text)
        module.add_arguments(command)
        command.set_defaults(func=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace, Sequence[str]], int] = args.func
    try:
        return func(args, argv)
    except StartupError as exc:
        print(f"fsmount: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
