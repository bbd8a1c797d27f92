"""`fsmount demo`: the fake services, mounted, with a short tour (fsmount/demo/tour.py)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("mountpoint", metavar="MOUNTPOINT", nargs="?", default="demo-mnt")


def run(args: argparse.Namespace, argv: Sequence[str]) -> int:
    from fsmount.demo.tour import run_demo

    return run_demo(Path(args.mountpoint))
